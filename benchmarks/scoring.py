"""Scoring figures that are benchmarks, not pipeline steps: the peak memory that chunked batch scoring of the target
campaign
adds at two chunk sizes, and the latency of single-row requests to the champion served over REST (a bounded loop)."""

import os

import numpy as np
import yaml

from lib import model_development as md
from lib.core import load_json, tracking_uri
from lib.data_acquisition import load_processed
from lib.model_deployment import (
    measure_latency,
    parity_sample,
    peak_memory_mb,
    prepare_campaign,
    score_campaign,
    serving,
)


def measure_scoring(project, chunk_households=(100, 1200), requests=200, timeout_s=30) -> dict:
    """Peak scoring memory per chunk size and REST latency percentiles, in a project where the pipeline has run."""
    import mlflow

    params = yaml.safe_load((project / "params.yaml").read_text())["model_deployment"]
    settings = md.development_settings(load_json(project / "models/candidate.json"))
    champion = load_json(project / "models/champion.json")
    store = tracking_uri(project, {})
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(champion["model_uri"])
    tables = load_processed(project, md.FEATURE_TABLES)
    target = prepare_campaign(tables, params["target_campaign"], settings["promo_weeks"])
    memory = {
        str(n): round(peak_memory_mb(lambda n=n: score_campaign(target, None, model, n)), 1) for n in chunk_households
    }
    sample = parity_sample(target, 50, 50)
    with serving(
        champion["alias_uri"], {**os.environ, "MLFLOW_TRACKING_URI": store}, project / "benchmark_server.log"
    ) as url:
        seconds = measure_latency(url, sample, requests, timeout_s)
    return {
        "rows_scored": len(target.rows),
        "peak_scoring_memory_mb_by_chunk_households": memory,
        "rest_latency_ms": {
            "p50": round(1000 * float(np.percentile(seconds, 50)), 1),
            "p95": round(1000 * float(np.percentile(seconds, 95)), 1),
            "requests": requests,
        },
    }

"""The stakeholder reports of a smoke run of the whole pipeline, checked in a real browser (Debian's Chromium)."""

import html
import json
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd
import pytest

from conftest import ROOT
from lib.reports import broken_links

pytestmark = pytest.mark.pipeline
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "tests/artifacts"


def report_pages(project) -> list:
    return sorted((project / "reports").rglob("*.html"))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Chromium is required for the browser tests: apt-get install chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def open_page(browser, path: Path):
    """Load `path` from file://, collecting console errors, page errors and requests that left the machine."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on(
        "request",
        lambda r: (
            problems.append(f"network request: {r.url}") if not r.url.startswith(("file:", "data:", "about:")) else None
        ),
    )
    page.goto(path.as_uri(), wait_until="load")
    return page, problems


def test_portal_exists_and_links_every_step_page(smoke_pipeline):
    portal = smoke_pipeline / "reports/index.html"
    text = portal.read_text()
    for page in (smoke_pipeline / "reports/html").glob("0[1-5]_*.html"):
        assert f'href="html/{page.name}"' in text
    assert not broken_links(portal)


def test_every_page_loads_in_chromium_without_errors_or_network(smoke_pipeline, browser):
    pages = report_pages(smoke_pipeline)
    assert len(pages) >= 3
    for path in pages:
        page, problems = open_page(browser, path)
        assert page.title(), f"{path.name} has no title"
        assert not problems, f"{path.relative_to(smoke_pipeline)}: {problems}"
        for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))"):
            if urlparse(href).scheme or href.startswith("#"):
                continue  # data:, https:, mailto: or an in-page anchor
            assert (path.parent / unquote(urlparse(href).path)).exists(), f"{path.name}: broken link {href}"
        page.close()


def test_portal_screenshot_is_kept_as_an_artifact(smoke_pipeline, browser):
    page, problems = open_page(browser, smoke_pipeline / "reports/index.html")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "portal.png"), full_page=True)
    assert page.locator(".tile").count() >= 3 and not problems
    assert (ARTIFACTS / "portal.png").stat().st_size > 10_000


def published_files(project) -> list:
    """What people and tools read: every page, profile and executed notebook, and the MLflow store with its
    artifacts."""
    reports = [p for p in (project / "reports").rglob("*") if p.suffix in (".html", ".ipynb", ".json", ".log")]
    artifacts = [p for p in (project / "mlartifacts").rglob("*") if p.is_file() and p.stat().st_size < 5_000_000]
    return sorted(reports + artifacts + [project / "mlflow.db"])


def test_no_page_notebook_or_mlflow_record_holds_a_raw_contact_detail(smoke_pipeline):
    contacts = pd.read_parquet(smoke_pipeline / "data/raw/contacts.parquet")
    values = {str(v) for column in ("name", "email", "phone") for v in contacts[column]}
    files = published_files(smoke_pipeline)
    assert len(files) > 20 and any(f.suffix == ".ipynb" for f in files) and any("mlartifacts" in f.parts for f in files)
    for path in files:
        text = html.unescape(path.read_bytes().decode("utf-8", errors="replace"))
        leaked = sorted(v for v in values if v in text)
        assert not leaked, f"{path.relative_to(smoke_pipeline)} holds raw contact details, e.g. {leaked[:2]}"


def test_stakeholder_pages_show_no_code(smoke_pipeline):
    for path in (smoke_pipeline / "reports/html").glob("*.html"):
        text = path.read_text()
        assert "jp-InputArea" not in text and "input_area" not in text, f"{path.name} shows code cells"
        assert "Traceback" not in text and "#| export" not in text, f"{path.name} shows code or tracebacks"


def test_every_chart_reaches_its_step_page_as_an_image(smoke_pipeline):
    for path in sorted((smoke_pipeline / "reports/html").glob("0[1-5]_*.html")):
        text = path.read_text()
        assert "<img" in text, f"{path.name} has no chart"
        assert "Figure size" not in text, f"{path.name}: a chart shows as its text, not as an image"


def printed_to_stderr(notebook: Path) -> str:
    "What the cells of an executed notebook printed to stderr."
    cells = json.loads(notebook.read_text())["cells"]
    return "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []) if o.get("name") == "stderr")


def test_executed_notebooks_hold_no_progress_bars_nor_the_warning_that_widgets_are_missing(smoke_pipeline):
    executed = sorted((smoke_pipeline / "reports/executed").glob("*.ipynb"))
    assert len(executed) == 6
    for notebook in executed:
        printed = printed_to_stderr(notebook)
        assert "IProgress not found" not in printed and "it/s]" not in printed, f"{notebook.name}: {printed[:500]}"

"""A Python worker for Spark's `spark.python.worker.module` (its name must start with "pyspark"): pyspark's own worker,
except that once a path matching $STALL_WHEN exists (the temporary folder of a write) it records its pid as a file in
$STALL_MARKERS and waits to be killed, so that a test can kill a real Python worker in the middle of a write stage.
With `spark.python.worker.reuse` false, `main` starts when its task is assigned (a reused worker enters it earlier)."""

import glob
import os
import time

from pyspark.worker import main as pyspark_main


def main(infile, outfile):
    if glob.glob(os.environ.get("STALL_WHEN", "")):
        marker = os.path.join(os.environ["STALL_MARKERS"], str(os.getpid()))
        with open(f"{marker}.tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(f"{marker}.tmp", marker)  # appears complete or not at all
        deadline = time.monotonic() + float(os.environ.get("STALL_SECONDS", "120"))
        while time.monotonic() < deadline:
            time.sleep(0.1)
        raise RuntimeError(f"worker {os.getpid()} stalled for $STALL_SECONDS and was not killed")
    pyspark_main(infile, outfile)

"""`ray job submit --working-dir . -- python -m ray_jobs.evaluate [churn evaluate options]`.

Inside a Ray job, RAY_ADDRESS is set, so scoring runs on the job's cluster.
A failed gate exits 3 (after logging), so a pipeline can stop on it.
"""

import sys

from churnlib.cli import run

if __name__ == "__main__":
    run(["evaluate", *sys.argv[1:]])

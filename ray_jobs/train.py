"""`ray job submit --working-dir . -- python -m ray_jobs.train [churn train options]`.

Inside a Ray job, RAY_ADDRESS is set, so training joins the job's cluster.
"""

import sys

from churnlib.cli import run

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])

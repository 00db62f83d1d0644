"""`ray job submit --working-dir . -- python -m ray_jobs.tune [churn tune options]`.

Inside a Ray job, RAY_ADDRESS is set, so the sweep runs on the job's cluster;
on more than one node, training.storage_path must be shared storage (s3://).
"""

import sys

from churnlib.cli import run

if __name__ == "__main__":
    run(["tune", *sys.argv[1:]])

"""`ray job submit --working-dir . -- python -m ray_jobs.batch_predict [churn predict options]`.

Inside a Ray job, RAY_ADDRESS is set, so scoring runs on the job's cluster;
give s3:// paths for --input and --output on more than one node.
"""

import sys

from churnlib.cli import run

if __name__ == "__main__":
    run(["predict", *sys.argv[1:]])

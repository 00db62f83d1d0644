#!/usr/bin/env bash
# Train a model (Ray Train + MLflow). Prints `run_id: <id>` on stdout.
#   scripts/train.sh [--data PATH] [--config F] [--set k=v]...
USAGE="scripts/train.sh [churn train options]"
. "$(dirname "$0")/_common.sh"
run train "$@"

# Shared by the scripts in this folder: stop on the first error, say what runs.
# CHURN overrides the command (default: the `churn` console script; the tests
# set it to "python -m churnlib").
set -euo pipefail
CHURN="${CHURN:-churn}"

run() {
  echo "+ $CHURN $*" >&2
  # shellcheck disable=SC2086
  $CHURN "$@"
}

usage_error() {
  echo "error: $(basename "$0"): $1" >&2
  echo "usage: $USAGE" >&2
  exit 2
}

#!/usr/bin/env bash
# The registered versions: aliases, created, source run, AUC, gate status.
#   scripts/list_models.sh [--json]
USAGE="scripts/list_models.sh [--json] [options]"
. "$(dirname "$0")/_common.sh"
run models list "$@"

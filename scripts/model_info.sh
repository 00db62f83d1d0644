#!/usr/bin/env bash
# One version in full (default: the champion).
#   scripts/model_info.sh [--version N | --alias NAME] [--json]
USAGE="scripts/model_info.sh [--version N | --alias NAME] [--json] [options]"
. "$(dirname "$0")/_common.sh"
run models info "$@"

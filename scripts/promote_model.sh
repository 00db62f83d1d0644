#!/usr/bin/env bash
# Move champion to a version (default: the one at staging) if its latest evaluation passed.
# Exits 3 when refused; no alias moves then.
#   scripts/promote_model.sh [--version N] [--force]
USAGE="scripts/promote_model.sh [--version N] [--force] [options]"
. "$(dirname "$0")/_common.sh"
run models promote "$@"

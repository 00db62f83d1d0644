#!/usr/bin/env bash
# Register a training run's model as a new version (the existing one if already registered).
#   scripts/register_model.sh --run-id ID [--alias staging] [--description TEXT]
USAGE="scripts/register_model.sh --run-id ID [--alias NAME] [--description TEXT] [options]"
. "$(dirname "$0")/_common.sh"
case " $* " in *" --run-id "*) ;; *) usage_error "give --run-id ID" ;; esac
run models register "$@"

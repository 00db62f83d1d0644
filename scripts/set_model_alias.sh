#!/usr/bin/env bash
# Point an alias (staging, champion, production, ...) at a version.
#   scripts/set_model_alias.sh --version N --alias NAME
USAGE="scripts/set_model_alias.sh --version N --alias NAME [options]"
. "$(dirname "$0")/_common.sh"
case " $* " in *" --version "*) ;; *) usage_error "give --version N" ;; esac
case " $* " in *" --alias "*) ;; *) usage_error "give --alias NAME" ;; esac
run models set-alias "$@"

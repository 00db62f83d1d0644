#!/usr/bin/env bash
# Evaluate a model with gates (exit 3 when a gate fails) and SHAP.
#   scripts/eval.sh (--run-id ID | --model-uri URI) --data PATH [--compare-baseline URI] [churn evaluate options]
USAGE="scripts/eval.sh (--run-id ID | --model-uri URI) --data PATH [--compare-baseline URI] [options]"
. "$(dirname "$0")/_common.sh"
args=()
model=""
while [ $# -gt 0 ]; do
  case "$1" in
    --run-id) [ $# -ge 2 ] || usage_error "--run-id needs a value"; model="runs:/$2/model"; shift 2 ;;
    --model-uri) [ $# -ge 2 ] || usage_error "--model-uri needs a value"; model="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
[ -n "$model" ] || usage_error "give --run-id ID or --model-uri URI"
run evaluate --model-uri "$model" --gate "${args[@]}"

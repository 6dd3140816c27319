"""Write a tiny random Qwen3-MoE checkpoint (with a word-level tokenizer) for demos.

    python examples/tiny_moe.py /tmp/tiny-moe
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness.checkpoints import COMMON, build_qwen3_moe, save_word_tokenizer  # noqa: E402


def main(path: str) -> None:
    out = build_qwen3_moe(path, num_layers=4, num_experts=8, top_k=2)
    save_word_tokenizer(out, COMMON["vocab_size"])
    print(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vllm-dwdp-tiny-moe")

"""DWDP on CUDA (CUDA IPC transport), against stock vLLM on the same checkpoint.

With two GPUs each rank has its own; with one, both ranks share it (CUDA IPC between two
processes on one device: the same code path, without NVLink), and every engine gets a fixed
KV-cache size so engines starting side by side do not size their caches against each other.
"""

from __future__ import annotations

import os

import pytest

from tests.dwdp.test_dwdp_cpu import stay_until_both_done
from tests.harness.equality import assert_outputs_equal, run_engines
from tests.harness.results import record_result

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [42, 17, 99], list(range(100, 160))]


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.gpu
@pytest.mark.parametrize("kind, dtype, eager, atol", [
    # Stock vLLM's fp32 MoE on CUDA multiplies in tf32 (~1e-3 relative), DWDP's kernel in
    # exact fp32: logprobs agree to a few 1e-3, tokens exactly.
    ("qwen3_moe", "float32", False, 1e-2),  # compiled, CUDA graphs off (logged)
    ("qwen2_moe", "float32", True, 1e-2),
    # Block-FP8 experts: both sides quantise activations per 128-channel group; bf16 model.
    ("qwen3_moe_fp8", "bfloat16", True, 5e-2),
])
def test_dwdp_ranks_match_stock(moe_checkpoint, kind, dtype, eager, atol, tmp_path):
    model = moe_checkpoint(kind)
    two = _gpus() >= 2
    base = dict(model=model, prompts=PROMPTS, max_tokens=8, logprobs=5, device="cuda",
                dtype=dtype, engine_kwargs={"kv_cache_memory_bytes": 1 << 28})
    stock = run_engines({"stock": dict(base, env={"VLLM_PLUGINS": "", "CUDA_VISIBLE_DEVICES": "0"})})
    port = 29800 + os.getpid() % 100
    ranks = run_engines({
        f"rank{r}": dict(base, dwdp_stats=True, enforce_eager=eager,
                         **stay_until_both_done(tmp_path, r),
                         env={"CUDA_VISIBLE_DEVICES": ("0,1" if r == 0 else "1,0") if two else "0",
                              "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"},
                         additional_config={"dwdp": {"enabled": True, "world_size": 2,
                                                     "rank": r, "master_port": port}})
        for r in (0, 1)
    })
    worst = 0.0
    for name, res in ranks.items():
        worst = max(worst, assert_outputs_equal(stock["stock"], res, names=("stock", name),
                                                logprob_atol=atol))
        assert all(s["bytes_pulled"] > 0 for s in res["dwdp_stats_after"])
        log = open(res["log_path"]).read()
        assert "through cuda_ipc" in log
        if not eager:
            assert "DWDP runs this engine without CUDA graphs" in log
    record_result(f"dwdp_e2e_{kind}", {
        "tokens_equal": True, "max_logprob_abs_diff": worst, "model": kind, "dtype": dtype,
        "dwdp_ranks": 2, "gpus_used": 2 if two else 1, "enforce_eager": eager,
        "stats_rank0": ranks["rank0"]["dwdp_stats_after"],
    })

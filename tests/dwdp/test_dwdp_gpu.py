"""DWDP on CUDA (CUDA IPC transport), against stock vLLM on the same checkpoint.

With two GPUs each rank has its own; with one, both ranks share it (CUDA IPC between two
processes on one device: the same code path, without NVLink), and every engine gets a fixed
KV-cache size so engines starting side by side do not size their caches against each other.
"""

from __future__ import annotations

import os

import pytest

from tests.dwdp.test_dwdp_cpu import stay_until_both_done
from tests.harness.checkpoints import dequantise_block_fp8
from tests.harness.equality import (PROMPTS, assert_fp8_as_accurate_as_stock,
                                    assert_outputs_equal, prompt_logprob_error, run_engines)
from tests.harness.results import record_result


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.gpu
@pytest.mark.parametrize("kind, dtype, eager, atol", [
    # Stock vLLM's fp32 MoE on CUDA multiplies in tf32, and so does DWDP's kernel.
    ("qwen3_moe", "float32", False, 1e-2),  # compiled, CUDA graphs off (logged)
    ("qwen2_moe", "float32", True, 1e-2),
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


@pytest.mark.gpu
def test_dwdp_fp8_ranks_equal_one_rank_and_are_as_accurate_as_stock(moe_checkpoint, tmp_path):
    """Block-FP8 experts. The pulls must change nothing: two ranks give exactly what one rank
    holding every expert gives (same kernel, same arithmetic per token). The kernel must be
    as accurate as stock vLLM's: prompt logprobs no farther from the bf16 truth."""
    model = moe_checkpoint("qwen3_moe_fp8")
    truth = dequantise_block_fp8(model, tmp_path / "bf16")
    two = _gpus() >= 2
    base = dict(model=model, prompts=PROMPTS, max_tokens=8, logprobs=5, device="cuda",
                dtype="bfloat16", prompt_logprobs=True,
                engine_kwargs={"kv_cache_memory_bytes": 1 << 28})
    port = 29800 + os.getpid() % 100
    specs = {
        "stock": dict(base, env={"VLLM_PLUGINS": "", "CUDA_VISIBLE_DEVICES": "0"}),
        "truth": dict(base, model=str(truth),
                      env={"VLLM_PLUGINS": "", "CUDA_VISIBLE_DEVICES": "0"}),
        "one_rank": dict(base, env={"CUDA_VISIBLE_DEVICES": "0"},
                         additional_config={"dwdp": {"enabled": True, "world_size": 1}}),
    }
    for r in (0, 1):
        specs[f"rank{r}"] = dict(
            base, dwdp_stats=True, **stay_until_both_done(tmp_path, r),
            env={"CUDA_VISIBLE_DEVICES": ("0,1" if r == 0 else "1,0") if two else "0",
                 "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"},
            additional_config={"dwdp": {"enabled": True, "world_size": 2, "rank": r,
                                        "master_port": port}})
    res = run_engines(specs)
    for r in ("rank0", "rank1"):
        assert_outputs_equal(res["one_rank"], res[r], logprob_atol=1e-5, names=("one_rank", r))
        assert prompt_logprob_error(res["one_rank"], res[r])[1] <= 1e-5
        assert all(s["bytes_pulled"] > 0 for s in res[r]["dwdp_stats_after"])
    accuracy = assert_fp8_as_accurate_as_stock(res["truth"], res["stock"], res["one_rank"],
                                               "dwdp")
    record_result("dwdp_e2e_qwen3_moe_fp8", {
        "ranks_equal_one_rank": True, "accuracy_vs_bf16_truth": accuracy,
        "dwdp_ranks": 2, "gpus_used": 2 if two else 1,
        "stats_rank0": res["rank0"]["dwdp_stats_after"]})

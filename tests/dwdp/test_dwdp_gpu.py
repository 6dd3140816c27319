"""DWDP on CUDA, against stock vLLM on the same checkpoint.

Two ranks each store half of every MoE layer's experts in CUDA VMM pages and map the other
half's pages from the peer (POSIX file descriptors over a Unix socket); vLLM's own MoE kernel
(the one its quant method picks for the format) computes over the composite tensors. With one
GPU both ranks share it (the same code path, without NVLink); every engine gets a fixed
KV-cache size so engines starting side by side do not size their caches against each other.
Every engine runs its engine core in its own process with all prompts queued before the first
step, so stock and DWDP batch the same tokens together (vLLM's kernels pick tiles, and FP8
paths even kernels, by the number of tokens in a step).

The layers are big enough (2 MiB bf16 w13 per expert) that every rank pulls whole pages of
experts each forward pass, not only edge pages filled at start-up.
"""

from __future__ import annotations


import pytest

from tests.dwdp.test_dwdp_cpu import dwdp_spec, new_group, stay_until_all_done
from tests.harness.equality import (PROMPTS, assert_outputs_equal, kill_engine, run_engines,
                                    start_engine, wait_engine)
from tests.harness.results import record_result

SHAPE = dict(hidden_size=1024, moe_intermediate_size=512)
# Qwen2-MoE in fp32: 512 KiB of w13 per expert, 6 experts, so each rank pulls a whole page
# (vLLM derives its head size from hidden_size / heads).
SHAPES = {"qwen2_moe": dict(hidden_size=1024, num_attention_heads=32, num_key_value_heads=16)}


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
ENGINE_KWARGS = {"kv_cache_memory_bytes": 1 << 28, "distributed_executor_backend": "uni"}


def _pulled_per_pass(ranks: dict) -> list[int]:
    """Bytes the ranks pulled together, layer by layer (0 where a layer pulled nothing)."""
    return [sum(s) for s in zip(*([st["bytes_pulled"] for st in res["dwdp_stats_after"]]
                                  for res in ranks.values()))]


def _run_ranks_and_stock(model, dtype, tmp_path, eager=True, stock_env=None, graphs=False,
                         engine_kwargs=None):
    two = _gpus() >= 2
    base = dict(model=model, prompts=PROMPTS, max_tokens=8, logprobs=5, device="cuda",
                dtype=dtype, enforce_eager=eager,
                engine_kwargs={**ENGINE_KWARGS, **(engine_kwargs or {})})
    stock_env = {**IN_PROCESS, **(stock_env or {})}
    # Under CUDA graphs stock vLLM's pieces are split where DWDP splits them, so both run the
    # same compiled code around the MoE layers (splitting changes what inductor fuses).
    stock = run_engines({"stock": dict(base, moe_graph_splits=graphs,
                                       env={"VLLM_PLUGINS": "", "CUDA_VISIBLE_DEVICES": "0",
                                            **stock_env})})
    group = new_group()
    ranks = run_engines({
        f"rank{r}": dict(base, dwdp_stats=True, **stay_until_all_done(tmp_path, r, 2),
                         env={"CUDA_VISIBLE_DEVICES": ("0,1" if r == 0 else "1,0") if two else "0",
                              "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", **stock_env},
                         additional_config={"dwdp": {"enabled": True, "world_size": 2,
                                                     "rank": r, "group": group,
                                                     "cuda_graphs": graphs}})
        for r in (0, 1)
    })
    return stock["stock"], ranks, two


@pytest.mark.gpu
@pytest.mark.parametrize("kind, dtype, mode, atol", [
    ("qwen3_moe", "bfloat16", "compiled", 2e-2),  # torch.compile, CUDA graphs off (logged)
    # compiled with vLLM's CUDA graphs (stock too, its pieces split at the MoE layers alike):
    # piecewise graphs for the prefill steps with the MoE layers between the pieces, FULL
    # graphs for the decode steps
    pytest.param("qwen3_moe", "bfloat16", "cuda_graphs", 2e-2, marks=pytest.mark.xfail(
        strict=True, reason="H200, vLLM 0.26, 2026-12-02: prefill matches stock split alike, "
        "but one rank's logprob at a FULL-graph decode step differs by 4.5e-2 (README, CUDA "
        "graphs); the setting stays off until this passes")),
    # Eager: the same kernels over the same bytes, batched alike, so the logprobs agree closely.
    ("qwen2_moe", "float32", "eager", 1e-4),    # a shared expert beside the routed ones
    ("qwen3_moe_fp8", "bfloat16", "eager", 1e-4),         # block FP8 (128 x 128 scales)
    ("qwen3_moe_fp8_tensor", "bfloat16", "eager", 1e-4),  # per-tensor FP8, a scale per expert
])
def test_dwdp_ranks_match_stock(moe_checkpoint, kind, dtype, mode, atol, tmp_path):
    model = moe_checkpoint(kind, **SHAPES.get(kind, SHAPE))
    eager, graphs = mode == "eager", mode == "cuda_graphs"
    stock, ranks, two = _run_ranks_and_stock(model, dtype, tmp_path, eager=eager, graphs=graphs)
    worst = 0.0
    # Experts really move each forward pass (a rank whose pages cover every expert byte, as
    # rank 1 of the Qwen2-MoE shape, has all of them filled once at start-up instead).
    pulled = _pulled_per_pass(ranks)
    assert pulled and all(b > 0 for b in pulled), pulled
    for name, res in ranks.items():
        worst = max(worst, assert_outputs_equal(stock, res, names=("stock", name),
                                                logprob_atol=atol))
        log = open(res["log_path"]).read()
        assert "connected to peers" in log and "cuda pages of 2048 KiB" in log
        if graphs:
            assert "DWDP under CUDA graphs (FULL_AND_PIECEWISE)" in log, log[-3000:]
            assert "Graph capturing finished" in log, log[-3000:]
        elif not eager:
            assert "DWDP runs this engine without CUDA graphs" in log
    record_result(f"dwdp_e2e_{kind}" + ("_cuda_graphs" if graphs else ""), {
        "tokens_equal": True, "max_logprob_abs_diff": worst, "model": kind, "dtype": dtype,
        "dwdp_ranks": 2, "gpus_used": 2 if two else 1, "enforce_eager": eager,
        "cuda_graphs": "full_and_piecewise" if graphs else "none",
        "stats_rank0": ranks["rank0"]["dwdp_stats_after"],
    })


# gpt-oss MXFP4 (openai/gpt-oss checkpoint layout): 1 MiB of w13 per expert, 8 experts, so
# each rank stores 2 pages of every layer's w13 and pulls the other 2.
MXFP4_SHAPE = dict(hidden_size=1024, intermediate_size=1024)


@pytest.mark.gpu
def test_dwdp_mxfp4_ranks_match_stock_on_marlin(moe_checkpoint, tmp_path):
    """MXFP4 experts through vLLM's Marlin MXFP4 kernel (``moe_backend='marlin'``, stock
    too): its repacked experts stay one after another, so the ranks compose them. The gpt-oss
    loader hands every expert parameter all experts at once; each rank keeps its own run."""
    model = moe_checkpoint("gpt_oss_mxfp4", **MXFP4_SHAPE)
    stock, ranks, two = _run_ranks_and_stock(model, "bfloat16", tmp_path, eager=True,
                                             engine_kwargs={"moe_backend": "marlin"})
    pulled = _pulled_per_pass(ranks)
    assert pulled and all(b > 0 for b in pulled), pulled
    worst = 0.0
    for name, res in ranks.items():
        worst = max(worst, assert_outputs_equal(stock, res, names=("stock", name),
                                                logprob_atol=1e-4))
        log = open(res["log_path"]).read()
        assert "connected to peers" in log and "MARLIN" in log, log[-3000:]
    record_result("dwdp_e2e_gpt_oss_mxfp4_marlin", {
        "tokens_equal": True, "max_logprob_abs_diff": worst, "model": "gpt_oss_mxfp4",
        "dtype": "bfloat16", "moe_backend": "marlin", "dwdp_ranks": 2,
        "gpus_used": 2 if two else 1, "enforce_eager": True,
        "stats_rank0": ranks["rank0"]["dwdp_stats_after"]})


@pytest.mark.gpu
def test_dwdp_refuses_mxfp4_backend_without_per_expert_tensors(moe_checkpoint, tmp_path):
    """vLLM's default MXFP4 backend for gpt-oss on Hopper (triton_kernels) swizzles a layer's
    experts into one tensor: a DWDP rank stops while building the model, before any weight
    loads or any peer is contacted, naming the backend and the one that works."""
    model = moe_checkpoint("gpt_oss_mxfp4", **MXFP4_SHAPE)
    spec = dict(dwdp_spec(model, 0, 2, new_group(), peer_timeout_s=30), device="cuda",
                dtype="bfloat16", enforce_eager=True, engine_kwargs=ENGINE_KWARGS)
    spec["env"] = dict(spec["env"], **IN_PROCESS)
    started = start_engine(spec, tmp_path / "engines", "rank0")
    try:
        with pytest.raises(RuntimeError) as failed:
            wait_engine(*started, timeout=300)
    finally:
        kill_engine(started[0])
    log = started[2].read_text()
    assert "swizzles all of the layer's experts" in log, str(failed.value)[-3000:]
    assert "moe_backend='marlin'" in log
    assert "Loading weights took" not in log

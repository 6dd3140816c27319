"""FlexTensor on CUDA against stock vLLM: experts in pinned host memory (UVA), a GPU cache,
copies on a side stream ordered by CUDA events, the split-weight Triton kernel."""

from __future__ import annotations

import pytest

from tests.flextensor.engines import run_flextensor_engines
from tests.flextensor.test_flextensor_cpu import PROMPTS, check_homes, flex_spec, weights_of
from tests.harness.checkpoints import dequantise_block_fp8
from tests.harness.equality import (assert_fp8_as_accurate_as_stock, assert_outputs_equal,
                                    prompt_logprob_error)
from tests.harness.results import record_result
from vllm_flextensor.planner import budget_for_cache_slots, budget_for_dense_layers


@pytest.mark.gpu
@pytest.mark.parametrize("kind, dtype, eager, atol", [
    # Stock vLLM's fp32 MoE multiplies in tf32, and so does the split-weight kernel.
    ("qwen3_moe", "float32", False, 1e-2),  # compiled, CUDA graphs off (logged)
    ("qwen2_moe", "float32", True, 1e-2),
])
def test_offloaded_experts_match_stock_on_cuda(moe_checkpoint, kind, dtype, eager, atol):
    # Many experts: on CUDA the worker plans with the measured non-expert bytes, which differ
    # from the config estimate by about a MiB on these tiny models (a few expert slots).
    # A quarter of the experts cached (asked for) leaves room on both sides and still
    # offloads most of them: the two layer-sized stream buffers weigh as much as two layers.
    num_experts = 24 if kind == "qwen2_moe" else 32
    model = moe_checkpoint(kind, num_experts=num_experts)
    w = weights_of(model, dtype_bytes=4 if dtype == "float32" else 2)
    ask = num_experts // 4
    base = dict(model=model, prompts=PROMPTS, max_tokens=8, logprobs=5, device="cuda",
                dtype=dtype, engine_kwargs={"kv_cache_memory_bytes": 1 << 28})
    results = run_flextensor_engines({
        "stock": dict(base, env={"VLLM_PLUGINS": ""}),
        # The worker measures the non-expert bytes on CUDA (the estimate may differ by a few
        # small buffers), so the cache may come out a slot smaller than asked for.
        "flextensor": dict(flex_spec(model, budget_for_cache_slots(w, ask),
                                     prestage_next_layer=True), **{
            k: v for k, v in base.items() if k not in ("model", "prompts")},
            enforce_eager=eager),
    })
    assert_outputs_equal(results["stock"], results["flextensor"], logprob_atol=atol,
                         names=("stock", "flextensor"))
    stats = results["flextensor"]["flextensor_stats"]
    totals = stats["totals"]
    assert stats["mode"] == "copy"  # auto on a discrete GPU behind PCIe (H100, H200)
    assert 1 <= stats["plan"]["cache_slots"] <= num_experts // 2  # most experts offloaded
    check_homes(results["flextensor"])  # checkpoint -> host home -> cache, byte for byte
    assert totals["bytes_streamed"] > 0 and totals["expert_steps"] > 0
    assert totals["whole_layer_steps"] > 0
    assert totals["stream_ms"] > 0  # side-stream copies were timed by CUDA events
    assert totals["cache_lookups"] > totals["cache_hits"]  # decode read uncached experts in place
    # Decode layers copied the next layer's guessed experts on the side stream while they
    # computed (prestage_next_layer, set above); some were picked, and read where copied.
    assert 0 < totals["prestaged_used"] <= totals["experts_prestaged"]
    if stats["plan"]["cache_slots"]:
        assert totals["cache_hits"] > 0
    log = open(results["flextensor"]["log_path"]).read()
    if not eager:
        assert "FlexTensor runs this engine without CUDA graphs" in log


@pytest.mark.gpu
def test_offloaded_fp8_experts_equal_resident_and_are_as_accurate_as_stock(moe_checkpoint,
                                                                           tmp_path):
    """Block-FP8 experts (weights and scales) moved in their checkpoint dtype. Offloading
    must change nothing: 3 of 8 experts a layer cached, the rest streamed, gives exactly what
    every expert resident gives (same kernel). The kernel must be as accurate as stock
    vLLM's: prompt logprobs no farther from the bf16 truth (the checkpoint dequantised)."""
    model = moe_checkpoint("qwen3_moe_fp8")
    w = weights_of(model, dtype_bytes=2)
    base = dict(model=model, prompts=PROMPTS, max_tokens=8, logprobs=5, device="cuda",
                dtype="bfloat16", prompt_logprobs=True,
                engine_kwargs={"kv_cache_memory_bytes": 1 << 28})
    flex = {k: v for k, v in base.items() if k not in ("model", "prompts")}
    res = run_flextensor_engines({
        "stock": dict(base, env={"VLLM_PLUGINS": ""}),
        "truth": dict(base, model=str(dequantise_block_fp8(model, tmp_path / "bf16")),
                      env={"VLLM_PLUGINS": ""}),
        # every expert cached (a margin for the bytes the worker measures on CUDA)
        "resident": dict(flex_spec(model, budget_for_cache_slots(w, 8) + (64 << 20)), **flex),
        "offloaded": dict(flex_spec(model, budget_for_cache_slots(w, 3)), **flex),
    })
    assert res["resident"]["flextensor_stats"]["plan"]["cache_slots"] >= 8
    totals = res["offloaded"]["flextensor_stats"]["totals"]
    assert totals["bytes_streamed"] > 0 and totals["expert_steps"] > 0
    check_homes(res["offloaded"])  # fp8 weights and scales, byte for byte
    assert_outputs_equal(res["resident"], res["offloaded"], logprob_atol=1e-5,
                         names=("resident", "offloaded"))
    assert prompt_logprob_error(res["resident"], res["offloaded"])[1] <= 1e-5
    accuracy = assert_fp8_as_accurate_as_stock(res["truth"], res["stock"], res["offloaded"],
                                               "flextensor")
    record_result("flextensor_fp8_cuda", {"offloaded_equals_resident": True,
                                          "accuracy_vs_bf16_truth": accuracy,
                                          "plan": res["offloaded"]["flextensor_stats"]["plan"]})


# Layers big enough that a decoder layer's linears (12-36 MiB fp32, 9 MiB FP8) dwarf the
# difference between the estimated and the measured non-expert bytes (about a MiB).
BIG = dict(num_layers=6, hidden_size=1024, num_attention_heads=16, num_key_value_heads=8,
           head_dim=64, intermediate_size=2048)


# vLLM's block-FP8 linear on Hopper (FlashInferFp8DeepGEMMDynamicBlockScaledKernel) runs
# FlashInfer below 32 rows and DeepGEMM from 32, so a row's result depends on what shares
# its forward pass. With the engine core in its own process the first step takes whichever
# prompts have arrived (measured on an H100 with the engine core in its own process: the
# 8-token prompt 0.50 apart from its first token, the other two prompts bit-equal, as when
# one engine prefilled it alone; in-process, the two engines agreed to the bit). In-process, generate() queues every prompt before the first
# step. Start-up only: the DeepGEMM warm-up compiles
# ahead (4 minutes here; skipped, kernels compile on first use), and FlashInfer's top-k/top-p
# sampler compiles for about 2 minutes on a fresh machine (greedy sampling needs neither).
ONE_FIRST_BATCH = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_DEEP_GEMM_WARMUP": "skip",
                   "VLLM_USE_FLASHINFER_SAMPLER": "0"}


@pytest.mark.gpu
@pytest.mark.timeout(420)  # a fresh machine: about 3.5 minutes of engine start-up (FP8)
@pytest.mark.parametrize("kind, dtype, eager, depth, layers, streamed, atol", [
    # a dense model, compiled (the op is opaque to torch.compile), CUDA graphs off
    ("qwen3", "float32", False, 1, 4, [0, 1, 3, 4], 1e-2),
    # vLLM's block-FP8 linears (weights and weight_scale_inv) through the ring, 2 ahead:
    # vLLM's own kernels on the same bytes, batched alike, give the same bits (measured: 0)
    ("qwen3_fp8", "bfloat16", True, 2, 5, [0, 1, 2, 3, 4], 1e-6),
    # dense layers and routed experts both streamed (the MoE plan measures on CUDA)
    ("qwen3_moe", "float32", True, 1, 4, [0, 1, 3, 4], 1e-2),
])
def test_streamed_dense_layers_match_stock_on_cuda(moe_checkpoint, kind, dtype, eager, depth,
                                                   layers, streamed, atol):
    shape = dict(BIG, moe_intermediate_size=128, num_experts=16) if kind == "qwen3_moe" else BIG
    model = moe_checkpoint(kind, **shape)
    w = weights_of(model, dtype_bytes=4 if dtype == "float32" else 2)
    # Half a decoder layer above the budget that streams `layers` layers: still `layers`
    # (one fewer would need a whole layer more), and room for the measured bytes to differ.
    budget = budget_for_dense_layers(w, layers, depth) + w.decoder_linear_bytes[0] // 2
    base = dict(model=model, prompts=PROMPTS, max_tokens=8, logprobs=5, device="cuda",
                dtype=dtype, engine_kwargs={"kv_cache_memory_bytes": 1 << 28})
    results = run_flextensor_engines({
        "stock": dict(base, env=dict(ONE_FIRST_BATCH, VLLM_PLUGINS="")),
        "flextensor": dict(flex_spec(model, budget, dense_prefetch_depth=depth), **{
            k: v for k, v in base.items() if k not in ("model", "prompts")},
            enforce_eager=eager, env=ONE_FIRST_BATCH),
    })
    assert_outputs_equal(results["stock"], results["flextensor"], logprob_atol=atol,
                         names=("stock", "flextensor"))
    dense = results["flextensor"]["flextensor_stats"]["dense"]
    assert dense["plan"]["dense_layers"] == streamed
    assert dense["plan"]["ring_slots"] == depth + 1
    totals = dense["totals"]
    assert totals["copies"] == totals["forwards"] + depth  # the schedule CPU runs too
    assert totals["bytes_streamed"] >= totals["copies"] * w.decoder_linear_bytes[0] * 0.99
    assert totals["stream_ms"] > 0  # side-stream copies were timed by CUDA events
    log = open(results["flextensor"]["log_path"]).read()
    assert "FlexTensor dense streaming ready" in log
    if not eager:
        assert "FlexTensor runs this engine without CUDA graphs" in log
    if kind == "qwen3_moe":
        moe = results["flextensor"]["flextensor_stats"]["totals"]
        assert moe["bytes_streamed"] > 0 and moe["expert_steps"] > 0

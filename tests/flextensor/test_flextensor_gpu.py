"""FlexTensor on CUDA against stock vLLM: experts in pinned host memory (UVA), a GPU cache,
copies on a side stream ordered by CUDA events, the split-weight Triton kernel."""

from __future__ import annotations

import pytest

from tests.flextensor.engines import run_engines_in_turn
from tests.flextensor.test_flextensor_cpu import PROMPTS, check_homes, flex_spec, weights_of
from tests.harness.equality import assert_outputs_equal
from vllm_flextensor.planner import budget_for_cache_slots, budget_for_dense_layers


@pytest.mark.gpu
@pytest.mark.parametrize("kind, dtype, eager, atol", [
    # Stock vLLM's fp32 MoE multiplies in tf32, the split-weight kernel in exact fp32.
    ("qwen3_moe", "float32", False, 1e-2),  # compiled, CUDA graphs off (logged)
    ("qwen2_moe", "float32", True, 1e-2),
    ("qwen3_moe_fp8", "bfloat16", True, 5e-2),  # block-FP8 experts, weights + scales moved
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
    results = run_engines_in_turn({
        "stock": dict(base, env={"VLLM_PLUGINS": ""}),
        # The worker measures the non-expert bytes on CUDA (the estimate may differ by a few
        # small buffers), so the cache may come out a slot smaller than asked for.
        "flextensor": dict(flex_spec(model, budget_for_cache_slots(w, ask)), **{
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
    if stats["plan"]["cache_slots"]:
        assert totals["cache_hits"] > 0
    log = open(results["flextensor"]["log_path"]).read()
    if not eager:
        assert "FlexTensor runs this engine without CUDA graphs" in log


# Layers big enough that a decoder layer's linears (12-36 MiB fp32, 9 MiB FP8) dwarf the
# difference between the estimated and the measured non-expert bytes (about a MiB).
BIG = dict(num_layers=6, hidden_size=1024, num_attention_heads=16, num_key_value_heads=8,
           head_dim=64, intermediate_size=2048)


@pytest.mark.gpu
@pytest.mark.parametrize("kind, dtype, eager, depth, layers, streamed, atol", [
    # a dense model, compiled (the op is opaque to torch.compile), CUDA graphs off
    ("qwen3", "float32", False, 1, 4, [0, 1, 3, 4], 1e-2),
    # vLLM's block-FP8 linears (weights and weight_scale_inv) through the ring, 2 ahead
    ("qwen3_fp8", "bfloat16", True, 2, 5, [0, 1, 2, 3, 4], 5e-2),
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
    results = run_engines_in_turn({
        "stock": dict(base, env={"VLLM_PLUGINS": ""}),
        "flextensor": dict(flex_spec(model, budget, dense_prefetch_depth=depth), **{
            k: v for k, v in base.items() if k not in ("model", "prompts")},
            enforce_eager=eager),
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

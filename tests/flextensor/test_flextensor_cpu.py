"""FlexTensor end to end on CPU: real vLLM engines, real checkpoints, a budget that forces
offload. Placement, the expert cache and both streaming paths run as on CUDA; only the
bandwidth is not real. Stock vLLM runs the same checkpoint in its own process: greedy tokens
must be equal and logprobs close.

The module's engines start, two at a time, when its first test starts (``engines`` below,
through tests/harness/pool.py); each test then checks its own. A stock reference already run
this session (by the DWDP tests) is not run again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.flextensor.engines import module_engines, run_flextensor_engines
from tests.harness.equality import PROMPTS, assert_outputs_equal, stock_spec
from vllm_flextensor.planner import GiB, budget_for_cache_slots, estimate_model_weights

# PROMPTS: decode steps carry 3 tokens (routed to ~4.6 of 8 experts, below 75%): only the
# routed experts move. The prefill step (71 tokens) reaches every expert: whole layers move.


def weights_of(model: str, dtype_bytes: int = 4):
    cfg = json.loads((Path(model) / "config.json").read_text())
    return estimate_model_weights(cfg, dtype_bytes, cfg.get("quantization_config"))


def flex_spec(model, budget_bytes, **flex):
    return dict(model=model, prompts=PROMPTS, max_tokens=8, logprobs=5,
                additional_config={"flextensor": {
                    "enabled": True, "gpu_budget_gb": budget_bytes / GiB,
                    "stream_whole_layer_at": 0.75, "cache_refresh_steps": 2, **flex}})


def check_homes(result) -> None:
    """Every expert's host home holds the checkpoint's bytes, every cache slot its expert's."""
    homes = result["flextensor_homes"]
    assert homes, "no offloaded MoE layer reported"
    for layer, r in homes.items():
        assert r == {"experts_not_as_in_checkpoint": [], "cache_slots_not_as_home": []}, layer


def check_counters(stats, cache_slots, experts):
    plan, totals = stats["plan"], stats["totals"]
    assert plan["cache_slots"] == cache_slots and plan["experts_per_layer"] == experts
    assert totals["expert_steps"] > 0          # decode: only routed experts moved
    assert totals["whole_layer_steps"] > 0     # prefill: whole layers moved
    assert totals["bytes_streamed"] > 0
    assert totals["cache_hits"] > 0
    assert totals["cache_hits"] < totals["cache_lookups"]  # the cache is smaller than a step's needs
    assert all(s["forwards"] > 0 for s in stats["layers"])


# Each test's engines, by the spec builders below; the module fixture starts them all.


def offloaded_specs(moe_checkpoint, kind, cache_slots, prestage, **_):
    model = moe_checkpoint(kind)
    budget = budget_for_cache_slots(weights_of(model), cache_slots)
    return {"stock": stock_spec(model),
            "flextensor": flex_spec(model, budget, prestage_next_layer=prestage)}


def compiled_specs(moe_checkpoint, **_):
    model = moe_checkpoint("qwen3_moe", num_experts=32)
    budget = budget_for_cache_slots(weights_of(model), 4)
    return {"stock": dict(model=model, prompts=PROMPTS, max_tokens=4, logprobs=5,
                          enforce_eager=False, env={"VLLM_PLUGINS": ""}),
            "flextensor": dict(flex_spec(model, budget), max_tokens=4, enforce_eager=False,
                               compile_on_cpu=True)}


def unified_specs(moe_checkpoint, **_):
    model = moe_checkpoint("qwen3_moe")
    budget = budget_for_cache_slots(weights_of(model), 3, mode="unified")
    return {"stock": stock_spec(model), "unified": flex_spec(model, budget, mode="unified")}


def fp8_specs(moe_checkpoint, **_):
    model = moe_checkpoint("qwen3_moe_fp8")
    w = weights_of(model, dtype_bytes=2)
    # The reference: FlexTensor's own split-weight kernel with every expert cached on the
    # device (a budget of 8 cache slots a layer), so only the offloading differs.
    return {"all_resident": dict(flex_spec(model, budget_for_cache_slots(w, 8)), dtype="bfloat16"),
            "flextensor": dict(flex_spec(model, budget_for_cache_slots(w, 2)), dtype="bfloat16")}


def no_fit_specs(moe_checkpoint, flex, **_):
    model = moe_checkpoint("qwen3_moe")
    flex = {"gpu_budget_gb": budget_for_cache_slots(weights_of(model), 2) / GiB, **flex}
    return {"too_small": dict(model=model, prompts=PROMPTS, max_tokens=2,
                              additional_config={"flextensor": {"enabled": True, **flex}})}


engines = module_engines({
    "test_offloaded_experts_match_stock": offloaded_specs,
    "test_compiled_engine_matches_stock": compiled_specs,
    "test_unified_mode_reads_host_memory_in_place": unified_specs,
    "test_fp8_experts_move_in_checkpoint_dtype": fp8_specs,
    "test_plan_that_cannot_fit_stops_before_loading": no_fit_specs,
})


@pytest.mark.equality
@pytest.mark.parametrize("kind, cache_slots, experts, prestage", [
    # Decode steps copy the next layer's guessed experts while a layer computes.
    ("qwen3_moe", 2, 8, True),
    # With a shared expert (run by vLLM itself, resident); each decode layer copies only
    # after its own routing.
    ("qwen2_moe", 1, 6, False),
])
def test_offloaded_experts_match_stock(moe_checkpoint, engines, kind, cache_slots, experts,
                                       prestage):
    model = moe_checkpoint(kind)
    results = run_flextensor_engines(offloaded_specs(moe_checkpoint, kind, cache_slots,
                                                     prestage))
    assert_outputs_equal(results["stock"], results["flextensor"], names=("stock", "flextensor"))
    stats = results["flextensor"]["flextensor_stats"]
    check_counters(stats, cache_slots, experts)
    totals = stats["totals"]
    if prestage:
        # Guesses were staged, and some were what the router then picked: tokens equal to
        # stock's above means each was read from the buffer position it was copied to.
        assert totals["experts_prestaged"] > 0
        assert 0 < totals["prestaged_used"] <= totals["experts_prestaged"]
        # The first MoE layer of a pass has no layer before it to guess for it.
        assert stats["layers"][0]["experts_prestaged"] == 0
    else:
        assert totals["experts_prestaged"] == 0
    check_homes(results["flextensor"])
    # Every streamed byte is a whole expert's (weights of one expert, fp32).
    expert_bytes = weights_of(model).expert_bytes
    assert stats["plan"]["expert_bytes"] == expert_bytes
    assert stats["totals"]["bytes_streamed"] == stats["totals"]["experts_streamed"] * expert_bytes
    log = Path(results["flextensor"]["log_path"]).read_text()
    assert f"a cache of {cache_slots} of {experts} experts" in log
    assert "FlexTensor: staging experts" in log


def test_compiled_engine_matches_stock(moe_checkpoint, engines):
    """vLLM compiles the model and traces into the MoE layer's quant method: FlexTensor's
    stateful compute must stay outside the trace (one opaque op), or a step of another size
    than the traced one computes wrong. Both engines compile; 60-token prompt included."""
    results = run_flextensor_engines(compiled_specs(moe_checkpoint))
    assert_outputs_equal(results["stock"], results["flextensor"], names=("stock", "flextensor"))
    log = Path(results["flextensor"]["log_path"]).read_text()
    assert "Warming up model for the compilation" in log  # it did compile
    assert results["flextensor"]["flextensor_stats"]["totals"]["whole_layer_steps"] > 0


def test_unified_mode_reads_host_memory_in_place(moe_checkpoint, engines):
    """mode=unified (chosen automatically on GH200 / GB10): no stream buffers, the kernel
    reads uncached experts where they live; tokens equal stock."""
    results = run_flextensor_engines(unified_specs(moe_checkpoint))
    assert_outputs_equal(results["stock"], results["unified"], names=("stock", "unified"))
    stats = results["unified"]["flextensor_stats"]
    assert stats["mode"] == "unified" and stats["plan"]["stream_buffer_gib"] == 0
    check_counters(stats, 3, 8)


def test_fp8_experts_move_in_checkpoint_dtype(moe_checkpoint, engines):
    """Block-FP8 experts: weights (1 byte) and their float32 block scales are stored and
    streamed as the checkpoint has them. Stock vLLM has no FP8 MoE kernel on an AVX2 CPU, so
    the reference is FlexTensor with every expert cached (same kernel, nothing streamed)."""
    model = moe_checkpoint("qwen3_moe_fp8")
    w = weights_of(model, dtype_bytes=2)
    assert w.expert_bytes == 3 * 128 * 256 + 4 * (2 * 2 * 1 + 1 * 2)  # fp8 weights + scales
    results = run_flextensor_engines(fp8_specs(moe_checkpoint))
    assert_outputs_equal(results["all_resident"], results["flextensor"],
                         names=("all_resident", "flextensor"), logprob_atol=2e-2)
    stats = results["flextensor"]["flextensor_stats"]
    check_counters(stats, 2, 8)
    check_homes(results["flextensor"])
    assert stats["plan"]["expert_bytes"] == w.expert_bytes
    assert stats["totals"]["bytes_streamed"] == stats["totals"]["experts_streamed"] * w.expert_bytes


@pytest.mark.parametrize("flex, message", [
    ({"gpu_budget_gb": 0.0005}, "cannot hold what FlexTensor keeps on the GPU"),
    # a budget that fits, but host memory (with this headroom) cannot hold the experts
    ({"host_memory_headroom_gb": 1e6}, "of host memory for the routed"),
])
def test_plan_that_cannot_fit_stops_before_loading(moe_checkpoint, engines, flex, message):
    with pytest.raises(RuntimeError) as e:
        run_flextensor_engines(no_fit_specs(moe_checkpoint, flex), timeout=300)
    assert message in str(e.value)
    assert "FlexTensorPlanError" in str(e.value)
    assert "Loading weights" not in str(e.value) and "Model loading took" not in str(e.value)

"""Dense streaming end to end on CPU: real vLLM engines, real checkpoints, a budget below the
non-expert weights, so the linears (attention, dense MLP) of some decoder layers live in
host memory and pass through the GPU ring, a layer or two ahead. On CPU the copies are
synchronous but follow the CUDA schedule (same ring, same slots, same order). Stock vLLM
runs the same checkpoint in its own process: greedy tokens equal, logprobs close. The
module's engines start, two at a time, when its first test starts (``engines`` below).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.flextensor.engines import module_engines, run_flextensor_engines
from tests.flextensor.test_flextensor_cpu import PROMPTS, flex_spec, weights_of
from tests.harness.equality import assert_outputs_equal, stock_spec
from vllm_moe_core.config import PluginConfigError
from vllm_moe_core.config import parse_flextensor_config
from vllm_flextensor.planner import GiB, budget_for_dense_layers


def streamed_specs(moe_checkpoint, kind, layers, depth, **_):
    model = moe_checkpoint(kind, num_layers=6)
    budget = budget_for_dense_layers(weights_of(model), layers, depth)
    return {"stock": stock_spec(model),
            "flextensor": flex_spec(model, budget, dense_prefetch_depth=depth)}


def too_small_specs(moe_checkpoint, **_):
    model = moe_checkpoint("qwen3", num_layers=6)
    too_small = budget_for_dense_layers(weights_of(model), 6, 1) - 1
    return {"too_small": dict(model=model, prompts=PROMPTS, max_tokens=2, additional_config={
        "flextensor": {"enabled": True, "gpu_budget_gb": too_small / GiB}})}


engines = module_engines({
    "test_streamed_dense_layers_match_stock": streamed_specs,
    "test_budget_below_full_dense_streaming_stops_before_loading": too_small_specs,
})


@pytest.mark.equality
@pytest.mark.parametrize("kind, layers, depth, streamed", [
    # routed experts streamed too (no cache slot left); layers 2 and 5 stay on the GPU
    ("qwen3_moe", 4, 1, [0, 1, 3, 4]),
    # a dense model; a ring of 3 for 5 layers: the slots rotate from one pass to the next
    ("qwen3", 5, 2, [0, 1, 2, 3, 4]),
])
def test_streamed_dense_layers_match_stock(moe_checkpoint, engines, kind, layers, depth,
                                           streamed):
    model = moe_checkpoint(kind, num_layers=6)
    w = weights_of(model)
    results = run_flextensor_engines(streamed_specs(moe_checkpoint, kind, layers, depth))
    assert_outputs_equal(results["stock"], results["flextensor"], names=("stock", "flextensor"))
    stats = results["flextensor"]["flextensor_stats"]
    dense = stats["dense"]
    layer_bytes = w.decoder_linear_bytes[0]  # every decoder layer's linears, fp32
    assert dense["plan"]["dense_layers"] == streamed
    assert dense["plan"]["ring_slots"] == depth + 1
    assert dense["plan"]["streamed_bytes"] == layers * layer_bytes
    assert dense["plan"]["linears"] == layers * (2 if kind == "qwen3_moe" else 4)
    assert [s["layer"] for s in dense["layers"]] == [f"model.layers.{i}" for i in streamed]
    for s in dense["layers"]:
        assert s["forwards"] > 0
        assert s["bytes_streamed"] == s["copies"] * layer_bytes
    # The ring is smaller than the streamed layers, so every visit copies its layer in; the
    # last pass also prefetched the first `depth` layers of a pass that never came.
    totals = dense["totals"]
    assert totals["copies"] == totals["forwards"] + depth
    assert totals["bytes_streamed"] == totals["copies"] * layer_bytes > 0
    log = Path(results["flextensor"]["log_path"]).read_text()
    assert f"of {layers} of 6 decoder layers (layers {', '.join(map(str, streamed))}" in log
    assert "FlexTensor dense streaming ready" in log
    if kind == "qwen3_moe":
        plan, moe = stats["plan"], stats["totals"]
        assert plan["cache_slots"] == 0 and plan["experts_per_layer"] == 8
        assert moe["expert_steps"] > 0 and moe["whole_layer_steps"] > 0
        assert moe["bytes_streamed"] == moe["experts_streamed"] * w.expert_bytes > 0
    else:
        assert "plan" not in stats  # no MoE layer, no expert runtime


def test_budget_below_full_dense_streaming_stops_before_loading(moe_checkpoint, engines):
    with pytest.raises(RuntimeError) as e:
        run_flextensor_engines(too_small_specs(moe_checkpoint), timeout=300)
    msg = str(e.value)
    assert "FlexTensorPlanError" in msg
    assert "even with the linear weights of all 6 decoder layers streamed" in msg
    assert "Loading weights" not in msg and "Model loading took" not in msg


def test_prefetch_depth_is_at_least_one():
    assert parse_flextensor_config({"flextensor": {}}).dense_prefetch_depth == 1
    with pytest.raises(PluginConfigError,
                       match=r"additional_config.flextensor.dense_prefetch_depth: Input should be "
                             r"greater than or equal to 1, got 0"):
        parse_flextensor_config({"flextensor": {"dense_prefetch_depth": 0}})

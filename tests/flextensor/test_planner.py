"""The placement plan: sizes from a model config, cache slots under a budget, clear refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vllm_flextensor.planner import (GiB, FlexTensorPlanError, ModelWeights,
                                     budget_for_cache_slots, estimate_model_weights,
                                     expected_distinct_experts, moe_layer_ids, plan_offload,
                                     whole_layer_min_tokens)

REPO = Path(__file__).resolve().parents[2]
EXPERT_KEY = re.compile(r"\.mlp\.experts\.\d+\.")


def checkpoint_bytes(path: str) -> tuple[int, int]:
    """(non-expert bytes, routed-expert bytes) of a safetensors checkpoint, from its header."""
    dense = experts = 0
    for f in Path(path).glob("*.safetensors"):
        raw = f.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            if EXPERT_KEY.search(name):
                experts += b - a
            else:
                dense += b - a
    return dense, experts


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe"])
def test_estimate_matches_the_checkpoint(moe_checkpoint, kind):
    path = moe_checkpoint(kind)
    cfg = json.loads((Path(path) / "config.json").read_text())
    w = estimate_model_weights(cfg, dtype_bytes=4)  # the tiny checkpoints are fp32
    dense, experts = checkpoint_bytes(path)
    assert w.routed_bytes == experts
    assert w.dense_bytes == dense


def test_qwen3_30b_shape():
    cfg = json.loads((REPO / "examples/configs/qwen3_30b_a3b.json").read_text())
    w = estimate_model_weights(cfg, dtype_bytes=2)
    assert (w.moe_layers, w.experts_per_layer, w.top_k) == (48, 128, 8)
    assert w.expert_bytes == 3 * 2048 * 768 * 2
    assert w.routed_bytes == 48 * 128 * w.expert_bytes  # 54 GiB
    assert 2 * GiB < w.dense_bytes < 3 * GiB


def test_fp8_block_experts_count_weights_and_scales():
    cfg = json.loads((REPO / "examples/configs/qwen3_30b_a3b.json").read_text())
    w = estimate_model_weights(cfg, 2, {"quant_method": "fp8", "weight_block_size": [128, 128]})
    assert w.expert_bytes == 3 * 2048 * 768 + 4 * (12 * 16 + 16 * 6)


def test_moe_layer_selection():
    assert moe_layer_ids({"num_hidden_layers": 4, "decoder_sparse_step": 2}) == [1, 3]
    assert moe_layer_ids({"num_hidden_layers": 4, "mlp_only_layers": [0]}) == [1, 2, 3]
    assert moe_layer_ids({"num_hidden_layers": 4, "first_k_dense_replace": 1}) == [1, 2, 3]


W = ModelWeights(dense_bytes=10 << 20, moe_layers=32, experts_per_layer=8,
                 expert_bytes=1 << 20, top_k=2)


@pytest.mark.parametrize("slots", [0, 1, 5, 7])
def test_budget_for_slots_gives_those_slots(slots):
    budget = budget_for_cache_slots(W, slots)
    assert plan_offload(W, budget).cache_slots == slots
    if slots:
        assert plan_offload(W, budget - 1).cache_slots == slots - 1
    plan = plan_offload(W, budget)
    assert plan.gpu_bytes == budget and plan.stream_bytes == 2 * 8 << 20
    assert plan.host_bytes == W.routed_bytes


def test_budget_holding_everything_offloads_nothing():
    plan = plan_offload(W, W.dense_bytes + W.routed_bytes)
    assert plan.offloads_nothing and plan.stream_buffers == 0 and plan.host_bytes == 0
    assert "nothing is offloaded" in plan.describe()


def test_unified_mode_needs_no_stream_buffers():
    plan = plan_offload(W, budget_for_cache_slots(W, 3, mode="unified"), mode="unified")
    assert (plan.cache_slots, plan.stream_bytes) == (3, 0)
    assert "read in place" in plan.describe()


def test_too_small_budget_says_what_to_raise_it_to():
    with pytest.raises(FlexTensorPlanError) as e:
        plan_offload(W, W.dense_bytes)
    msg = str(e.value)
    assert "cannot hold what FlexTensor keeps on the GPU" in msg
    suggested = float(re.search(r"Raise gpu_budget_gb to at least ([\d.]+)", msg).group(1))
    assert plan_offload(W, int(suggested * GiB)).cache_slots == 0


def test_host_memory_short_is_refused():
    budget = budget_for_cache_slots(W, 2)
    with pytest.raises(FlexTensorPlanError, match="of host memory for the routed experts"):
        plan_offload(W, budget, host_available_bytes=W.routed_bytes, headroom_bytes=1)
    plan_offload(W, budget, host_available_bytes=W.routed_bytes + 1, headroom_bytes=1)


def test_model_without_experts_is_refused():
    with pytest.raises(FlexTensorPlanError, match="has none"):
        plan_offload(ModelWeights(1, 0, 0, 0, 1), 10)


def test_whole_layer_threshold():
    # Qwen3-30B-A3B, 50%: batch 8 routes to ~51 of 128 experts (per expert), 64 to all.
    t = whole_layer_min_tokens(128, 8, 0.5)
    assert 8 < t < 64
    assert expected_distinct_experts(t, 128, 8) >= 64 > expected_distinct_experts(t - 1, 128, 8)
    assert whole_layer_min_tokens(8, 2, 0.75) == 5
    assert whole_layer_min_tokens(8, 2, 0.0) == 0

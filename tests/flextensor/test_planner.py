"""The placement plan: sizes from a model config, cache slots under a budget, clear refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vllm_flextensor.planner import (GiB, FlexTensorPlanError, ModelWeights,
                                     plan_experts_beside_dense_streaming,
                                     budget_for_cache_slots, budget_for_dense_layers,
                                     estimate_model_weights, expected_distinct_experts,
                                     moe_layer_ids, plan_offload, whole_layer_min_tokens)

REPO = Path(__file__).resolve().parents[2]
EXPERT_KEY = re.compile(r"\.mlp\.experts\.\d+\.")
# What dense streaming moves: attention projections, dense MLP, shared expert (not biases).
LINEAR_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|"
                        r"mlp\.(shared_expert\.)?(gate|up|down)_proj)\.weight$")


def checkpoint_bytes(path: str) -> tuple[int, int, dict[int, int]]:
    """(non-expert bytes, routed-expert bytes, streamable linear bytes per decoder layer) of
    a safetensors checkpoint, from its header."""
    dense = experts = 0
    linears: dict[int, int] = {}
    for f in Path(path).glob("*.safetensors"):
        raw = f.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            if EXPERT_KEY.search(name):
                experts += b - a
                continue
            dense += b - a
            m = LINEAR_KEY.match(name)
            if m:
                linears[int(m.group(1))] = linears.get(int(m.group(1)), 0) + b - a
    return dense, experts, linears


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe", "qwen3"])
def test_estimate_matches_the_checkpoint(moe_checkpoint, kind):
    path = moe_checkpoint(kind)
    cfg = json.loads((Path(path) / "config.json").read_text())
    w = estimate_model_weights(cfg, dtype_bytes=4)  # the tiny checkpoints are fp32
    dense, experts, linears = checkpoint_bytes(path)
    assert w.routed_bytes == experts
    assert w.dense_bytes == dense
    assert w.decoder_linear_bytes == tuple(linears[i] for i in range(cfg["num_hidden_layers"]))
    assert (w.moe_layers == 0) == (kind == "qwen3")


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


# ---- dense streaming ------------------------------------------------------------------------
# 8 decoder layers of 3 MiB linears each, 4 MiB that always stays (embeddings, norms, ...).
LAYERS = (3 << 20,) * 8
WD = ModelWeights(dense_bytes=(4 << 20) + sum(LAYERS), moe_layers=8, experts_per_layer=8,
                  expert_bytes=1 << 20, top_k=2, decoder_linear_bytes=LAYERS)
DENSE = ModelWeights((4 << 20) + sum(LAYERS), 0, 0, 0, 1, decoder_linear_bytes=LAYERS)


def test_experts_go_first_and_dense_layers_only_below_zero_cache_slots():
    plan = plan_offload(WD, budget_for_cache_slots(WD, 0))
    assert plan.cache_slots == 0 and plan.dense_layers == () and plan.dense_ring_bytes == 0
    plan = plan_offload(WD, budget_for_cache_slots(WD, 0) - 1)
    assert plan.dense_layers and plan.cache_slots == 0


@pytest.mark.parametrize("weights", [WD, DENSE], ids=["moe", "dense"])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("layers", [4, 6, 8])
def test_fewest_decoder_layers_are_streamed(weights, depth, layers):
    budget = budget_for_dense_layers(weights, layers, depth)
    plan = plan_offload(weights, budget, dense_prefetch_depth=depth)
    assert len(plan.dense_layers) == layers and plan.dense_ring_slots == depth + 1
    assert plan.gpu_bytes <= budget
    assert plan.dense_slot_bytes == 3 << 20 and plan.dense_ring_bytes == (depth + 1) * (3 << 20)
    assert plan.resident_dense_bytes == weights.dense_bytes - layers * (3 << 20)
    buffers = 2 * weights.layer_bytes
    assert plan.stream_bytes == buffers and plan.cache_slots == 0
    assert plan.host_bytes == weights.routed_bytes + layers * (3 << 20)
    if layers < 8:  # a byte less: one more layer
        assert len(plan_offload(weights, budget - 1, dense_prefetch_depth=depth)
                   .dense_layers) == layers + 1
    text = plan.describe()
    assert f"of {layers} of 8 decoder layers" in text
    assert f"streamed {depth} layer" in text and f"ring of {depth + 1} GPU buffers" in text
    assert ("routed experts: a cache of 0 of 8 experts" in text) == (weights is WD)


def test_streamed_layers_are_spread_over_the_model():
    """Equal layers: evenly spaced, so each copy hides behind the layers in between."""
    plan = plan_offload(DENSE, budget_for_dense_layers(DENSE, 4))
    assert plan.dense_layers == (0, 2, 4, 6)


def test_largest_layers_are_streamed_first():
    """DeepSeek-like: dense-MLP layers first, then attention-only MoE layers."""
    sizes = (8 << 20, 8 << 20, 8 << 20) + (2 << 20,) * 5
    w = ModelWeights((4 << 20) + sum(sizes), 0, 0, 0, 1, decoder_linear_bytes=sizes)
    plan = plan_offload(w, w.dense_bytes - (8 << 20))
    assert plan.dense_layers == (0, 1, 2) and plan.dense_slot_bytes == 8 << 20


def test_dense_model_that_fits_offloads_nothing():
    plan = plan_offload(DENSE, DENSE.dense_bytes)
    assert plan.offloads_nothing and plan.host_bytes == 0 and plan.gpu_bytes == DENSE.dense_bytes
    assert "nothing is offloaded" in plan.describe()


@pytest.mark.parametrize("weights", [WD, DENSE], ids=["moe", "dense"])
def test_budget_below_full_dense_streaming_says_what_to_raise_it_to(weights):
    with pytest.raises(FlexTensorPlanError) as e:
        plan_offload(weights, 8 << 20)
    msg = str(e.value)
    assert "additional_config.flextensor.gpu_budget_gb=" in msg
    assert "even with the linear weights of all 8 decoder layers streamed" in msg
    assert "dense_prefetch_depth=1" in msg
    suggested = float(re.search(r"Raise gpu_budget_gb to at least ([\d.]+)", msg).group(1))
    plan = plan_offload(weights, int(suggested * GiB))
    assert len(plan.dense_layers) == 8


def test_deep_prefetch_refusal_offers_a_shallower_ring():
    budget = budget_for_dense_layers(DENSE, 8, depth=1)
    with pytest.raises(FlexTensorPlanError) as e:
        plan_offload(DENSE, budget, dense_prefetch_depth=3)
    msg = str(e.value)
    assert "lower additional_config.flextensor.dense_prefetch_depth=3 to 1" in msg
    assert plan_offload(DENSE, budget, dense_prefetch_depth=1).dense_ring_slots == 2


def test_model_without_streamable_layers_is_refused_as_before():
    with pytest.raises(FlexTensorPlanError, match="no linear weights FlexTensor can stream"):
        plan_offload(ModelWeights(100, 0, 0, 0, 1), 10)


@pytest.mark.parametrize("weights", [WD, DENSE], ids=["moe", "dense"])
def test_host_memory_short_of_streamed_layers_is_refused(weights):
    budget = budget_for_dense_layers(weights, 4)
    plan = plan_offload(weights, budget)
    with pytest.raises(FlexTensorPlanError) as e:
        plan_offload(weights, budget, host_available_bytes=plan.host_bytes, headroom_bytes=1)
    msg = str(e.value)
    assert "of host memory for the linear weights of 4 streamed decoder layers" in msg
    assert ("for the routed experts' home" in msg) == (weights is WD)
    assert "host_memory_headroom_gb" in msg and "gpu_budget_gb" in msg
    plan_offload(weights, budget, host_available_bytes=plan.host_bytes + 1, headroom_bytes=1)


def test_whole_layer_threshold():
    # Qwen3-30B-A3B, 50%: batch 8 routes to ~51 of 128 experts (per expert), 64 to all.
    t = whole_layer_min_tokens(128, 8, 0.5)
    assert 8 < t < 64
    assert expected_distinct_experts(t, 128, 8) >= 64 > expected_distinct_experts(t - 1, 128, 8)
    assert whole_layer_min_tokens(8, 2, 0.75) == 5
    assert whole_layer_min_tokens(8, 2, 0.0) == 0


def test_experts_beside_streamed_dense_layers_never_replan_them():
    """Once dense layers stream (planned from the config's estimate), the experts' plan
    takes the measured non-expert bytes as they are: cache slots from what is left, none
    and the overshoot reported where the measurement exceeds the budget (on CUDA, a few
    MiB of buffers the estimate does not know)."""
    layer = W.layer_bytes
    roomy = W.dense_bytes + 2 * layer + 3 * W.moe_layers * W.expert_bytes + 5
    plan, over = plan_experts_beside_dense_streaming(W, roomy, "copy")
    assert (plan.cache_slots, plan.stream_buffers, plan.dense_layers, over) == (3, 2, (), 0)
    short = W.dense_bytes + 2 * layer - (3 << 20)
    plan, over = plan_experts_beside_dense_streaming(W, short, "copy")
    assert (plan.cache_slots, plan.stream_buffers, over) == (0, 2, 3 << 20)
    with pytest.raises(FlexTensorPlanError):  # what the general planner does with it
        plan_offload(W, short, "copy")
    plan, over = plan_experts_beside_dense_streaming(W, W.dense_bytes, "unified")
    assert (plan.stream_buffers, over) == (0, 0)  # unified mode reads in place: no buffers

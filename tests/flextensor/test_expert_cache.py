"""The frequency-aware expert cache policy and the stream copies, without an engine."""

from __future__ import annotations

import torch

from vllm_flextensor.expert_cache import ExpertCachePolicy
from vllm_flextensor.moe_layer import LayerStats
from vllm_flextensor.streaming import ExpertStreamer, coalesce


def step(policy, experts):
    policy.record(experts)
    hits, misses = policy.lookup(experts)
    policy.admit(misses, in_use=set(hits))
    return hits, misses


def test_hot_experts_settle_in_the_cache_and_stop_moving():
    policy = ExpertCachePolicy(num_experts=8, num_slots=2, decay=0.9)
    for _ in range(3):
        step(policy, [5, 6])
    assert set(policy.slot_of) == {5, 6}
    hits, misses = step(policy, [5, 6])
    assert set(hits) == {5, 6} and misses == []


def test_a_one_off_pick_does_not_evict_a_hot_expert():
    policy = ExpertCachePolicy(num_experts=8, num_slots=2, decay=0.95)
    for _ in range(5):
        step(policy, [3, 4])
    _, misses = step(policy, [7])
    assert misses == [7] and set(policy.slot_of) == {3, 4}


def test_routing_that_shifts_takes_over_the_cache():
    policy = ExpertCachePolicy(num_experts=8, num_slots=2, decay=0.5)
    for _ in range(5):
        step(policy, [3, 4])
    for _ in range(4):
        step(policy, [1, 2])
    assert set(policy.slot_of) == {1, 2}


def test_experts_in_use_this_step_are_not_evicted():
    policy = ExpertCachePolicy(num_experts=4, num_slots=2, decay=1.0)
    policy.record([2, 2, 2, 3])  # 2 is very hot, not cached; 0 and 1 are cached and cold
    moves = policy.admit([2], in_use={0, 1})
    assert moves == []
    moves = policy.admit([2], in_use={0})
    assert moves == [(2, 1)] and policy.slot_of == {0: 0, 2: 1}


def test_margin_keeps_near_equal_experts_and_limit_bounds_moves():
    policy = ExpertCachePolicy(num_experts=6, num_slots=2, decay=1.0)
    policy.record([0, 1, 2, 3, 4, 5], [10, 10, 11, 30, 40, 50])  # 0, 1 cached
    assert policy.admit([2], in_use=set(), margin=0.25) == []    # 11 vs 10: not worth a copy
    moves = policy.admit([3, 4, 5], in_use=set(), margin=0.25, limit=1)
    assert moves == [(5, 0)] and set(policy.slot_of) == {1, 5}  # hottest first, one move


def test_slot_map_points_at_cache_or_stream_buffer():
    policy = ExpertCachePolicy(num_experts=5, num_slots=2)
    assert policy.slot_map({3: 0, 4: 1}, stream_offset=2) == [0, 1, -1, 2, 3]


def test_coalesce_runs():
    assert coalesce([1, 2, 3, 6, 8, 9]) == [(1, 0, 3), (6, 3, 1), (8, 4, 2)]
    assert coalesce([]) == []
    # Behind experts already in the buffer (pre-staged ones at positions 0 and 1).
    assert coalesce([2, 3, 7], first_position=2) == [(2, 2, 2), (7, 4, 1)]


def test_streamer_copies_runs_and_counts_bytes():
    host = {"w13_weight": torch.randn(6, 4, 3), "w2_weight_scale_inv": torch.randn(6, 2)}
    s = ExpertStreamer(host, 6, torch.device("cpu"))
    st = LayerStats()
    moved = s.stream_runs(1, host, coalesce([0, 4, 5]), st)
    for name, t in host.items():
        assert torch.equal(s.buffers[1][name][:3], t[[0, 4, 5]])
    per_expert = 4 * 3 * 4 + 2 * 4
    assert moved == st.bytes_streamed == 3 * per_expert

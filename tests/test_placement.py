"""Expert placement: every expert stored exactly once, local + remote = all, pulls coalesced."""

from __future__ import annotations

import pytest

from vllm_dwdp.placement import plan_placement
from vllm_dwdp.plugin_config import PluginConfigError


@pytest.mark.parametrize("num_experts, world_size", [(8, 2), (7, 2), (128, 4), (10, 3), (60, 8)])
@pytest.mark.parametrize("placement", ["contiguous", "round_robin"])
@pytest.mark.parametrize("replication", [0.0, 0.3, 1.0])
def test_every_expert_reachable_exactly_once(num_experts, world_size, placement, replication):
    plans = [plan_placement(num_experts, world_size, r, placement=placement,
                            replication=replication) for r in range(world_size)]
    owned = sorted(e for p in plans for e in p.owned_by(p.rank))
    assert owned == list(range(num_experts))  # stored once in the cluster
    for p in plans:
        assert sorted(p.local_experts + p.remote_experts) == list(range(num_experts))
        assert not set(p.local_experts) & set(p.remote_experts)
        # Pull runs tile the receive buffer and read real owner slots.
        covered = []
        for run in p.pulls:
            owner_slots = plans[run.owner].owned_by(run.owner)
            for k in range(run.count):
                assert p.remote_experts[run.dst_start + k] == owner_slots[run.src_start + k]
                covered.append(run.dst_start + k)
        assert covered == list(range(len(p.remote_experts)))
    sizes = [p.num_owned for p in plans]
    assert max(sizes) - min(sizes) <= 1  # uneven expert counts split as evenly as possible
    if replication == 1.0:
        assert all(not p.remote_experts for p in plans)


def test_contiguous_pulls_are_one_run_per_peer():
    p = plan_placement(128, 4, 1)
    assert [(r.owner, r.count) for r in p.pulls] == [(0, 32), (2, 32), (3, 32)]
    assert p.local_experts == tuple(range(32, 64))


def test_explicit_owners_and_their_errors():
    p = plan_placement(4, 2, 0, expert_owners=[1, 0, 0, 1])
    assert p.local_experts == (1, 2) and p.remote_experts == (0, 3)
    with pytest.raises(PluginConfigError, match="lists 3 owners but the model has 4 experts"):
        plan_placement(4, 2, 0, expert_owners=[0, 1, 1])
    with pytest.raises(PluginConfigError, match=r"DWDP ranks \[2\] would own no expert"):
        plan_placement(2, 3, 0)

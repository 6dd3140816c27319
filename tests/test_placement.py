"""Expert placement: each rank stores one run of experts, every expert stored exactly once."""

from __future__ import annotations

import pytest

from vllm_dwdp.placement import plan_placement
from vllm_moe_core.config import PluginConfigError


@pytest.mark.parametrize("num_experts, world_size", [(8, 2), (7, 2), (128, 4), (10, 3), (60, 8)])
def test_every_expert_stored_exactly_once(num_experts, world_size):
    plans = [plan_placement(num_experts, world_size, r) for r in range(world_size)]
    owned = sorted(e for p in plans for e in p.local_experts)
    assert owned == list(range(num_experts))
    for p in plans:
        assert sorted(p.local_experts + p.remote_experts) == list(range(num_experts))
        assert all(p.owner_of(e) == p.rank for e in p.local_experts)
    sizes = [p.num_owned for p in plans]
    assert max(sizes) - min(sizes) <= 1  # uneven expert counts split as evenly as possible


def test_explicit_owners_and_their_errors():
    p = plan_placement(5, 2, 0, expert_owners=[1, 1, 0, 0, 0])
    assert p.local_experts == (2, 3, 4) and p.remote_experts == (0, 1)
    assert p.owner_of(0) == 1
    with pytest.raises(PluginConfigError, match="lists 3 owners but the model has 4 experts"):
        plan_placement(4, 2, 0, expert_owners=[0, 1, 1])
    with pytest.raises(PluginConfigError, match=r"rank 0 experts \[0, 2\], which are not one run"):
        plan_placement(4, 2, 0, expert_owners=[0, 1, 0, 1])
    with pytest.raises(PluginConfigError, match="gives DWDP rank 1 no expert"):
        plan_placement(3, 2, 0, expert_owners=[0, 0, 0])
    with pytest.raises(PluginConfigError, match="3 DWDP ranks cannot split 2 experts"):
        plan_placement(2, 3, 0)

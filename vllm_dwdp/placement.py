"""Which rank owns which expert, what each rank keeps locally, and what it pulls.

Pure bookkeeping, the same for every MoE layer of a model: no vLLM, no devices.

- *owned* experts are stored once in the cluster, by their owner rank, and exported to peers.
- *local* experts are owned ones plus replicas (``replication`` of the remote experts, copied
  from the checkpoint at load time); they are used in place.
- *remote* experts are pulled into a receive buffer before each layer runs. A pull copies
  runs of experts that are contiguous both in the owner's storage and in the buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vllm_dwdp.plugin_config import PluginConfigError


@dataclass(frozen=True)
class PullRun:
    """Copy ``count`` experts from ``owner``'s slots ``src_start..`` into receive slots ``dst_start..``."""

    owner: int
    src_start: int
    dst_start: int
    count: int


@dataclass(frozen=True)
class ExpertPlacement:
    num_experts: int
    world_size: int
    rank: int
    owners: tuple[int, ...]            # owner rank of each global expert id
    local_experts: tuple[int, ...]     # global ids stored here: owned first, then replicas
    remote_experts: tuple[int, ...]    # global ids pulled each step, in receive-slot order
    pulls: tuple[PullRun, ...]

    @property
    def num_owned(self) -> int:
        return sum(1 for o in self.owners if o == self.rank)

    def owned_by(self, rank: int) -> tuple[int, ...]:
        """Global ids stored (and exported) by ``rank``, in that rank's slot order."""
        return tuple(e for e, o in enumerate(self.owners) if o == rank)

    def local_slot(self) -> dict[int, int]:
        return {e: i for i, e in enumerate(self.local_experts)}

    def remote_slot(self) -> dict[int, int]:
        return {e: i for i, e in enumerate(self.remote_experts)}



def _owners(num_experts: int, world_size: int, placement: str,
            explicit: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    if explicit:
        if len(explicit) != num_experts:
            raise PluginConfigError(
                f"additional_config.dwdp.expert_owners lists {len(explicit)} owners but the model "
                f"has {num_experts} experts per MoE layer; give one owner rank per expert"
            )
        owners = tuple(explicit)
    elif placement == "contiguous":
        # Uneven counts allowed: the first (num_experts % world_size) ranks own one more.
        base, extra = divmod(num_experts, world_size)
        owners = tuple(r for r in range(world_size) for _ in range(base + (r < extra)))
    elif placement == "round_robin":
        owners = tuple(e % world_size for e in range(num_experts))
    else:
        raise PluginConfigError(f"unknown expert placement {placement!r}")
    empty = sorted(set(range(world_size)) - set(owners))
    if empty:
        raise PluginConfigError(
            f"DWDP ranks {empty} would own no expert ({num_experts} experts over {world_size} "
            f"ranks); use fewer ranks or give each rank at least one expert in expert_owners"
        )
    return owners


def plan_placement(num_experts: int, world_size: int, rank: int, *, placement: str = "contiguous",
                   expert_owners: list[int] | tuple[int, ...] = (),
                   replication: float = 0.0) -> ExpertPlacement:
    if not 0 <= rank < world_size:
        raise PluginConfigError(f"DWDP rank {rank} is outside 0 .. {world_size - 1}")
    owners = _owners(num_experts, world_size, placement, expert_owners)
    owned = [e for e in range(num_experts) if owners[e] == rank]
    others = [e for e in range(num_experts) if owners[e] != rank]
    # Replicas: spread over the owners so each peer's link carries a similar share of the
    # remaining pulls. Order the candidates by their position within their owner's shard.
    position = {e: i for r in range(world_size) for i, e in
                enumerate(x for x in range(num_experts) if owners[x] == r)}
    by_spread = sorted(others, key=lambda e: (position[e], (owners[e] - rank) % world_size))
    n_replicas = math.floor(replication * len(others) + 1e-9)
    replicas = sorted(by_spread[:n_replicas])
    # Receive slots grouped by owner, in the owner's slot order: few, long copy runs.
    remote = sorted(set(others) - set(replicas), key=lambda e: (owners[e], position[e]))
    pulls: list[PullRun] = []
    for dst, e in enumerate(remote):
        src = position[e]
        last = pulls[-1] if pulls else None
        if (last is not None and last.owner == owners[e]
                and last.src_start + last.count == src and last.dst_start + last.count == dst):
            pulls[-1] = PullRun(last.owner, last.src_start, last.dst_start, last.count + 1)
        else:
            pulls.append(PullRun(owners[e], src, dst, 1))
    return ExpertPlacement(
        num_experts=num_experts, world_size=world_size, rank=rank, owners=owners,
        local_experts=tuple(owned + replicas), remote_experts=tuple(remote), pulls=tuple(pulls),
    )


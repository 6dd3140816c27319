"""Which rank stores which experts, and which it pulls.

Pure bookkeeping, the same for every MoE layer of a model: no vLLM, no devices. Each rank stores
one contiguous run ``[first, last)`` of expert ids (composite expert memory keeps experts in
global order, ``expert_pages.py``); by default the runs are as even as possible, the first
``E % N`` ranks holding one more. ``expert_owners`` may name every expert's rank instead, as long
as each rank's experts are one run (uneven splits, or a rank order other than ascending).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_moe_core.config import PluginConfigError, owner_runs


@dataclass(frozen=True)
class ExpertPlacement:
    num_experts: int
    world_size: int
    rank: int
    spans: tuple[tuple[int, int], ...]   # [first, last) of every rank

    @property
    def first(self) -> int:
        return self.spans[self.rank][0]

    @property
    def last(self) -> int:
        return self.spans[self.rank][1]

    @property
    def local_experts(self) -> tuple[int, ...]:
        return tuple(range(self.first, self.last))

    @property
    def remote_experts(self) -> tuple[int, ...]:
        return tuple(e for e in range(self.num_experts) if not self.first <= e < self.last)

    @property
    def num_owned(self) -> int:
        return self.last - self.first

    def owner_of(self, expert: int) -> int:
        return next(r for r, (a, b) in enumerate(self.spans) if a <= expert < b)


def owner_spans(num_experts: int, world_size: int,
                expert_owners: list[int] | tuple[int, ...] = ()) -> tuple[tuple[int, int], ...]:
    """``[first, last)`` of every rank, from an even split or from ``expert_owners``."""
    if expert_owners:
        if len(expert_owners) != num_experts:
            raise PluginConfigError(
                f"additional_config.dwdp.expert_owners lists {len(expert_owners)} owners but the "
                f"model has {num_experts} experts per MoE layer; give one owner rank per expert")
        try:
            return owner_runs(expert_owners, world_size)
        except ValueError as e:
            raise PluginConfigError(f"additional_config.dwdp.{e}") from None
    if num_experts < world_size:
        raise PluginConfigError(
            f"{world_size} DWDP ranks cannot split {num_experts} experts (each rank must own at "
            f"least one); use at most {num_experts} ranks")
    base, extra = divmod(num_experts, world_size)
    spans, first = [], 0
    for r in range(world_size):
        n = base + (r < extra)
        spans.append((first, first + n))
        first += n
    return tuple(spans)


def plan_placement(num_experts: int, world_size: int, rank: int,
                   expert_owners: list[int] | tuple[int, ...] = ()) -> ExpertPlacement:
    if not 0 <= rank < world_size:
        raise PluginConfigError(f"DWDP rank {rank} is outside 0 .. {world_size - 1}")
    return ExpertPlacement(num_experts, world_size, rank,
                           owner_spans(num_experts, world_size, expert_owners))

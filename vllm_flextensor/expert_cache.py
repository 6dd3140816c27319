"""Which experts of one MoE layer the GPU cache holds: a frequency-aware policy.

Each expert has a score, its routing count decayed by ``decay`` at every update, so it
tracks what the router picks lately. At an update (FlexTensor: every
``cache_refresh_steps`` forward passes), uncached experts take the cache slots of the
lowest-scoring cached experts not in use, if they now score clearly higher: hot experts
settle in the cache and stop moving; a one-off pick does not evict a hot one. Pure
host-side bookkeeping; the caller moves the bytes.
"""

from __future__ import annotations


class ExpertCachePolicy:
    def __init__(self, num_experts: int, num_slots: int, decay: float = 0.95):
        if not 0 <= num_slots <= num_experts:
            raise ValueError(f"num_slots must be between 0 and num_experts ({num_experts}), "
                             f"got {num_slots}")
        self.num_experts = num_experts
        self.num_slots = num_slots
        self.decay = decay
        self.score = [0.0] * num_experts
        # Start with experts 0 .. num_slots-1 cached (the caller fills those slots at load).
        self.slot_of: dict[int, int] = {e: e for e in range(num_slots)}
        self.expert_in: list[int] = list(range(num_slots))

    def record(self, experts: list[int], counts: list[int] | None = None) -> None:
        """One step's routing: decay every score, then count the experts used."""
        if self.decay != 1.0:
            self.score = [s * self.decay for s in self.score]
        for i, e in enumerate(experts):
            self.score[e] += 1.0 if counts is None else float(counts[i])

    def lookup(self, experts: list[int]) -> tuple[dict[int, int], list[int]]:
        """(cached expert -> slot, experts to stream) for a step needing ``experts``."""
        hits = {e: self.slot_of[e] for e in experts if e in self.slot_of}
        return hits, [e for e in experts if e not in self.slot_of]

    def admit(self, streamed: list[int], in_use: set[int], margin: float = 0.0,
              limit: int | None = None) -> list[tuple[int, int]]:
        """Cache slots for streamed experts that now outscore a cached one.

        ``in_use``: experts the current step reads from the cache (not evicted under it).
        ``margin``: a candidate must score more than ``1 + margin`` times its victim, so
        experts of near-equal heat do not swap back and forth; ``limit``: at most this many
        moves. Returns ``(expert, slot)`` moves; the caller copies the expert into the slot.
        """
        if self.num_slots == 0:
            return []
        moves = []
        candidates = sorted(streamed, key=lambda e: -self.score[e])
        victims = sorted((s for s, e in enumerate(self.expert_in) if e not in in_use),
                         key=lambda s: self.score[self.expert_in[s]])
        for e, slot in zip(candidates, victims):
            old = self.expert_in[slot]
            if self.score[e] <= self.score[old] * (1.0 + margin) or len(moves) == limit:
                break  # candidates only get colder and victims hotter from here
            del self.slot_of[old]
            self.slot_of[e] = slot
            self.expert_in[slot] = e
            moves.append((e, slot))
        return moves

    def slot_map(self, streamed_slot: dict[int, int], stream_offset: int) -> list[int]:
        """Per expert: its cache slot, ``stream_offset + position`` if streamed, else -1."""
        out = [-1] * self.num_experts
        for e, s in self.slot_of.items():
            out[e] = s
        for e, pos in streamed_slot.items():
            out[e] = stream_offset + pos
        return out

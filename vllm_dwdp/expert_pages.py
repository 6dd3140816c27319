"""Where a DWDP layer's experts live: one composite range per expert tensor, in global order.

For each MoE layer and each per-expert tensor vLLM's quant method left after its post-load step
(``w13_weight``, ``w2_weight``, scales...), the range holds ``[E, ...]`` bytes, expert ``e`` at
``e * expert_bytes``, so vLLM's own kernel reads it as an ordinary tensor and no expert id is
remapped::

    global bytes   0 ......... own_lo ............... own_hi ......... span
    pages          | receive slot  |  this rank's pages  |  receive slot  |
                   (experts before)   (zero-copy, exported) (experts after)

``own_lo`` / ``own_hi`` round this rank's experts ``[first, last)`` out to whole pages. Bytes of a
neighbour's experts that share an edge page are copied from that neighbour once at start-up (weights
do not change); everything outside the own pages is pulled before each forward pass into the
layer's receive slot. Slot ``s``'s physical pages are mapped into every layer ``i`` with
``i % num_slots == s``, so no address ever changes once the model is loaded.

Every piece mapped into a range is one whole allocation (CUDA maps allocations from their start
only): a tensor's own pages, and, per slot, its "before" and "after" pages.

Tensors whose whole ``[E, ...]`` is under :data:`MIN_COMPOSITE_PAGES` pages (block scales,
per-expert scalars, biases) are *replicated*: a plain full tensor on every rank, filled from the
peers once at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_moe_core.composite_memory import Segment, round_up

MIN_COMPOSITE_PAGES = 2


class NotComposable(RuntimeError):
    """A quant method's post-load layout cannot be split per expert."""


@dataclass(frozen=True)
class TensorPages:
    """One per-expert tensor of one layer: its global shape and where this rank's bytes sit."""

    name: str
    dtype: str
    shape: tuple[int, ...]         # global: (E, ...)
    stride: tuple[int, ...]        # element strides, as vLLM's post-load step left them
    expert_bytes: int
    composite: bool
    own_lo: int                    # composite: page-aligned own range in global bytes;
    own_hi: int                    # replicated: the own experts' bytes

    @property
    def total_bytes(self) -> int:
        return self.shape[0] * self.expert_bytes

    def span(self, page: int) -> int:
        return round_up(self.total_bytes, page)

    def slot_bytes(self, page: int) -> int:
        return self.own_lo + self.span(page) - self.own_hi if self.composite else 0

    def export_bytes(self, page: int) -> int:
        return round_up(self.own_hi - self.own_lo, page)

    def public(self, page: int) -> dict:
        """The fields peers compare and read (JSON)."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "stride": list(self.stride), "expert_bytes": self.expert_bytes,
                "composite": self.composite, "own_lo": self.own_lo, "own_hi": self.own_hi,
                "export_bytes": self.export_bytes(page)}


def experts_dense(t: torch.Tensor) -> bool:
    """True when ``t``'s experts (dim 0) are back to back and each one is dense in memory."""
    if t.dim() < 1 or t.stride(0) * t.shape[0] != t.numel():
        return False
    dims = sorted(((t.stride(d), t.shape[d]) for d in range(1, t.dim()) if t.shape[d] != 1),
                  reverse=True)
    expected = 1
    for stride, size in reversed(dims):
        if stride != expected:
            return False
        expected *= size
    return expected == t.stride(0)


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor whose experts are dense (``experts_dense``), in memory order."""
    nbytes = t.numel() * t.element_size()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(
        t.untyped_storage(), t.storage_offset() * t.element_size(), (nbytes,), (1,))


def plan_tensor(name: str, local: torch.Tensor, num_experts: int, first: int, last: int,
                page: int) -> TensorPages:
    """Where ``local`` (this rank's experts ``[first, last)`` of ``name``) goes."""
    if not experts_dense(local):
        raise NotComposable(
            f"{name} has shape {tuple(local.shape)} and strides {tuple(local.stride())} after vLLM's "
            f"post-load step: its experts are not stored one after another, so DWDP cannot place "
            f"them in global expert order")
    eb = local.stride(0) * local.element_size()
    shape = (num_experts, *local.shape[1:])
    total = num_experts * eb
    composite = round_up(total, page) >= MIN_COMPOSITE_PAGES * page
    if composite:
        lo = first * eb // page * page
        hi = min(round_up(last * eb, page), round_up(total, page))
    else:
        lo, hi = first * eb, last * eb
    return TensorPages(name, str(local.dtype).removeprefix("torch."), shape, tuple(local.stride()),
                       eb, composite, lo, hi)


@dataclass
class Run:
    """Copy global bytes ``[start, stop)`` of one tensor from ``owner``'s export."""

    owner: int
    start: int
    stop: int


def owner_runs(start: int, stop: int, expert_bytes: int, owners: list[tuple[int, int]]
               ) -> list[Run]:
    """Split ``[start, stop)`` by the rank owning each byte; ``owners[r] = (first, last)``."""
    runs = []
    for r, (first, last) in enumerate(owners):
        a, b = max(start, first * expert_bytes), min(stop, last * expert_bytes)
        if a < b:
            runs.append(Run(r, a, b))
    return runs


@dataclass
class LayerPages:
    """Every per-expert tensor of one MoE layer: this rank's export allocations and its ranges."""

    name: str
    tensors: list[TensorPages]
    exports: dict[str, Segment]                 # name -> this rank's pages of that tensor
    export_views: dict[str, torch.Tensor]       # name -> this process's mapping of them
    views: dict[str, torch.Tensor] = field(default_factory=dict)   # name -> full [E, ...] tensor
    ranges: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> uint8 over the range

    def typed(self, t: TensorPages, raw: torch.Tensor, shape=None) -> torch.Tensor:
        dtype = getattr(torch, t.dtype)
        return raw.view(dtype).as_strided(shape or t.shape, t.stride)

    def own_experts(self, t: TensorPages, first: int, last: int) -> torch.Tensor:
        """This rank's experts of ``t`` inside its export (what the layer reads before composing)."""
        at = first * t.expert_bytes - t.own_lo if t.composite else 0
        raw = self.export_views[t.name][at:at + (last - first) * t.expert_bytes]
        return self.typed(t, raw, (last - first, *t.shape[1:]))

    def fds(self) -> list[int]:
        return [self.exports[t.name].fd for t in self.tensors]

    def manifest(self, page: int) -> list[dict]:
        return [t.public(page) for t in self.tensors]

    def close_fds(self, memory) -> None:
        for seg in self.exports.values():
            memory.close_fd(seg)


def build_layer(name: str, local: dict[str, torch.Tensor], num_experts: int, first: int,
                last: int, memory) -> LayerPages:
    """This rank's (post-processed) experts of one layer, copied into exportable pages."""
    plans = [plan_tensor(n, t, num_experts, first, last, memory.page) for n, t in local.items()]
    pages = LayerPages(name, plans, {}, {})
    for p in plans:
        seg = memory.create(p.export_bytes(memory.page), f"{name}.{p.name}")
        view = memory.tensor(memory.map_whole(seg), seg.nbytes)
        src = raw_bytes(local[p.name])
        at = first * p.expert_bytes - p.own_lo if p.composite else 0
        view[at:at + src.numel()].copy_(src)
        pages.exports[p.name], pages.export_views[p.name] = seg, view
    return pages


class ReceiveSlot:
    """One receive slot: per composite tensor, the pages before and after a rank's own pages.
    Every layer using the slot maps the same allocations (layers of one model have the same
    layout; a layer of another size gets allocations of its own)."""

    def __init__(self, memory, index: int):
        self.memory, self.index = memory, index
        self.segments: dict[tuple[str, str, int], Segment] = {}

    def segment(self, name: str, part: str, nbytes: int) -> Segment:
        key = (name, part, nbytes)
        if key not in self.segments:
            self.segments[key] = self.memory.create(nbytes, f"slot{self.index}.{name}.{part}")
        return self.segments[key]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments.values())

    def close_fds(self) -> None:
        for seg in self.segments.values():
            self.memory.close_fd(seg)


def compose_layer(layer: LayerPages, slot: ReceiveSlot, memory, device: torch.device) -> None:
    """Reserve each composite tensor's range and map ``[slot | own pages | slot]`` into it;
    replicated tensors get a plain full tensor. Fills ``layer.views``."""
    page = memory.page
    for p in layer.tensors:
        if not p.composite:
            full = torch.zeros(p.total_bytes, dtype=torch.uint8, device=device)
            full[p.own_lo:p.own_hi].copy_(layer.export_views[p.name][:p.own_hi - p.own_lo])
            layer.ranges[p.name] = full
            layer.views[p.name] = layer.typed(p, full)
            continue
        span = p.span(page)
        base = memory.reserve(span)
        if p.own_lo:
            memory.map(base, slot.segment(p.name, "before", p.own_lo), 0, p.own_lo)
        memory.map(base + p.own_lo, layer.exports[p.name], 0, p.own_hi - p.own_lo)
        if span > p.own_hi:
            memory.map(base + p.own_hi, slot.segment(p.name, "after", span - p.own_hi), 0,
                       span - p.own_hi)
        raw = memory.tensor(base, span)
        layer.ranges[p.name] = raw
        layer.views[p.name] = layer.typed(p, raw[:p.total_bytes])


def check_same_layout(name: str, mine: list[TensorPages], theirs: list[dict], peer: int,
                      rank: int) -> None:
    """Every rank must have left the same per-expert layout (else kernels read garbage)."""
    keys = ("name", "dtype", "shape", "stride", "expert_bytes", "composite")
    a = [{k: getattr(p, k) if k not in ("shape", "stride") else list(getattr(p, k))
          for k in keys} for p in mine]
    b = [{k: t.get(k) for k in keys} for t in theirs]
    if a != b:
        diff = next((x, y) for x, y in zip(a, b) if x != y) if len(a) == len(b) else (
            [x["name"] for x in a], [y["name"] for y in b])
        raise NotComposable(
            f"{name}: DWDP rank {peer}'s experts are laid out as {diff[1]} but rank {rank}'s as "
            f"{diff[0]}. Every rank must run the same model, dtype, quantization and vLLM "
            f"version (and pick the same MoE backend)")


# ---- a peer's export, as this rank reads it ---------------------------------------------------
@dataclass
class PeerExport:
    """One layer of a peer: its mapped pages per tensor and the tensors' published fields."""

    views: dict[str, torch.Tensor]
    tensors: dict[str, dict]

    def source(self, name: str, run: Run) -> torch.Tensor:
        """Global bytes ``[run.start, run.stop)`` of tensor ``name``, inside this export."""
        at = run.start - int(self.tensors[name]["own_lo"])
        return self.views[name][at:at + run.stop - run.start]


def map_export(memory, fds: list[int], tensors: list[dict]) -> PeerExport:
    """Map a peer's pages of one layer (one descriptor per tensor, in order) for reading."""
    views = {}
    for t, fd in zip(tensors, fds, strict=True):
        seg = memory.import_fd(fd, int(t["export_bytes"]))
        views[t["name"]] = memory.tensor(memory.map_whole(seg), seg.nbytes)
        memory.close_fd(seg)
    return PeerExport(views, {t["name"]: t for t in tensors})


def _runs(pages: LayerPages, spans, peers: dict[int, PeerExport], which: str):
    first, last = spans[next(r for r, s in enumerate(spans) if r not in peers)]
    for t in pages.tensors:
        eb, raw = t.expert_bytes, pages.ranges[t.name]
        if which == "static" and t.composite:      # neighbours' bytes on our edge pages
            ranges = [(t.own_lo, first * eb), (last * eb, min(t.own_hi, t.total_bytes))]
        elif which == "static":                    # replicated tensors: all of the others
            ranges = [(0, first * eb), (last * eb, t.total_bytes)]
        elif t.composite:                          # every forward pass: outside our pages
            ranges = [(0, t.own_lo), (t.own_hi, t.total_bytes)]
        else:
            continue
        for a, b in ranges:
            for run in owner_runs(a, b, eb, spans):
                yield raw[run.start:run.stop], peers[run.owner].source(t.name, run)


def fill_static(pages: LayerPages, spans, peers: dict[int, PeerExport]) -> None:
    """Once at start-up: the bytes that never change hands again."""
    for dst, src in _runs(pages, spans, peers, "static"):
        dst.copy_(src)


def pull_copies(pages: LayerPages, spans, peers: dict[int, PeerExport]
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination, source) byte runs a forward pass pulls into the layer's receive slot."""
    return list(_runs(pages, spans, peers, "pull"))


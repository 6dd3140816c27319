"""The pull pipeline: remote experts of layer l+1.. arrive while layer l computes.

One :class:`ExpertPrefetcher` per engine. Layer i's remote experts land in receive slot
``i % S`` (``S = depth + 1``; ``expert_pages.py`` maps slot ``s``'s pages into the composite
range of every layer with that remainder). On CUDA it owns one side stream:

    acquire(i):  the compute stream waits for the event "slot i%S filled with layer i"
    release(i):  the compute stream records "slot i%S consumed"; the side stream waits for
                 it, then pulls layer i+S into the slot (one-sided copies from peers' memory)

Nothing here synchronises with the host or with another rank: ordering is by CUDA events
on this GPU only. Layer 0's pull is issued at the start of a forward pass; in eager mode,
when the slot cycle wraps cleanly (``num_layers % S == 0``), the last layers of a pass
already pull the first layers of the next one, since expert weights do not change.

Under CUDA graphs (``vllm_moe_core.vllm_compat.dwdp_graph_policy``) the MoE layers run
between vLLM's piecewise graphs, so this schedule runs as in eager mode; a FULL graph
captures one whole pass: the side stream forks from the compute stream at layer 0 and has
joined it again by the last layer's ``acquire``, so the capture closes cleanly.

On CPU the same schedule runs with synchronous copies (there are no streams).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch



@dataclass
class LayerPulls:
    """What to copy for one layer: (destination bytes in its composite range, source bytes in
    a peer's mapped export), one pair per contiguous run of one owner's experts."""

    name: str
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(dst.numel() for dst, _ in self.copies)


@dataclass
class LayerStats:
    pulls: int = 0
    bytes_pulled: int = 0
    pull_ms: float = 0.0          # side-stream time spent copying (CUDA events)
    wait_ms: float = 0.0          # time the compute stream stood still for a pull
    forwards: int = 0


class ExpertPrefetcher:
    def __init__(self, depth: int, device: torch.device, cross_step: bool):
        self.num_slots = depth + 1
        self.device = device
        self.cross_step = cross_step
        self.layers: list[LayerPulls] = []
        self.stats: list[LayerStats] = []
        self.is_cuda = device.type == "cuda"
        self.holds: list[int | None] = [None] * self.num_slots  # layer index held (eager only)
        self.check_alive = lambda: None
        if self.is_cuda:
            self.stream = torch.cuda.Stream(device=device)
            self.filled = [torch.cuda.Event() for _ in range(self.num_slots)]
            self.consumed = [torch.cuda.Event() for _ in range(self.num_slots)]
            # (layer, pull start, pull end, compute arrival) events, resolved lazily
            self._pending: deque = deque()
            self._slot_entry: list[list | None] = [None] * self.num_slots
        self._memcpy, self._memcpy_default = _find_memcpy() if self.is_cuda else (None, None)

    # ---- set-up -----------------------------------------------------------------------
    def add_layer(self, name: str, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Register the next MoE layer (forward order) with its pulls; returns its index."""
        self.layers.append(LayerPulls(name, copies))
        self.stats.append(LayerStats())
        return len(self.layers) - 1

    # ---- forward path -----------------------------------------------------------------
    def acquire(self, i: int) -> None:
        """Make the compute stream wait until layer ``i``'s remote experts are in its slot."""
        self.check_alive()
        s = i % self.num_slots
        if i == 0:
            self._start_pass()
        elif self.holds[s] != i:  # out of the expected order: pull now (correct, slower)
            self._pull(i, s)
        self.stats[i].forwards += 1
        if self.is_cuda:
            compute = torch.cuda.current_stream(self.device)
            entry = self._slot_entry[s]
            if self._timing() and entry is not None and entry[0] == i and len(entry) == 3:
                arrival = torch.cuda.Event(enable_timing=True)
                arrival.record(compute)
                entry.append(arrival)
            compute.wait_event(self.filled[s])

    def release(self, i: int) -> None:
        """Layer ``i`` is done reading its slot: reuse it for the layer ``num_slots`` ahead."""
        s = i % self.num_slots
        if self.is_cuda:
            self.consumed[s].record(torch.cuda.current_stream(self.device))
        nxt = i + self.num_slots
        if nxt < len(self.layers):
            self._pull(nxt, s)
        elif self.cross_step and not self._capturing():
            wrapped = nxt - len(self.layers)
            if wrapped % self.num_slots == s and wrapped < self.num_slots:
                self._pull(wrapped, s)
            else:
                self.holds[s] = None
        else:
            self.holds[s] = None

    # ---- internals ----------------------------------------------------------------------
    def _start_pass(self) -> None:
        if self.is_cuda:  # the side stream follows the compute stream (and joins a capture)
            fork = torch.cuda.Event()
            fork.record(torch.cuda.current_stream(self.device))
            self.stream.wait_event(fork)
        for j in range(min(self.num_slots, len(self.layers))):
            if not (self.cross_step and self.holds[j] == j) or self._capturing():
                # the fork already follows every read of the slot in earlier passes (and, in
                # a graph capture, an event recorded before the capture cannot be awaited)
                self._pull(j, j, after_consumed=False)

    def _pull(self, i: int, s: int, after_consumed: bool = True) -> None:
        layer = self.layers[i]
        st = self.stats[i]
        st.pulls += 1
        st.bytes_pulled += layer.nbytes
        if not self.is_cuda:
            t0 = time.perf_counter()
            for dst, src in layer.copies:
                dst.copy_(src)
            st.pull_ms += (time.perf_counter() - t0) * 1e3
            self.holds[s] = i
            return
        timing = self._timing()
        with torch.cuda.stream(self.stream):
            if after_consumed:
                self.stream.wait_event(self.consumed[s])
            if timing:
                start = torch.cuda.Event(enable_timing=True)
                start.record(self.stream)
            for dst, src in layer.copies:
                self._copy(dst, src)
            self.filled[s].record(self.stream)
            if timing:
                end = torch.cuda.Event(enable_timing=True)
                end.record(self.stream)
                entry = [i, start, end]
                self._pending.append(entry)
                self._slot_entry[s] = entry
        self.holds[s] = i

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """One-sided pull on this GPU's side stream: a copy-engine memcpy from peer memory."""
        if self._memcpy is None:
            dst.copy_(src, non_blocking=True)
            return
        err, = self._memcpy(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size(),
                            self._memcpy_default, self.stream.cuda_stream)
        if int(err) != 0:
            raise RuntimeError(f"DWDP pull failed: cudaMemcpyAsync returned {err}")

    def _capturing(self) -> bool:
        return self.is_cuda and torch.cuda.is_current_stream_capturing()

    def _timing(self) -> bool:
        return self.is_cuda and not self._capturing()

    def collect_timings(self) -> None:
        """Fold finished CUDA-event timings into the per-layer stats (no waiting)."""
        if not self.is_cuda:
            return
        while self._pending:
            entry = self._pending[0]
            if not entry[2].query() or (len(entry) == 4 and not entry[3].query()):
                break  # oldest pull still running
            self._pending.popleft()
            i, start, end = entry[0], entry[1], entry[2]
            self.stats[i].pull_ms += start.elapsed_time(end)
            if len(entry) == 4:  # compute arrived at entry[3]: it waited until `end`
                self.stats[i].wait_ms += max(0.0, entry[3].elapsed_time(end))
        while len(self._pending) > 4096:  # stats are best effort; never grow without bound
            self._pending.popleft()


def _find_memcpy():
    """cudaMemcpyAsync from cuda-python, if installed (and not turned off).

    torch's cross-device ``copy_`` runs the copy on the *source* device's stream and fences
    both devices' streams around it; a plain cudaMemcpyAsync with unified addressing runs
    on this GPU's side stream only, which is what a one-sided pull is.
    """
    import os

    if os.environ.get("VLLM_DWDP_COPY_IMPL", "auto") == "torch":
        return None, None
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None, None
    return cudart.cudaMemcpyAsync, cudart.cudaMemcpyKind.cudaMemcpyDefault

"""Moving experts from their host home into GPU stream buffers, on a side stream.

One :class:`ExpertStreamer` per engine process owns two layer-sized stream buffers (one
tensor per expert parameter: weights, and scales for FP8, each ``[E, ...]``) and, on CUDA,
one side stream. MoE layer ``i`` of a forward pass uses buffer ``i % 2``:

    stream(i, runs)  side stream: wait "buffer consumed", copy the runs, record "filled"
    wait(buf)        compute stream waits for "filled" (no host synchronisation)
    release(buf)     compute stream records "consumed": the buffer may be refilled

so layer ``i+1``'s experts can arrive while layer ``i`` computes. On CPU the copies run
synchronously (same schedule, same buffers): the logic is the one CUDA runs.
"""

from __future__ import annotations

import time
from collections import deque

import torch


class ExpertStreamer:
    def __init__(self, templates: dict[str, torch.Tensor], num_experts: int,
                 device: torch.device, num_buffers: int = 2):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.buffers = [
            {name: torch.empty((num_experts, *t.shape[1:]), dtype=t.dtype, device=device)
             for name, t in templates.items()}
            for _ in range(num_buffers)
        ]
        # (layer, stream-buffer) each buffer holds, valid for the forward pass `holds_pass`.
        self.holds: list[tuple[int, int] | None] = [None] * num_buffers
        self.timer = CopyTimer()  # CUDA: copy times and the compute's waits, per layer
        if self.is_cuda:
            self.stream = torch.cuda.Stream(device=device)
            self.filled = [torch.cuda.Event() for _ in range(num_buffers)]
            self.consumed = [torch.cuda.Event() for _ in range(num_buffers)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self.buffers for t in b.values())

    def stream_runs(self, buf: int, host: dict[str, torch.Tensor],
                    runs: list[tuple[int, int, int]], stats) -> int:
        """Copy ``(src_expert, dst_position, count)`` runs of ``host`` into buffer ``buf``.

        Returns the bytes moved; ``stats`` (a LayerStats) gets them, and the copy time.
        """
        dst = self.buffers[buf]
        moved = sum(host[n][0].numel() * host[n].element_size() * c
                    for n in dst for _, _, c in runs)
        stats.bytes_streamed += moved
        stats.bytes_copied += moved
        if not self.is_cuda:
            t0 = time.perf_counter()
            for name, d in dst.items():
                for a, b, c in runs:
                    d[b:b + c].copy_(host[name][a:a + c])
            ms = (time.perf_counter() - t0) * 1e3
            stats.stream_ms += ms
            stats.wait_ms += ms  # synchronous: the compute waited for all of it
            return moved
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.consumed[buf])
            start = torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            for name, d in dst.items():
                for a, b, c in runs:
                    d[b:b + c].copy_(host[name][a:a + c], non_blocking=True)
            end = torch.cuda.Event(enable_timing=True)
            end.record(self.stream)
            self.filled[buf].record(self.stream)
        self.timer.started(buf, stats, start, end)
        return moved

    def wait(self, buf: int) -> None:
        """The compute stream waits until buffer ``buf`` holds what was streamed into it."""
        if not self.is_cuda:
            return
        compute = torch.cuda.current_stream(self.device)
        self.timer.compute_arrives(buf, compute)
        compute.wait_event(self.filled[buf])

    def release(self, buf: int) -> None:
        if self.is_cuda:
            self.consumed[buf].record(torch.cuda.current_stream(self.device))

    def collect_timings(self) -> None:
        """Fold finished copies' CUDA-event times into their layer's stats (never waits)."""
        self.timer.collect()


class CopyTimer:
    """CUDA-event times of side-stream copies and of the compute's waits, folded into the
    layer stats (``stream_ms``, ``wait_ms``) once the events completed (never waits for
    them). One per streamer: ``slot`` is the buffer a copy filled (expert stream buffer or
    dense ring slot)."""

    def __init__(self):
        self._pending: deque = deque()  # [stats, start, end] (+ compute arrival event)
        self.last: dict[int, list] = {}  # slot -> its latest fill's entry

    def started(self, slot: int, stats, start, end) -> None:
        entry = [stats, start, end]
        self._pending.append(entry)
        self.last[slot] = entry

    def compute_arrives(self, slot: int, stream) -> None:
        entry = self.last.get(slot)
        if entry is not None and len(entry) == 3 and not entry[2].query():
            arrival = torch.cuda.Event(enable_timing=True)
            arrival.record(stream)
            entry.append(arrival)

    def collect(self) -> None:
        while self._pending:
            entry = self._pending[0]
            if not entry[2].query() or (len(entry) == 4 and not entry[3].query()):
                break
            self._pending.popleft()
            stats, start, end = entry[:3]
            stats.stream_ms += start.elapsed_time(end)
            if len(entry) == 4:
                stats.wait_ms += max(0.0, entry[3].elapsed_time(end))
        while len(self._pending) > 8192:  # best effort; never grows without bound
            self._pending.popleft()


def coalesce(experts: list[int], first_position: int = 0) -> list[tuple[int, int, int]]:
    """Sorted experts -> ``(first expert, first buffer position, count)`` runs, positions
    assigned in order (expert ``experts[j]`` lands at position ``first_position + j``)."""
    runs: list[tuple[int, int, int]] = []
    for j, e in enumerate(experts, first_position):
        if runs and runs[-1][0] + runs[-1][2] == e:
            a, b, c = runs[-1]
            runs[-1] = (a, b, c + 1)
        else:
            runs.append((e, j, 1))
    return runs

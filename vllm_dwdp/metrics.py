"""DWDP counters as Prometheus metrics, named and labelled the way vLLM names its own.

The counters live in the worker process that runs the model. vLLM's ``/metrics`` endpoint
serves the API-server process's registry; it includes worker metrics when
``PROMETHEUS_MULTIPROC_DIR`` is set (vLLM's multiprocess mode), which ``vllm-dwdp serve``
does for every rank. Without it, ``llm.collective_rpc(vllm_dwdp.moe_layer.worker_stats)``
returns the same numbers.
"""

from __future__ import annotations

from prometheus_client import Counter

_LABELS = ("dwdp_rank", "layer")

BYTES_PULLED = Counter("vllm:dwdp_bytes_pulled", "Bytes of remote experts pulled from peer GPUs",
                       _LABELS)
PULL_SECONDS = Counter("vllm:dwdp_pull_seconds", "Side-stream time spent pulling experts",
                       _LABELS)
WAIT_SECONDS = Counter("vllm:dwdp_compute_wait_seconds",
                       "Time the compute stream waited for a layer's pulled experts", _LABELS)
FORWARDS = Counter("vllm:dwdp_forward_passes", "Forward passes through DWDP MoE layers",
                   ("dwdp_rank",))


class MetricsPublisher:
    """Turns the prefetcher's running per-layer totals into Prometheus counter increments."""

    def __init__(self, rank: int):
        self.rank = str(rank)
        self._last: dict[str, tuple[float, float, float]] = {}

    def publish(self, stats: list[dict]) -> None:
        for s in stats:
            name = s["layer"]
            prev = self._last.get(name, (0, 0.0, 0.0))
            now = (s["bytes_pulled"], s["pull_ms"] / 1e3, s["wait_ms"] / 1e3)
            labels = (self.rank, name)
            if now[0] > prev[0]:
                BYTES_PULLED.labels(*labels).inc(now[0] - prev[0])
            if now[1] > prev[1]:
                PULL_SECONDS.labels(*labels).inc(now[1] - prev[1])
            if now[2] > prev[2]:
                WAIT_SECONDS.labels(*labels).inc(now[2] - prev[2])
            self._last[name] = now

    def forward(self) -> None:
        FORWARDS.labels(self.rank).inc()

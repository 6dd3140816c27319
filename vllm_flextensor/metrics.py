"""FlexTensor counters as Prometheus metrics, named the way vLLM names its own.

Routed experts are counted per MoE layer, streamed dense layers per decoder layer (label
``layer``: ``model.layers.3``). They live in the worker process (see
``vllm_dwdp/metrics.py`` on multiprocess mode); in offline use
``llm.collective_rpc(vllm_flextensor.worker_stats)`` returns the same numbers with the plan.
"""

from __future__ import annotations

from prometheus_client import Counter

_LABELS = ("layer",)

BYTES_STREAMED = Counter("vllm:flextensor_bytes_streamed",
                         "Bytes of routed experts moved from host memory to the GPU", _LABELS)
CACHE_LOOKUPS = Counter("vllm:flextensor_cache_lookups",
                        "Routed experts looked up in the GPU expert cache", _LABELS)
CACHE_HITS = Counter("vllm:flextensor_cache_hits",
                     "Routed experts found in the GPU expert cache", _LABELS)
WHOLE_LAYER_STREAMS = Counter("vllm:flextensor_whole_layer_streams",
                              "Steps that streamed a whole MoE layer", _LABELS)
WAIT_SECONDS = Counter("vllm:flextensor_compute_wait_seconds",
                       "Time the compute stood still for streamed experts", _LABELS)
ROUTING_SYNC_SECONDS = Counter("vllm:flextensor_routing_sync_seconds",
                               "Time the host waited for the router's picks", _LABELS)
PRESTAGED = Counter("vllm:flextensor_experts_prestaged",
                    "Routed experts copied while the MoE layer before computed, from that "
                    "layer's guess of this layer's routing", _LABELS)
PRESTAGED_USED = Counter("vllm:flextensor_prestaged_used",
                         "Pre-staged experts the router then picked", _LABELS)

DENSE_BYTES_STREAMED = Counter("vllm:flextensor_dense_bytes_streamed",
                               "Bytes of decoder-layer linear weights (attention, dense MLP, "
                               "shared experts) moved from host memory to the GPU", _LABELS)
DENSE_WAIT_SECONDS = Counter("vllm:flextensor_dense_wait_seconds",
                             "Time the compute stood still for streamed decoder-layer weights",
                             _LABELS)

_FIELDS = (("bytes_streamed", BYTES_STREAMED, 1.0), ("cache_lookups", CACHE_LOOKUPS, 1.0),
           ("cache_hits", CACHE_HITS, 1.0), ("whole_layer_steps", WHOLE_LAYER_STREAMS, 1.0),
           ("wait_ms", WAIT_SECONDS, 1e-3), ("routing_sync_ms", ROUTING_SYNC_SECONDS, 1e-3),
           ("experts_prestaged", PRESTAGED, 1.0), ("prestaged_used", PRESTAGED_USED, 1.0))
DENSE_FIELDS = (("bytes_streamed", DENSE_BYTES_STREAMED, 1.0),
                ("wait_ms", DENSE_WAIT_SECONDS, 1e-3))


class MetricsPublisher:
    """Turns the runtime's running per-layer totals into Prometheus counter increments.

    ``fields``: (stats key, counter, scale) triples; the MoE layers' by default,
    :data:`DENSE_FIELDS` for streamed decoder layers."""

    def __init__(self, fields=_FIELDS):
        self._fields = fields
        self._last: dict[str, dict[str, float]] = {}

    def publish(self, stats: list[dict]) -> None:
        for s in stats:
            prev = self._last.setdefault(s["layer"], {})
            for key, counter, scale in self._fields:
                delta = s[key] - prev.get(key, 0)
                if delta > 0:
                    counter.labels(s["layer"]).inc(delta * scale)
                prev[key] = s[key]

"""vllm-flextensor: weight offload for vLLM that streams only what the next layer needs.

Registered through ``vllm.general_plugins``; inert until
``--additional-config '{"flextensor": {"enabled": true, "gpu_budget_gb": ...}}'``.
"""


def register() -> None:
    """Entry point for ``vllm.general_plugins``; safe to call more than once."""
    from vllm_flextensor import vllm_compat

    vllm_compat.install_flextensor()


def worker_stats(worker=None) -> dict:
    """FlexTensor's plans and counters in this worker: ``llm.collective_rpc(worker_stats)``.

    The routed experts' (``plan``, ``totals``, ``layers``: see ``moe_layer.worker_stats``;
    absent for models without experts) and, under ``dense``, the streamed decoder layers'
    (``dense_streaming.worker_stats``; ``{}`` when every dense weight stays on the GPU).
    """
    import sys

    moe = sys.modules.get("vllm_flextensor.moe_layer")  # not imported: no FlexTensor MoE layer
    dense = sys.modules.get("vllm_flextensor.dense_streaming")
    stats = dict(moe.worker_stats()) if moe is not None else {}
    stats["dense"] = dense.worker_stats() if dense is not None else {}
    return stats

"""FlexTensor's handling of one MoE layer's routed experts (called by the package's single
out-of-tree RoutedExperts, ``vllm_dwdp.moe_layer.DwdpRoutedExperts``)."""

from __future__ import annotations


def init_offloaded_experts(layer, base_init, args, kwargs, cfg) -> None:
    """Build ``layer`` (``base_init`` is vLLM's RoutedExperts.__init__) under ``cfg``."""
    if cfg.gpu_budget_gb < 0:  # no budget: nothing is offloaded, the layer is vLLM's own
        base_init(*args, **kwargs)
        return
    raise NotImplementedError(
        "FlexTensor expert offload is not implemented yet; remove "
        "additional_config.flextensor.gpu_budget_gb to run without offload")

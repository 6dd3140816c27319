"""The core both MoE plugins build on: where a layer's experts live is theirs to decide, the
compute stays vLLM's.

- ``routed_experts.py``: the single replacement of vLLM's ``RoutedExperts`` and the registry of
  expert homes (DWDP, FlexTensor) it dispatches to;
- ``vllm_compat.py``: the touches of vLLM internals both plugins share (version-gated,
  signature-checked), including the opaque ``vllm_moe_core::routed_experts`` op;
- ``config.py``: both plugins' settings as pydantic models (unknown keys forbidden);
- ``composite_memory.py``: virtual ranges assembled from shareable physical pages (memfd on the
  host, CUDA VMM on a GPU);
- ``versioning.py``: the supported vLLM range.
"""

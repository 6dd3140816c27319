"""vllm-flextensor: weight offload for vLLM that streams only what the next layer needs.

Registered through ``vllm.general_plugins``; inert until
``--additional-config '{"flextensor": {"enabled": true, "gpu_budget_gb": ...}}'``.
"""


def register() -> None:
    """Entry point for ``vllm.general_plugins``; safe to call more than once."""
    from vllm_flextensor import vllm_compat

    vllm_compat.install_flextensor()

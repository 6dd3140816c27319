"""vllm-dwdp: Distributed Weight Data Parallelism for vLLM's MoE layers.

vLLM calls :func:`register` in every process (front end, engine core, workers) through
the ``vllm.general_plugins`` entry point. Loading changes nothing until
``--additional-config '{"dwdp": {"enabled": true, ...}}'`` turns DWDP on.
"""

__version__ = "0.1.0"


def register() -> None:
    """Entry point for ``vllm.general_plugins``; safe to call more than once."""
    from vllm_dwdp import plugin

    plugin.install()

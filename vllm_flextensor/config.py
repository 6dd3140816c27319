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
        -1.0, "GiB of GPU memory the weights may use; the rest lives in host memory "
        "(-1: no budget, nothing offloaded)", _positive_or_unset,
    )
    mode: str = setting(
        "auto", "copy (stream into GPU buffers), unified (GPU reads host memory, "
        "GH200 / GB10), or auto", one_of("auto", "copy", "unified"),
    )
    expert_cache_fraction: float = setting(
        0.5, "share of the offloaded experts' budget kept as a GPU-resident expert cache",
        within(0.0, 1.0),
    )
    prefetch_layers: int = setting(1, "dense layers streamed ahead of the one computing",
                                   within(1, 4))
    host_memory_headroom_gb: float = setting(
        4.0, "host memory left free when checking that the plan fits", at_least(0.0)
    )


def parse_flextensor_config(additional_config) -> FlexTensorConfig:
    section = (additional_config or {}).get(SECTION) if isinstance(additional_config, dict) else None
    return parse_section(FlexTensorConfig, SECTION, section, ENV_PREFIX)

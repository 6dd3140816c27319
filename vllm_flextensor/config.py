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
    routed_reads: str = setting(
        "copy", "decode steps on PCIe GPUs: copy (read the step's routing on the host, copy "
        "the uncached routed experts into a GPU buffer) or in_place (the kernel reads them "
        "from host memory over PCIe, no host sync); unified mode always reads in place",
        one_of("copy", "in_place"),
    )
    prestage_next_layer: bool = setting(
        False, "copy mode, steps that move only routed experts: while layer l computes, also "
        "copy the uncached experts layer l+1's router picks for layer l's hidden states (a "
        "guess, so the copies overlap the compute; experts the guess missed are copied once "
        "layer l+1 has routed); off by default: measured only on random weights, where every "
        "layer's router sees nearly the same hidden states",
    )
    cache_refresh_steps: int = setting(
        32, "reading routed experts in place: forward passes between GPU expert-cache "
        "refreshes (routing is counted on the GPU every step, read by the host once per "
        "refresh; the hottest uncached experts then replace colder cached ones)", at_least(1),
    )
    host_memory_headroom_gb: float = setting(
        4.0, "host memory left free when checking that the plan fits", at_least(0.0)
    )
    dense_prefetch_depth: int = setting(
        1, "when the budget cannot hold every non-expert weight, the linears of some decoder "
        "layers live in host memory and are copied this many layers ahead of the compute, "
        "into a GPU ring of depth + 1 layer-sized buffers (more hides slower copies, costs "
        "one more buffer)", at_least(1),
    )


def parse_flextensor_config(additional_config) -> FlexTensorConfig:
    section = (additional_config or {}).get(SECTION) if isinstance(additional_config, dict) else None
    return parse_section(FlexTensorConfig, SECTION, section, ENV_PREFIX)

"""DWDP settings: ``--additional-config '{"dwdp": {...}}'`` or ``VLLM_DWDP_*`` variables."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_dwdp.plugin_config import (
    PluginConfigError,
    at_least,
    one_of,
    parse_section,
    setting,
    within,
)

SECTION = "dwdp"
ENV_PREFIX = "VLLM_DWDP_"


@dataclass(frozen=True)
class DwdpConfig:
    enabled: bool = setting(False, "turn DWDP on for this engine")
    world_size: int = setting(1, "number of DWDP ranks (one engine per GPU)", at_least(1))
    rank: int = setting(0, "this engine's DWDP rank, 0 .. world_size-1", at_least(0))
    expert_placement: str = setting(
        "contiguous",
        "how experts are split when expert_owners is empty",
        one_of("contiguous", "round_robin"),
    )
    expert_owners: list[int] = setting(
        [], "explicit owner rank of every expert id (overrides expert_placement)"
    )
    prefetch_depth: int = setting(
        1, "MoE layers pulled ahead of the one computing (receive buffers = depth + 1)",
        within(1, 4),
    )
    replication: float = setting(
        0.0, "fraction of remote experts also kept as local copies (memory vs link bytes)",
        within(0.0, 1.0),
    )
    transport: str = setting(
        "auto", "peer memory: cuda_ipc (GPU), shm (host shared memory, CPU runs), or auto",
        one_of("auto", "cuda_ipc", "shm"),
    )
    master_addr: str = setting("127.0.0.1", "rendezvous address of rank 0's TCP store")
    master_port: int = setting(29555, "rendezvous port of rank 0's TCP store", within(1, 65535))
    peer_timeout_s: float = setting(
        30.0, "seconds before a missing or dead peer is reported as an error", at_least(1.0)
    )

    def __post_init__(self):
        if self.rank >= self.world_size:
            raise PluginConfigError(
                f"rank must be below world_size ({self.world_size}), got {self.rank}; "
                f"ranks are numbered 0 .. {self.world_size - 1}"
            )
        bad = [r for r in self.expert_owners if not 0 <= r < self.world_size]
        if bad:
            raise PluginConfigError(
                f"expert_owners holds ranks {sorted(set(bad))} outside 0 .. {self.world_size - 1}"
            )


def parse_dwdp_config(additional_config) -> DwdpConfig:
    """Read ``additional_config["dwdp"]`` (a dict, or None) plus ``VLLM_DWDP_*`` overrides."""
    section = (additional_config or {}).get(SECTION) if isinstance(additional_config, dict) else None
    return parse_section(DwdpConfig, SECTION, section, ENV_PREFIX)

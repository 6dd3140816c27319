"""DWDP settings: ``--additional-config '{"dwdp": {...}}'`` or ``VLLM_DWDP_*`` variables."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_dwdp.plugin_config import (
    PluginConfigError,
    at_least,
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
    expert_owners: list[int] = setting(
        [], "owner rank of every expert id, each rank's experts one run (default: an even "
        "contiguous split, the first E % N ranks one more)"
    )
    prefetch_depth: int = setting(
        1, "MoE layers pulled ahead of the one computing (receive slots = depth + 1)",
        within(1, 4),
    )
    group: str = setting(
        "default", "name of this DWDP group: ranks with the same group on one host find each "
        "other (letters, digits, '_', '.', '-')"
    )
    rendezvous_dir: str = setting(
        "", "private directory (mode 0700) holding the group's Unix sockets (default: "
        "$XDG_RUNTIME_DIR/vllm-dwdp, else /tmp/vllm-dwdp-<uid>)"
    )
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
        from vllm_dwdp.placement import check_owner_runs
        from vllm_dwdp.rendezvous import GROUP_NAME

        check_owner_runs(self.expert_owners, self.world_size)
        if not GROUP_NAME.match(self.group):
            raise PluginConfigError(
                f"group must be 1-64 letters, digits, '_', '.' or '-', got {self.group!r}")


def parse_dwdp_config(additional_config) -> DwdpConfig:
    """Read ``additional_config["dwdp"]`` (a dict, or None) plus ``VLLM_DWDP_*`` overrides."""
    section = (additional_config or {}).get(SECTION) if isinstance(additional_config, dict) else None
    return parse_section(DwdpConfig, SECTION, section, ENV_PREFIX)

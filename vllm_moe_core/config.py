"""The plugins' settings, read from vLLM's own config surface and validated with pydantic.

Each plugin is configured through ``--additional-config`` (``LLM(additional_config=...)``) under its
own key, ``"dwdp"`` or ``"flextensor"``. Every field can also be set by an environment variable
``<PREFIX><FIELD>`` (``VLLM_DWDP_RANK=1``), which wins over the JSON: that is how per-process values
reach worker processes that vLLM's config cannot address one by one.

The models forbid unknown keys and are frozen, as vLLM's own configs are. Any problem raises one
:class:`PluginConfigError` naming the dotted key (or the variable), the value received and what is
allowed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

T = TypeVar("T", bound="PluginSettings")

GROUP_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class PluginConfigError(ValueError):
    """A plugin setting is wrong. The message says which key, what was given, what is allowed."""


class PluginSettings(BaseModel):
    """Base of a plugin's settings: unknown keys forbidden, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    SECTION: ClassVar[str]
    ENV_PREFIX: ClassVar[str]


class DwdpConfig(PluginSettings):
    """``additional_config["dwdp"]``: Distributed Weight Data Parallelism."""

    SECTION: ClassVar[str] = "dwdp"
    ENV_PREFIX: ClassVar[str] = "VLLM_DWDP_"

    enabled: bool = Field(False, description="turn DWDP on for this engine")
    world_size: int = Field(1, ge=1, description="number of DWDP ranks (one engine per GPU)")
    rank: int = Field(0, ge=0, description="this engine's DWDP rank, 0 .. world_size-1")
    expert_owners: tuple[int, ...] = Field(
        (), description="owner rank of every expert id, each rank's experts one run (default: "
        "an even contiguous split, the first E % N ranks one more)")
    prefetch_depth: int = Field(
        1, ge=1, le=4, description="MoE layers pulled ahead of the one computing (receive slots "
        "= depth + 1)")
    group: str = Field(
        "default", description="name of this DWDP group: ranks with the same group on one host "
        "find each other (letters, digits, '_', '.', '-')")
    rendezvous_dir: str = Field(
        "", description="private directory (mode 0700) holding the group's Unix sockets "
        "(default: $XDG_RUNTIME_DIR/vllm-dwdp, else /tmp/vllm-dwdp-<uid>)")
    peer_timeout_s: float = Field(
        30.0, ge=1.0, description="seconds a rank waits for its peers to start before it gives "
        "up with an error naming the missing rank")
    cuda_graphs: bool = Field(
        False, description="CUDA engines: capture vLLM's CUDA graphs, with the MoE layers run "
        "between the piecewise graphs and the pulls inside FULL decode graphs (experimental; "
        "off: torch.compile without CUDA graphs)")

    @field_validator("group")
    @classmethod
    def _group_name(cls, v: str) -> str:
        if not GROUP_NAME.match(v):
            raise ValueError("must be 1-64 letters, digits, '_', '.' or '-'")
        return v

    @model_validator(mode="after")
    def _ranks(self):
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be below world_size ({self.world_size}), got "
                             f"{self.rank}; ranks are numbered 0 .. {self.world_size - 1}")
        bad = sorted({r for r in self.expert_owners if not 0 <= r < self.world_size})
        if bad:
            raise ValueError(f"expert_owners holds ranks {bad} outside 0 .. {self.world_size - 1}")
        if self.expert_owners:
            owner_runs(self.expert_owners, self.world_size)
        return self


def owner_runs(expert_owners, world_size: int) -> tuple[tuple[int, int], ...]:
    """``[first, last)`` of every rank in ``expert_owners`` (owner rank of each expert id),
    after checking each rank owns one non-empty run (``ValueError`` saying which does not)."""
    spans = []
    for r in range(world_size):
        ids = [e for e, o in enumerate(expert_owners) if o == r]
        if not ids:
            raise ValueError(f"expert_owners gives DWDP rank {r} no expert; every rank must "
                             f"own at least one")
        if ids != list(range(ids[0], ids[-1] + 1)):
            raise ValueError(f"expert_owners gives DWDP rank {r} experts {ids}, which are not one "
                             f"run: experts stay in global order in memory, so list each rank's "
                             f"experts together (e.g. [0, 0, 0, 1, 1])")
        spans.append((ids[0], ids[-1] + 1))
    return tuple(spans)


class FlexTensorConfig(PluginSettings):
    """``additional_config["flextensor"]``: MoE-aware weight offload."""

    SECTION: ClassVar[str] = "flextensor"
    ENV_PREFIX: ClassVar[str] = "VLLM_FLEXTENSOR_"

    enabled: bool = Field(False, description="turn weight offload on for this engine")
    gpu_budget_gb: float = Field(
        -1.0, description="GiB of GPU memory the weights may use; routed experts that do not "
        "fit live in host memory (-1: no budget, nothing offloaded)")
    mode: Literal["auto", "copy", "unified"] = Field(
        "auto", description="copy (stream experts into GPU buffers), unified (the GPU reads host "
        "memory in place: GH200, GB10), or auto (unified where the GPU shares the host's page "
        "tables, copy elsewhere)")
    stream_whole_layer_at: float = Field(
        0.5, ge=0.0, le=1.0, description="a step expected to route to at least this share of a "
        "layer's experts streams whole layers, one layer ahead, without waiting for the router")
    cache_decay: float = Field(
        0.95, ge=0.0, le=1.0, description="per-step decay of the routing counts that rank "
        "experts for the GPU cache (1: plain frequency, lower: favour recent routing)")
    routed_reads: Literal["copy", "in_place"] = Field(
        "copy", description="decode steps on PCIe GPUs: copy (read the step's routing on the "
        "host, copy the uncached routed experts into a GPU buffer) or in_place (the kernel reads "
        "them from host memory over PCIe, no host sync); unified mode always reads in place")
    prestage_next_layer: bool = Field(
        False, description="copy mode, steps that move only routed experts: while layer l "
        "computes, also copy the uncached experts layer l+1's router picks for layer l's hidden "
        "states (a guess, so the copies overlap the compute; experts the guess missed are copied "
        "once layer l+1 has routed). Off by default: its gain was measured on random weights "
        "only, whose routers all pick alike")
    cache_refresh_steps: int = Field(
        32, ge=1, description="reading routed experts in place: forward passes between GPU "
        "expert-cache refreshes (routing is counted on the GPU every step, read by the host "
        "once per refresh; the hottest uncached experts then replace colder cached ones)")
    host_memory_headroom_gb: float = Field(
        4.0, ge=0.0, description="host memory left free when checking that the plan fits")
    dense_prefetch_depth: int = Field(
        1, ge=1, description="when the budget cannot hold every non-expert weight, the linears "
        "of some decoder layers live in host memory and are copied this many layers ahead of "
        "the compute, into a GPU ring of depth + 1 layer-sized buffers")

    @field_validator("gpu_budget_gb")
    @classmethod
    def _budget(cls, v: float) -> float:
        if v == 0 or (v < 0 and v != -1):
            raise ValueError("must be > 0 (or -1 for no budget)")
        return v


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _env_value(cls: type[PluginSettings], name: str, text: str) -> Any:
    """Environment values arrive as text; lists are JSON (``[0, 0, 1]``)."""
    annotation = cls.model_fields[name].annotation
    if getattr(annotation, "__origin__", None) is tuple and text.strip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def parse_section(cls: type[T], raw: Any, environ: Mapping[str, str] | None = None) -> T:
    """``cls`` from ``additional_config[cls.SECTION]`` plus ``cls.ENV_PREFIX*`` overrides.

    ``raw`` may be None (section absent), a dict, or an already-parsed ``cls``."""
    if isinstance(raw, cls):
        return raw
    section, prefix = cls.SECTION, cls.ENV_PREFIX
    environ = os.environ if environ is None else environ
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise PluginConfigError(f'additional_config.{section} must be a JSON object such as '
                                f'{{"enabled": true}}, got {_describe(raw)}')
    unknown = sorted(set(raw) - set(cls.model_fields))
    if unknown:
        raise PluginConfigError(f"Unknown additional_config.{section} keys: {unknown}. "
                                f"Allowed keys: {sorted(cls.model_fields)}")
    values, where = dict(raw), {}
    for name in cls.model_fields:
        env_name = prefix + name.upper()
        if env_name in environ:
            values[name] = _env_value(cls, name, environ[env_name])
            where[name] = f"environment variable {env_name}"
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if not field:  # a check across fields
            raise PluginConfigError(f"additional_config.{section}: {msg}") from None
        key = where.get(field, f"additional_config.{section}.{field}")
        raise PluginConfigError(f"{key}: {msg}, got {_describe(err['input'])}") from None


def parse_dwdp_config(additional_config) -> DwdpConfig:
    """``additional_config["dwdp"]`` (``additional_config`` a dict, or None) plus env overrides."""
    section = additional_config.get("dwdp") if isinstance(additional_config, dict) else None
    return parse_section(DwdpConfig, section)


def parse_flextensor_config(additional_config) -> FlexTensorConfig:
    section = additional_config.get("flextensor") if isinstance(additional_config, dict) else None
    return parse_section(FlexTensorConfig, section)


def describe_settings(cls: type[PluginSettings], markdown: bool = False) -> str:
    """A table of every setting (key, env var, default, doc), for ``vllm-dwdp settings`` and,
    as Markdown (``markdown``), the README."""
    if markdown:
        rows = [f"| `additional_config.{cls.SECTION}` | variable | default | meaning |",
                "|---|---|---|---|"]
    else:
        rows = [f"additional_config.{cls.SECTION}:"]
    for name, f in cls.model_fields.items():
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        env = cls.ENV_PREFIX + name.upper()
        rows.append(f"| `{name}` | `{env}` | `{default!r}` | {f.description} |" if markdown else
                    f"  {name:<24} {env:<36} default {default!r}: {f.description}")
    return "\n".join(rows)

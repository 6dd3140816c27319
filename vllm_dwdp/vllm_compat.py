"""Every touch of vLLM internals made by DWDP, in one version-aware place (vLLM 0.26 - 0.33).

What is touched, why, and when it can go:
- ``EngineArgs.create_engine_config`` is wrapped so a bad ``additional_config["dwdp"]`` (or an
  unsupported vLLM) fails in the front-end process before any model loads. Removal: when vLLM
  offers a validation hook for general plugins' ``additional_config`` sections.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from vllm_dwdp import versioning

_INSTALLED: set[str] = set()


def logger(name: str):
    """vLLM's logger, under the ``vllm.`` namespace so records share vLLM's handlers and format."""
    from vllm.logger import init_logger

    return init_logger(f"vllm.{name}")


def add_config_validator(name: str, validate: Callable[[object], None]) -> None:
    """Run ``validate(engine_args.additional_config)`` before vLLM builds its config.

    Used by both plugins; each registers once per process under its own ``name``.
    """
    from vllm.engine.arg_utils import EngineArgs

    validators = getattr(EngineArgs.create_engine_config, "_vllm_dwdp_validators", None)
    if validators is None:
        original = EngineArgs.create_engine_config
        validators = {}

        @functools.wraps(original)
        def create_engine_config(self, *args, **kwargs):
            for check in list(validators.values()):
                check(self.additional_config)
            return original(self, *args, **kwargs)

        create_engine_config._vllm_dwdp_validators = validators
        create_engine_config._vllm_dwdp_original = original
        EngineArgs.create_engine_config = create_engine_config
    validators[name] = validate


def install_once(name: str) -> bool:
    """True the first time ``name`` is installed in this process (vLLM loads plugins per process)."""
    if name in _INSTALLED:
        return False
    _INSTALLED.add(name)
    return True


def install_dwdp() -> None:
    if not install_once("dwdp"):
        return
    from vllm_dwdp.config import parse_dwdp_config

    def validate(additional_config) -> None:
        cfg = parse_dwdp_config(additional_config)
        if cfg.enabled:
            versioning.check_supported("DWDP")
            logger("dwdp").info(
                "DWDP enabled: rank %d of %d, prefetch depth %d, transport %s",
                cfg.rank, cfg.world_size, cfg.prefetch_depth, cfg.transport,
            )

    add_config_validator("dwdp", validate)
    state = "supported" if versioning.is_supported() else (
        f"NOT supported (supported: {versioning.SUPPORTED_RANGE})"
    )
    logger("dwdp").info(
        "vllm-dwdp plugin 'dwdp' loaded (vLLM %s, %s)", versioning.vllm_version(), state
    )

"""Every touch of vLLM internals made by FlexTensor, in one version-aware place (vLLM 0.26 - 0.33).

- ``EngineArgs.create_engine_config`` validation, shared with DWDP
  (:func:`vllm_dwdp.vllm_compat.add_config_validator`).
"""

from __future__ import annotations

from vllm_dwdp import versioning
from vllm_dwdp.vllm_compat import add_config_validator, install_once, logger


def install_flextensor() -> None:
    if not install_once("flextensor"):
        return
    from vllm_flextensor.config import parse_flextensor_config

    def validate(engine_args) -> None:
        cfg = parse_flextensor_config(engine_args.additional_config)
        if cfg.enabled:
            versioning.check_supported("FlexTensor")
            logger("flextensor").info(
                "FlexTensor enabled: GPU budget %s GiB, mode %s", cfg.gpu_budget_gb, cfg.mode
            )

    add_config_validator("flextensor", validate)
    logger("flextensor").info(
        "vllm-dwdp plugin 'flextensor' loaded (vLLM %s)", versioning.vllm_version()
    )

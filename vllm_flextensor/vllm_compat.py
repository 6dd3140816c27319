"""Every touch of vLLM internals made by FlexTensor, in one version-aware place (vLLM 0.26 - 0.33).

- ``EngineArgs.create_engine_config`` validation, through the core
  (:func:`vllm_moe_core.vllm_compat.add_config_validator`): a bad ``flextensor`` section, or a
  budget / host memory that cannot hold the placement plan (estimated from the model's
  config through ``EngineArgs.create_model_config``), stops start-up before any model loads.
  The same validator turns CUDA graphs off (CPU: eager), since a step's copies depend on
  its routing.
- ``RoutedExperts`` is built by the core's single replacement
  (``vllm_moe_core.routed_experts``), which hands FlexTensor layers to
  ``vllm_flextensor.moe_layer`` (FlexTensor registers it as an expert home). Relied on:
  per-expert parameters have ``local_num_experts`` rows and are filled in place by vLLM's
  weight loader (and dummy initialiser); ``quant_method.apply(layer, x, topk_weights,
  topk_ids, ...)`` does the routed-expert compute; the quant method's
  ``process_weights_after_loading`` is replaced on the instance (checkpoint layout kept).
- ``vllm.utils.torch_utils.get_accelerator_view_from_cpu_tensor`` (0.26 - 0.33) gives the
  GPU's UVA view of a pinned host tensor.
- Pre-staging the next MoE layer's experts reads that layer's router: the ``LinearBase`` a
  MoE block assigns as ``gate`` beside its ``experts`` (prefixes ``<block>.gate`` and
  ``<block>.experts``, ``output_size`` = the number of experts), seen through the same
  module-registration hook as dense streaming; calling it returns ``(logits, bias)``. A
  model without one simply gets no pre-staging (:func:`router_gate`).
- Dense streaming (``vllm_flextensor/dense_streaming.py``) meets vLLM's linear layers through
  torch's global module-registration hook (no vLLM class is patched or replaced): relied on,
  every linear is a ``vllm.model_executor.layers.linear.LinearBase`` carrying ``prefix``
  (``model.layers.3.self_attn.qkv_proj``), ``quant_method``, ``output_partition_sizes`` and
  ``tp_size``, whose weights its quant method's ``create_weights`` has made by the time the
  model assigns it to its parent; ``LinearBase.forward`` computes through
  ``quant_method.apply(layer, x, bias)``, which reads the layer's tensors at call time
  (``UnquantizedLinearMethod``; ``Fp8LinearMethod`` after its own post-load step); vLLM's
  loader calls ``quant_method.process_weights_after_loading(layer)`` once per linear, after
  every weight is loaded. See :func:`install_dense_linear_hook`.
"""

from __future__ import annotations

import weakref

from vllm_moe_core import routed_experts, versioning
from vllm_moe_core.vllm_compat import (  # noqa: F401 (ExpertsMethodProxy: used by moe_layer)
    ExpertsMethodProxy, add_config_validator, check_one_plugin_enabled, check_split_moe_activation,
    expert_fp8_block_shape, install_once, logger, wrap_process_weights_after_loading)


def install_flextensor() -> None:
    if not install_once("flextensor"):
        return
    from vllm_moe_core.config import parse_flextensor_config

    def validate(engine_args) -> None:
        cfg = parse_flextensor_config(engine_args.additional_config)
        if cfg.enabled:
            versioning.check_supported("FlexTensor")
            check_one_plugin_enabled(engine_args.additional_config)
            if routed_experts.layer_error() is not None:
                raise routed_experts.layer_error()
            logger("flextensor").info(
                "FlexTensor enabled: GPU budget %s GiB, mode %s", cfg.gpu_budget_gb, cfg.mode
            )
            if cfg.gpu_budget_gb > 0:
                check_plan_fits(engine_args, cfg)
                _without_graphs(engine_args)
                _record_settings(engine_args, cfg)

    def init(layer, vllm_init, args, kwargs) -> None:
        from vllm_flextensor.moe_layer import init_offloaded_experts
        from vllm_moe_core.vllm_compat import current_flextensor_config

        init_offloaded_experts(layer, vllm_init, args, kwargs, current_flextensor_config())

    add_config_validator("flextensor", validate)
    routed_experts.register_expert_home(
        "flextensor", lambda config: parse_flextensor_config(config).enabled, init)
    install_dense_linear_hook()
    logger("flextensor").info(
        "vllm-dwdp plugin 'flextensor' loaded (vLLM %s)", versioning.vllm_version()
    )


def estimate_weights(model_config):
    """Byte sizes of ``model_config``'s model, estimated from its HF config."""
    from vllm_flextensor.planner import estimate_model_weights

    hf = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    quant = getattr(model_config.hf_config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict() if hasattr(quant, "to_dict") else dict(vars(quant))
    return estimate_model_weights(hf, model_config.dtype.itemsize, quant)


def check_plan_fits(engine_args, cfg) -> None:
    """Front-end: refuse a budget or host memory that cannot hold the plan, before loading."""
    from vllm_flextensor.planner import GiB, plan_offload

    model_config = engine_args.create_model_config()
    weights = estimate_weights(model_config)
    mode = cfg.mode if cfg.mode != "auto" else "copy"  # copy needs more GPU: the safe check
    plan = plan_offload(weights, int(cfg.gpu_budget_gb * GiB), mode, host_available_bytes(),
                        int(cfg.host_memory_headroom_gb * GiB), cfg.dense_prefetch_depth)
    if plan.dense_layers:
        check_single_gpu_for_dense(getattr(engine_args, "tensor_parallel_size", 1),
                                   getattr(engine_args, "pipeline_parallel_size", 1))
    logger("flextensor").info("Estimated from the model config: %s", plan.describe())


def check_single_gpu_for_dense(tp: int, pp: int) -> None:
    """Dense streaming plans whole decoder layers of one GPU: refuse sharded engines."""
    from vllm_flextensor.planner import FlexTensorPlanError

    if (tp or 1) * (pp or 1) != 1:
        raise FlexTensorPlanError(
            f"additional_config.flextensor.gpu_budget_gb is below the non-expert weights, so "
            f"FlexTensor would stream decoder layers from host memory, which it does for "
            f"single-GPU engines only (this one has tensor_parallel_size={tp}, "
            f"pipeline_parallel_size={pp}). Raise gpu_budget_gb, or start one engine per GPU")


def _record_settings(engine_args, cfg) -> None:
    """Write the effective settings (``VLLM_FLEXTENSOR_*`` overrides included) into
    ``additional_config``, which vLLM hashes into its torch.compile cache key: a compiled
    graph names streamed linears by number, and which linears stream depends on them."""
    if isinstance(engine_args.additional_config, dict) or not engine_args.additional_config:
        engine_args.additional_config = {**(engine_args.additional_config or {}),
                                         "flextensor": cfg.model_dump(mode="json")}


def _without_graphs(engine_args) -> None:
    """A step's copies depend on its routing (read by the host), which no captured graph can
    replay: CPU engines run eagerly, CUDA engines compiled without CUDA graphs."""
    from vllm_moe_core.vllm_compat import run_without_cuda_graphs

    run_without_cuda_graphs(
        engine_args, "flextensor",
        cpu_reason="FlexTensor on CPU runs the model eagerly (enforce_eager=True)",
        cuda_reason="FlexTensor runs this engine without CUDA graphs (cudagraph_mode=NONE; "
                    "torch.compile stays on): which experts move depends on each step's routing")


def host_available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def streams_dense_layers() -> bool:
    """Whether this engine streams the linears of some decoder layers (planned before
    loading)."""
    from vllm_flextensor.dense_streaming import DenseStreaming

    dense = DenseStreaming.get()
    return dense is not None and bool(dense.plan.dense_layers)


def dense_weight_bytes(device) -> int:
    """GPU bytes of everything but routed experts, once the model is built and loaded.

    CUDA: measured (every weight is allocated by now; routed experts live in host memory,
    and so do the linears of streamed decoder layers), plus the dense ring if it is not
    allocated yet. CPU: GPU and host are the same memory, so the model config's estimate
    stands in (with dense streaming: what stays on the GPU plus the ring).
    """
    import torch

    from vllm_flextensor.dense_streaming import DenseStreaming

    dense = DenseStreaming.get()
    if device.type == "cuda":
        pending = dense.ring_bytes_pending() if dense is not None else 0
        return int(torch.cuda.memory_allocated(device)) + pending
    if dense is not None:
        return dense.plan.resident_dense_bytes + dense.plan.dense_ring_bytes
    from vllm.config import get_current_vllm_config

    return estimate_weights(get_current_vllm_config().model_config).dense_bytes


def host_home(shape, dtype, device):
    """An uninitialised host tensor for experts: page-locked in place on CUDA.

    ``torch.empty(pin_memory=True)`` rounds each allocation up to a power of two (a 0.8 GB
    expert tensor takes 1 GB); registering ordinary memory with ``cudaHostRegister`` pins
    exactly what the plan counted. Falls back to torch's pinned allocator if that fails.
    """
    import torch

    t = torch.empty(shape, dtype=dtype, device="cpu")
    if device.type != "cuda" or t.numel() == 0:
        return t
    flags = 0x1 | 0x2  # cudaHostRegisterPortable | cudaHostRegisterMapped
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), flags)
    if int(getattr(err, "value", err)) == 0 and t.is_pinned():
        _REGISTERED.add(t.data_ptr())
        return t
    logger("flextensor").warning_once(
        "cudaHostRegister failed (%s); pinning experts with torch's allocator instead (it "
        "rounds each tensor up to a power of two of host memory)", err)
    return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=True)


_REGISTERED: set[int] = set()  # host homes pinned with cudaHostRegister, by address


def host_pages(nbytes: int, device):
    """``nbytes`` of uninitialised host memory (uint8) on pages of its own, page-locked in
    place on CUDA: dense homes are many and some small (FP8 scales), and registering memory
    that shares a page with another registered home would fail. CPU: plain memory."""
    import mmap

    import torch

    if device.type != "cuda" or nbytes == 0:
        return torch.empty(nbytes, dtype=torch.uint8)
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    pages = torch.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
                             dtype=torch.uint8)  # the tensor keeps the mapping alive
    flags = 0x1 | 0x2  # cudaHostRegisterPortable | cudaHostRegisterMapped
    err = torch.cuda.cudart().cudaHostRegister(pages.data_ptr(), size, flags)
    if int(getattr(err, "value", err)) == 0 and pages.is_pinned():
        _REGISTERED.add(pages.data_ptr())
        return pages[:nbytes]
    logger("flextensor").warning_once(
        "cudaHostRegister failed (%s); pinning dense weights with torch's allocator instead "
        "(it rounds each tensor up to a power of two of host memory)", err)
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def release_host_home(host) -> None:
    """Unpin a home made by :func:`host_home` or :func:`host_pages` that nothing reads any
    more, before it is freed (torch releases what its pinned allocator gave)."""
    import torch

    if host.numel() and host.data_ptr() in _REGISTERED:
        _REGISTERED.discard(host.data_ptr())
        torch.cuda.cudart().cudaHostUnregister(host.data_ptr())


def device_view_of_host(host, device):
    """The tensor the GPU reads ``host`` (pinned) through: its UVA view on CUDA, itself on CPU."""
    if device.type != "cuda":
        return host
    from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor

    return get_accelerator_view_from_cpu_tensor(host)


def resolve_mode(mode: str, device) -> str:
    """``auto`` -> ``unified`` where the GPU reads host memory as fast as its own path to it
    allows without copies (integrated GPUs such as GB10, or GH200's shared page tables),
    ``copy`` elsewhere (PCIe GPUs, CPU)."""
    if mode != "auto":
        return mode
    return "unified" if device.type == "cuda" and unified_memory_gpu(device) else "copy"


def unified_memory_gpu(device) -> bool:
    import torch

    props = torch.cuda.get_device_properties(device)
    if getattr(props, "is_integrated", False):
        return True
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return False
    attr = cudart.cudaDeviceAttr.cudaDevAttrPageableMemoryAccessUsesHostPageTables
    err, value = cudart.cudaDeviceGetAttribute(attr, device.index or 0)
    return int(err) == 0 and bool(value)


def progress_bar(total: int, desc: str):
    """A tqdm bar on the worker's stderr, as vLLM's own weight loading shows one."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="layer", dynamic_ncols=True)


def check_moe_layer(layer) -> None:
    """Refuse, with the reason, MoE layers FlexTensor does not compute."""
    cfg = layer.moe_config
    par = cfg.moe_parallel_config
    if par.tp_size != 1 or par.use_ep or par.dp_size != 1:
        raise NotImplementedError(
            f"FlexTensor offloads experts of single-GPU engines; this one shards experts "
            f"(tp={par.tp_size}, dp={par.dp_size}, ep={par.use_ep}). Start it with one GPU, or "
            f"without additional_config.flextensor")
    check_split_moe_activation(cfg, "FlexTensor")


def fp8_block_shape(layer) -> tuple[int, int] | None:
    """None for bf16/fp16/fp32 experts, (block_n, block_k) for block-scaled FP8 checkpoints;
    other formats are refused before anything loads."""
    return expert_fp8_block_shape(layer, "FlexTensor")


# ---- dense streaming: vLLM's linear layers ---------------------------------------------------
def install_dense_linear_hook() -> None:
    """Show every vLLM linear layer to dense streaming as it joins its parent module.

    torch calls global module-registration hooks on ``parent.child = module``; a vLLM linear
    is complete by then (its quant method's ``create_weights`` made the parameters), so its
    weights can move to their host home before the loader writes them, one layer at a time
    on the GPU. Does nothing unless the engine being built in this process has FlexTensor
    on with a plan that streams dense layers (:meth:`DenseStreaming.for_current_engine`).
    """
    import torch

    torch.nn.modules.module.register_module_module_registration_hook(_on_module_assigned)


def _on_module_assigned(parent, name, module):
    import sys

    linear = sys.modules.get("vllm.model_executor.layers.linear")  # not imported: no linears
    if linear is None or not isinstance(module, linear.LinearBase):
        return None
    if name == "gate":
        _ROUTER_GATES[linear_prefix(module)] = module
    from vllm_flextensor import dense_streaming

    dense_streaming.on_linear_built(module)
    return None


# MoE routers by prefix (``model.layers.3.mlp.gate``), as models assign them; weak, so an
# engine's modules go with it.
_ROUTER_GATES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def router_gate(layer):
    """The router of MoE layer ``layer`` (the linear that maps its hidden states to one logit
    per expert), or None. vLLM's MoE blocks assign it beside their experts, as ``gate``:
    ``model.layers.3.mlp.gate`` beside ``model.layers.3.mlp.experts`` (Qwen2/3-MoE,
    DeepSeek-V2/V3, Mixtral's ``block_sparse_moe``). Called with a ``[tokens, hidden]`` tensor
    it returns the logits (vLLM's linears return ``(logits, bias)``, see :func:`router_logits`)."""
    name = getattr(layer, "layer_name", "") or ""
    gate = _ROUTER_GATES.get(name.rsplit(".", 1)[0] + ".gate") if "." in name else None
    if gate is None or int(getattr(gate, "output_size", -1)) != int(layer.global_num_experts):
        return None
    return gate


def router_logits(gate, x):
    out = gate(x)
    return out[0] if isinstance(out, tuple) else out


def current_vllm_config():
    """The config of the engine being built in this process, or None outside a build."""
    from vllm.config import get_current_vllm_config_or_none

    return get_current_vllm_config_or_none()


def current_device():
    """The device this worker computes on: its CUDA device, or the CPU."""
    import torch
    from vllm.platforms import current_platform

    if current_platform.is_cuda_alike() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def parallel_sizes(vllm_config) -> tuple[int, int]:
    pc = vllm_config.parallel_config
    return int(pc.tensor_parallel_size), int(pc.pipeline_parallel_size)


def linear_prefix(linear) -> str:
    return getattr(linear, "prefix", "") or ""


def linear_out_features(linear) -> int:
    """Output width of ``linear`` on this rank (the last dim of ``quant_method.apply``)."""
    return int(sum(linear.output_partition_sizes))


STREAMABLE_LINEAR_METHODS = ("UnquantizedLinearMethod", "Fp8LinearMethod")


def check_streamable_linear(linear) -> None:
    """Refuse, before anything loads, linears dense streaming cannot move between forwards:
    quant methods other than vLLM's unquantized and FP8 ones (others may keep weights where
    re-pointing the layer's tensors does not reach), weights created on the meta device
    (online quantization), sharded layers."""
    method = linear.quant_method
    kind = type(method).__name__
    where = linear_prefix(linear)
    if kind not in STREAMABLE_LINEAR_METHODS:
        raise NotImplementedError(
            f"FlexTensor streams dense layers whose linears are unquantized (bf16/fp16/fp32) "
            f"or FP8; {where} uses {kind}. Raise additional_config.flextensor.gpu_budget_gb "
            f"so the non-expert weights stay on the GPU, or serve a bf16 or FP8 checkpoint")
    if getattr(method, "uses_meta_device", False) or any(
            p.is_meta for p in linear.parameters(recurse=False)):
        raise NotImplementedError(
            f"FlexTensor cannot stream {where}: its weights are created on the meta device "
            f"(online quantization). Serve a checkpoint already in its final dtype, or raise "
            f"additional_config.flextensor.gpu_budget_gb so the non-expert weights stay on the GPU")
    if int(getattr(linear, "tp_size", 1) or 1) != 1:
        raise NotImplementedError(
            f"FlexTensor streams dense layers of single-GPU engines; {where} is sharded over "
            f"tp_size={linear.tp_size} ranks")


def wrap_linear_post_load(linear, callback) -> None:
    """Make vLLM's post-load step of ``linear``'s quant method call ``callback(run_vllm)``,
    where ``run_vllm()`` runs vLLM's own step (see :func:`_vllm_linear_post_load`)."""
    method = linear.quant_method
    if "process_weights_after_loading" in vars(method):
        raise NotImplementedError(
            f"FlexTensor cannot stream {linear_prefix(linear)}: its quant method is shared "
            f"with another layer or already wrapped")
    original = method.process_weights_after_loading

    def process_weights_after_loading(layer):
        callback(lambda: _vllm_linear_post_load(layer, method, original))

    method.process_weights_after_loading = process_weights_after_loading


def _vllm_linear_post_load(layer, method, original) -> None:
    """vLLM's post-load step of a streamed linear, but on CPU for unquantized weights.

    vLLM's CPU step packs the weight into a oneDNN handle held by a closure
    (``layer.cpu_linear``) and drops ``layer.weight``; a streamed weight must stay a tensor
    the layer reads at call time, so it gets the plain GEMM vLLM itself falls back to.
    Relied on: on CPU ``UnquantizedLinearMethod.apply`` computes
    ``layer.cpu_linear(x, layer.weight, bias)`` (0.26 - 0.33).
    """
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and type(method).__name__ == "UnquantizedLinearMethod":
        import torch

        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)
        return
    original(layer)


class LinearMethodProxy:
    """Base of a streamed linear's quant method: ``LinearBase.forward`` calls
    ``apply(layer, x, bias)`` (the subclass's); every other attribute comes from vLLM's own
    method (``inner``). Not a ``QuantizeMethodBase``: vLLM's post-load loop, which looks for
    one, has already run when it is installed."""

    def __getattr__(self, name):  # only reached for names this object does not have
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

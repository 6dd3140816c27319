"""Every touch of vLLM internals made by FlexTensor, in one version-aware place (vLLM 0.26 - 0.33).

- ``EngineArgs.create_engine_config`` validation, shared with DWDP
  (:func:`vllm_dwdp.vllm_compat.add_config_validator`): a bad ``flextensor`` section, or a
  budget / host memory that cannot hold the placement plan (estimated from the model's
  config through ``EngineArgs.create_model_config``), stops start-up before any model loads.
  The same validator turns CUDA graphs off (CPU: eager), since a step's copies depend on
  its routing.
- ``RoutedExperts`` is built by ``vllm_dwdp.moe_layer.DwdpRoutedExperts`` (vLLM's out-of-tree
  layer registry), which hands FlexTensor layers to ``vllm_flextensor.moe_layer``. Relied on:
  per-expert parameters have ``local_num_experts`` rows and are filled in place by vLLM's
  weight loader (and dummy initialiser); ``quant_method.apply(layer, x, topk_weights,
  topk_ids, ...)`` does the routed-expert compute; the quant method's
  ``process_weights_after_loading`` is replaced on the instance (checkpoint layout kept).
- ``vllm.utils.torch_utils.get_accelerator_view_from_cpu_tensor`` (0.26 - 0.33) gives the
  GPU's UVA view of a pinned host tensor.
"""

from __future__ import annotations

from vllm_dwdp import versioning
from vllm_dwdp.vllm_compat import (  # noqa: F401 (ExpertsMethodProxy: used by moe_layer)
    ExpertsMethodProxy, add_config_validator, check_split_moe_activation,
    expert_fp8_block_shape, install_once, logger, wrap_process_weights_after_loading)


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
            if cfg.gpu_budget_gb > 0:
                check_plan_fits(engine_args, cfg)
                _without_graphs(engine_args)

    add_config_validator("flextensor", validate)
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
                        int(cfg.host_memory_headroom_gb * GiB))
    logger("flextensor").info("Estimated from the model config: %s", plan.describe())


def _without_graphs(engine_args) -> None:
    """A step's copies depend on its routing (read by the host), which no captured graph can
    replay: CPU engines run eagerly, CUDA engines compiled without CUDA graphs."""
    from vllm_dwdp.vllm_compat import run_without_cuda_graphs

    run_without_cuda_graphs(
        engine_args, "flextensor",
        cpu_reason="FlexTensor on CPU runs the model eagerly (enforce_eager=True)",
        cuda_reason="FlexTensor runs this engine without CUDA graphs (cudagraph_mode=NONE; "
                    "torch.compile stays on): which experts move depends on each step's routing")


def host_available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def dense_weight_bytes(device) -> int:
    """GPU bytes of everything but routed experts, once the model is built and loaded.

    CUDA: measured (every weight is allocated by now; routed experts live in host memory).
    CPU: GPU and host are the same memory, so the model config's estimate stands in.
    """
    import torch

    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
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
        return t
    logger("flextensor").warning_once(
        "cudaHostRegister failed (%s); pinning experts with torch's allocator instead (it "
        "rounds each tensor up to a power of two of host memory)", err)
    return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=True)


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

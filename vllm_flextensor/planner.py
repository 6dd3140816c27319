"""Where each weight lives under a GPU budget: the placement plan.

FlexTensor keeps on the GPU everything that every token reads (embeddings, attention, norms,
the router, shared experts, dense MLPs: the *dense* weights) and spends the rest of the
budget on routed experts. Every routed expert's home is host memory (pinned on CUDA); the
GPU holds, per MoE layer, ``cache_slots`` experts chosen by routing frequency, plus (in copy
mode) two layer-sized stream buffers that receive the experts a step needs and the cache
does not hold::

    budget >= dense + stream_buffers * E * expert_bytes + moe_layers * cache_slots * expert_bytes

A budget that holds every expert needs no streaming: all experts are cached, no buffers.
A plan that cannot fit (budget below the dense weights plus the buffers, or host memory
below the experts' home plus the headroom) is refused with what to change.

Pure Python: the front-end checks a plan estimated from the model's config before anything
loads (:func:`estimate_model_weights`); the worker re-plans with the exact expert sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GiB = 1 << 30


def fmt_bytes(n: float) -> str:
    """Bytes as GiB, MiB or KiB, whichever reads best."""
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20)):
        if n >= size / 10:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.1f} KiB"


class FlexTensorPlanError(ValueError):
    """The GPU budget or host memory cannot hold the placement plan; the message says what to change."""


@dataclass(frozen=True)
class ModelWeights:
    """Byte sizes that placement needs, for one model at one dtype."""

    dense_bytes: int          # everything but routed experts (stays on the GPU)
    moe_layers: int
    experts_per_layer: int
    expert_bytes: int         # one routed expert, all its tensors (weights and scales)
    top_k: int

    @property
    def routed_bytes(self) -> int:
        return self.moe_layers * self.experts_per_layer * self.expert_bytes

    @property
    def layer_bytes(self) -> int:
        return self.experts_per_layer * self.expert_bytes


@dataclass(frozen=True)
class OffloadPlan:
    weights: ModelWeights
    budget_bytes: int
    mode: str                 # "copy" or "unified"
    cache_slots: int          # GPU-resident experts per MoE layer
    stream_buffers: int       # layer-sized GPU buffers experts are streamed into

    @property
    def stream_bytes(self) -> int:
        return self.stream_buffers * self.weights.layer_bytes

    @property
    def cache_bytes(self) -> int:
        return self.weights.moe_layers * self.cache_slots * self.weights.expert_bytes

    @property
    def gpu_bytes(self) -> int:
        return self.weights.dense_bytes + self.stream_bytes + self.cache_bytes

    @property
    def host_bytes(self) -> int:
        """Host memory the experts' home takes: every routed expert, once."""
        return 0 if self.offloads_nothing else self.weights.routed_bytes

    @property
    def offloads_nothing(self) -> bool:
        return self.cache_slots >= self.weights.experts_per_layer

    @property
    def off_gpu_fraction(self) -> float:
        """Share of routed-expert bytes with no GPU copy outside the stream buffers."""
        return 1.0 - self.cache_slots / self.weights.experts_per_layer

    def describe(self) -> str:
        w = self.weights
        if self.offloads_nothing:
            return (f"FlexTensor plan: the {fmt_bytes(self.budget_bytes)} budget holds every "
                    f"weight ({fmt_bytes(self.gpu_bytes)}); nothing is offloaded")
        how = ("streamed into 2 layer-sized GPU buffers" if self.mode == "copy"
               else "read in place from host memory by the GPU (unified memory)")
        return (f"FlexTensor plan ({self.mode} mode, budget {fmt_bytes(self.budget_bytes)}): "
                f"on the GPU {fmt_bytes(w.dense_bytes)} of non-expert weights (embeddings, "
                f"attention, norms, router, shared experts), a cache of {self.cache_slots} of "
                f"{w.experts_per_layer} experts in each of {w.moe_layers} MoE layers "
                f"({fmt_bytes(self.cache_bytes)}), {fmt_bytes(self.stream_bytes)} of stream "
                f"buffers; in host memory all {fmt_bytes(w.routed_bytes)} of routed experts "
                f"({100 * self.off_gpu_fraction:.0f}% of them not cached on the GPU), {how}")


def plan_offload(weights: ModelWeights, budget_bytes: int, mode: str = "copy",
                 host_available_bytes: int | None = None, headroom_bytes: int = 0) -> OffloadPlan:
    """The most GPU expert-cache slots per layer that ``budget_bytes`` allows.

    ``mode`` is ``copy`` or ``unified`` (resolved from ``auto`` by the caller).
    """
    if mode not in ("copy", "unified"):
        raise ValueError(f"mode must be 'copy' or 'unified' here, got {mode!r}")
    w = weights
    if w.moe_layers == 0 or w.experts_per_layer == 0:
        raise FlexTensorPlanError(
            "FlexTensor offloads routed MoE experts, and this model has none; serve it without "
            "additional_config.flextensor, or with vLLM's --cpu-offload-gb")
    everything = w.dense_bytes + w.routed_bytes
    if budget_bytes >= everything:
        return OffloadPlan(w, budget_bytes, mode, w.experts_per_layer, 0)
    buffers = 2 if mode == "copy" else 0
    floor = w.dense_bytes + buffers * w.layer_bytes
    if budget_bytes < floor:
        raise FlexTensorPlanError(
            f"additional_config.flextensor.gpu_budget_gb={budget_bytes / GiB:.4g} ({fmt_bytes(budget_bytes)}) cannot hold "
            f"what FlexTensor keeps on the GPU: {fmt_bytes(w.dense_bytes)} of non-expert "
            f"weights (embeddings, attention, norms, router, shared experts; streaming dense "
            f"layers is not implemented) plus {fmt_bytes(buffers * w.layer_bytes)} for "
            f"{buffers} layer-sized expert stream buffers. Raise gpu_budget_gb to at least "
            f"{_round_up_gib(floor)}, or use a GPU with more memory")
    slots = (budget_bytes - floor) // (w.moe_layers * w.expert_bytes)
    plan = OffloadPlan(w, budget_bytes, mode, int(min(slots, w.experts_per_layer - 1)), buffers)
    if host_available_bytes is not None and plan.host_bytes + headroom_bytes > host_available_bytes:
        raise FlexTensorPlanError(
            f"FlexTensor needs {fmt_bytes(plan.host_bytes)} of host memory for the routed "
            f"experts' home plus host_memory_headroom_gb={headroom_bytes / GiB:.4g} GiB, but only "
            f"{fmt_bytes(host_available_bytes)} is available. Free host memory, lower "
            f"additional_config.flextensor.host_memory_headroom_gb, or use a machine with more "
            f"memory (the budget does not change this: every expert lives in host memory)")
    return plan


def _round_up_gib(n: int) -> str:
    """``n`` bytes in GiB, rounded up at 3 significant digits (a budget that fits)."""
    gib = n / GiB
    digits = max(0, 2 - math.floor(math.log10(gib))) if gib > 0 else 0
    return f"{math.ceil(gib * 10 ** digits) / 10 ** digits:.{digits}f}"


def budget_for_cache_slots(weights: ModelWeights, slots: int, mode: str = "copy") -> int:
    """The smallest budget whose plan caches ``slots`` experts per layer."""
    buffers = 2 if mode == "copy" else 0
    return (weights.dense_bytes + buffers * weights.layer_bytes
            + weights.moe_layers * slots * weights.expert_bytes)


def expected_distinct_experts(tokens: int, experts: int, top_k: int) -> float:
    """Experts a step of ``tokens`` tokens routes to, if routing were uniform."""
    if tokens <= 0 or experts <= 0:
        return 0.0
    return experts * (1.0 - (1.0 - min(top_k, experts) / experts) ** tokens)


def whole_layer_min_tokens(experts: int, top_k: int, share: float) -> int:
    """Fewest tokens per step at which streaming whole layers is chosen (see config
    ``stream_whole_layer_at``): the expected routed experts reach ``share`` of the layer."""
    if share <= 0:
        return 0
    t = 1
    while expected_distinct_experts(t, experts, top_k) < share * experts - 1e-9:
        t += 1
        if t > 1 << 20:
            return t
    return t


# ---- estimates from a model config (front-end check, CPU worker) ---------------------------
def _get(cfg, *names, default=None):
    for n in names:
        v = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def moe_layer_ids(cfg) -> list[int]:
    """Layers with routed experts, for Qwen2/3-MoE, Mixtral and DeepSeek-style configs."""
    n = int(_get(cfg, "num_hidden_layers"))
    dense_first = int(_get(cfg, "first_k_dense_replace", default=0))
    step = int(_get(cfg, "decoder_sparse_step", "moe_layer_freq", default=1)) or 1
    mlp_only = set(_get(cfg, "mlp_only_layers", default=[]) or [])
    return [i for i in range(n)
            if i >= dense_first and i not in mlp_only and (i + 1) % step == 0]


def expert_bytes_for(hidden: int, inter: int, weight_bytes: float,
                     block: tuple[int, int] | None = None) -> int:
    """One SiLU-gated expert: w13 [2I, H] and w2 [H, I], plus block scales (float32)."""
    nbytes = int(3 * hidden * inter * weight_bytes)
    if block is not None:
        bn, bk = block
        nbytes += 4 * (math.ceil(2 * inter / bn) * math.ceil(hidden / bk)
                       + math.ceil(hidden / bn) * math.ceil(inter / bk))
    return nbytes


def estimate_model_weights(cfg, dtype_bytes: int, quant: dict | None = None) -> ModelWeights:
    """Byte sizes of a MoE model from its (text) config.

    Exact for Qwen2-MoE / Qwen3-MoE / Mixtral layouts; for others (MLA attention, say) the
    dense part is an estimate, and on CUDA the worker measures it after loading.
    ``quant``: the checkpoint's quantization_config; block FP8 experts are 1 byte a weight
    plus float32 block scales (non-expert weights are counted at ``dtype_bytes``).
    """
    h = int(_get(cfg, "hidden_size"))
    vocab = int(_get(cfg, "vocab_size"))
    layers = int(_get(cfg, "num_hidden_layers"))
    heads = int(_get(cfg, "num_attention_heads"))
    kv = int(_get(cfg, "num_key_value_heads", default=heads))
    hd = int(_get(cfg, "head_dim", default=h // heads) or h // heads)
    experts = int(_get(cfg, "num_experts", "n_routed_experts", "num_local_experts", default=0))
    top_k = int(_get(cfg, "num_experts_per_tok", "moe_topk", default=1))
    moe_inter = int(_get(cfg, "moe_intermediate_size", "intermediate_size"))
    dense_inter = int(_get(cfg, "intermediate_size", default=moe_inter))
    shared = int(_get(cfg, "shared_expert_intermediate_size", default=0) or 0)
    shared += int(_get(cfg, "n_shared_experts", default=0) or 0) * moe_inter
    tied = bool(_get(cfg, "tie_word_embeddings", default=False))
    moe_ids = moe_layer_ids(cfg)
    params = vocab * h * (1 if tied else 2) + h  # embeddings, lm head, final norm
    attention = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 2 * h  # q k v o, 2 norms
    if _get(cfg, "model_type") == "qwen3_moe":
        attention += 2 * hd  # q_norm, k_norm
    if _get(cfg, "qkv_bias", "attention_bias", default=_get(cfg, "model_type") == "qwen2_moe"):
        attention += heads * hd + 2 * kv * hd
    params += layers * attention
    params += (layers - len(moe_ids)) * 3 * h * dense_inter
    params += len(moe_ids) * (experts * h + 3 * h * shared + (h if shared else 0))
    block = None
    weight_bytes: float = dtype_bytes
    if quant and quant.get("quant_method") == "fp8":
        weight_bytes = 1
        if quant.get("weight_block_size"):
            block = tuple(int(b) for b in quant["weight_block_size"])
    return ModelWeights(dense_bytes=int(params * dtype_bytes), moe_layers=len(moe_ids),
                        experts_per_layer=experts,
                        expert_bytes=expert_bytes_for(h, moe_inter, weight_bytes, block),
                        top_k=top_k)

"""Where each weight lives under a GPU budget: the placement plan.

FlexTensor keeps on the GPU everything that every token reads (embeddings, attention, norms,
the router, shared experts, dense MLPs: the *dense* weights) and spends the rest of the
budget on routed experts. Every routed expert's home is host memory (pinned on CUDA); the
GPU holds, per MoE layer, ``cache_slots`` experts chosen by routing frequency, plus (in copy
mode) two layer-sized stream buffers that receive the experts a step needs and the cache
does not hold::

    budget >= dense + stream_buffers * E * expert_bytes + moe_layers * cache_slots * expert_bytes

A budget that holds every expert needs no streaming: all experts are cached, no buffers.

A budget below the dense weights plus the expert stream buffers (zero cache slots) streams
dense layers too: the linear weights (attention projections, dense MLP, shared experts) of
as few decoder layers as needed get their home in host memory, and a ring of
``dense_prefetch_depth + 1`` GPU buffers, each the size of one such decoder layer's linears,
receives them one layer ahead (or more) of the compute::

    budget >= dense - streamed + ring_slots * largest_streamed_layer + stream_buffers * ...

Embeddings, lm_head, norms, biases and MoE routers always stay on the GPU. Models without
routed experts are served the same way (no expert cache, no expert buffers). A plan that
cannot fit (the budget below what stays on the GPU even with every decoder layer streamed,
or host memory below the offloaded bytes plus the headroom) is refused with what to change.

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

    dense_bytes: int          # everything but routed experts (on the GPU unless streamed)
    moe_layers: int
    experts_per_layer: int
    expert_bytes: int         # one routed expert, all its tensors (weights and scales)
    top_k: int
    # Per decoder layer: bytes of the linear weights dense streaming can move to host memory
    # (attention projections, dense MLP, shared experts; not biases, norms or the router).
    # Empty: unknown, dense layers stay on the GPU.
    decoder_linear_bytes: tuple[int, ...] = ()

    @property
    def routed_bytes(self) -> int:
        return self.moe_layers * self.experts_per_layer * self.expert_bytes

    @property
    def layer_bytes(self) -> int:
        return self.experts_per_layer * self.expert_bytes

    @property
    def has_experts(self) -> bool:
        return self.moe_layers > 0 and self.experts_per_layer > 0


@dataclass(frozen=True)
class OffloadPlan:
    weights: ModelWeights
    budget_bytes: int
    mode: str                 # "copy" or "unified"
    cache_slots: int          # GPU-resident experts per MoE layer
    stream_buffers: int       # layer-sized GPU buffers experts are streamed into
    dense_layers: tuple[int, ...] = ()  # decoder layers whose linears live in host memory
    dense_ring_slots: int = 0           # GPU buffers, one decoder layer's linears each

    @property
    def stream_bytes(self) -> int:
        return self.stream_buffers * self.weights.layer_bytes

    @property
    def cache_bytes(self) -> int:
        return self.weights.moe_layers * self.cache_slots * self.weights.expert_bytes

    @property
    def dense_streamed_bytes(self) -> int:
        """Linear weights of the streamed decoder layers: their home is host memory."""
        return sum(self.weights.decoder_linear_bytes[i] for i in self.dense_layers)

    @property
    def dense_slot_bytes(self) -> int:
        """One ring buffer: the largest streamed decoder layer's linears."""
        return max((self.weights.decoder_linear_bytes[i] for i in self.dense_layers), default=0)

    @property
    def dense_ring_bytes(self) -> int:
        return self.dense_ring_slots * self.dense_slot_bytes

    @property
    def resident_dense_bytes(self) -> int:
        """Non-expert weights that stay on the GPU (everything if no dense layer streams)."""
        return self.weights.dense_bytes - self.dense_streamed_bytes

    @property
    def gpu_bytes(self) -> int:
        return (self.resident_dense_bytes + self.dense_ring_bytes + self.stream_bytes
                + self.cache_bytes)

    @property
    def experts_offloaded(self) -> bool:
        return self.cache_slots < self.weights.experts_per_layer

    @property
    def host_bytes(self) -> int:
        """Host memory the plan's homes take: every routed expert once (when any is
        offloaded), plus the linear weights of the streamed decoder layers."""
        experts = self.weights.routed_bytes if self.experts_offloaded else 0
        return experts + self.dense_streamed_bytes

    @property
    def offloads_nothing(self) -> bool:
        return not self.experts_offloaded and not self.dense_layers

    @property
    def off_gpu_fraction(self) -> float:
        """Share of routed-expert bytes with no GPU copy outside the stream buffers."""
        if not self.weights.has_experts:
            return 0.0
        return 1.0 - self.cache_slots / self.weights.experts_per_layer

    def describe(self) -> str:
        w = self.weights
        if self.offloads_nothing:
            return (f"FlexTensor plan: the {fmt_bytes(self.budget_bytes)} budget holds every "
                    f"weight ({fmt_bytes(self.gpu_bytes)}); nothing is offloaded")
        head = (f"FlexTensor plan ({self.mode} mode, budget {fmt_bytes(self.budget_bytes)}): ")
        if not self.dense_layers:
            return (head + f"on the GPU {fmt_bytes(w.dense_bytes)} of non-expert weights "
                    f"(embeddings, attention, norms, router, shared experts), "
                    + self._describe_experts())
        n, k = len(w.decoder_linear_bytes), len(self.dense_layers)
        ahead = self.dense_ring_slots - 1
        others = ("" if n == k else f", and the linears of the {n - k} other decoder "
                  f"layer{'s' if n - k != 1 else ''}")
        kept = "embeddings, lm_head, norms, biases" + (", routers" if w.has_experts else "")
        text = (head + f"on the GPU {fmt_bytes(self.resident_dense_bytes)} of non-expert "
                f"weights ({kept}{others}); the linear weights (attention, dense "
                f"MLP, shared experts) of {k} of {n} decoder layers "
                f"({_layer_list(self.dense_layers)}, {fmt_bytes(self.dense_streamed_bytes)}) "
                f"live in host memory and are streamed {ahead} layer{'s' if ahead != 1 else ''} "
                f"ahead into a ring of {self.dense_ring_slots} GPU buffers of "
                f"{fmt_bytes(self.dense_slot_bytes)} ({fmt_bytes(self.dense_ring_bytes)})")
        if w.has_experts:
            text += "; routed experts: " + self._describe_experts()
        return text

    def _describe_experts(self) -> str:
        w = self.weights
        how = ("streamed into 2 layer-sized GPU buffers" if self.mode == "copy"
               else "read in place from host memory by the GPU (unified memory)")
        return (f"a cache of {self.cache_slots} of {w.experts_per_layer} experts in each of "
                f"{w.moe_layers} MoE layers ({fmt_bytes(self.cache_bytes)}), "
                f"{fmt_bytes(self.stream_bytes)} of stream buffers; in host memory all "
                f"{fmt_bytes(w.routed_bytes)} of routed experts "
                f"({100 * self.off_gpu_fraction:.0f}% of them not cached on the GPU), {how}")


def _layer_list(layers: tuple[int, ...]) -> str:
    shown = ", ".join(str(i) for i in layers[:8])
    return f"layers {shown}" + (f", ... ({len(layers)} in all)" if len(layers) > 8 else "")


def plan_offload(weights: ModelWeights, budget_bytes: int, mode: str = "copy",
                 host_available_bytes: int | None = None, headroom_bytes: int = 0,
                 dense_prefetch_depth: int = 1) -> OffloadPlan:
    """Where every weight lives under ``budget_bytes`` of GPU memory.

    In order: everything on the GPU if it fits; else routed experts offloaded, with the most
    GPU expert-cache slots per layer the budget allows; else, when even zero cache slots do
    not fit, the linears of as few decoder layers as needed streamed through a ring of
    ``dense_prefetch_depth + 1`` GPU buffers (see :func:`dense_layers_to_stream`).
    ``mode`` is ``copy`` or ``unified`` (resolved from ``auto`` by the caller).
    """
    if mode not in ("copy", "unified"):
        raise ValueError(f"mode must be 'copy' or 'unified' here, got {mode!r}")
    w = weights
    if budget_bytes >= w.dense_bytes + w.routed_bytes:
        return OffloadPlan(w, budget_bytes, mode, w.experts_per_layer, 0)
    buffers = expert_stream_buffers(w, mode)
    expert_buffer_bytes = buffers * w.layer_bytes
    if w.has_experts and budget_bytes >= w.dense_bytes + expert_buffer_bytes:
        plan = OffloadPlan(w, budget_bytes, mode,
                           _cache_slots(w, budget_bytes - w.dense_bytes - expert_buffer_bytes),
                           buffers)
    else:
        chosen = dense_layers_to_stream(w, budget_bytes - expert_buffer_bytes,
                                        dense_prefetch_depth)
        if chosen is None:
            raise FlexTensorPlanError(_budget_too_small(w, budget_bytes, buffers,
                                                        dense_prefetch_depth))
        layers, ring_slots = chosen
        plan = OffloadPlan(w, budget_bytes, mode, 0, buffers, layers, ring_slots)
        if w.has_experts:
            plan = OffloadPlan(w, budget_bytes, mode,
                               _cache_slots(w, budget_bytes - plan.gpu_bytes), buffers,
                               layers, ring_slots)
    if host_available_bytes is not None and plan.host_bytes + headroom_bytes > host_available_bytes:
        raise FlexTensorPlanError(_host_too_small(plan, host_available_bytes, headroom_bytes))
    return plan


def plan_experts_beside_dense_streaming(weights: ModelWeights, budget_bytes: int,
                                        mode: str) -> tuple[OffloadPlan, int]:
    """The routed experts' plan once dense layers are already streamed (decided before
    loading, from the config's estimate): ``weights.dense_bytes`` is what the GPU holds
    after that (measured on CUDA). Never re-plans the dense layers: the experts get the
    stream buffers and as many cache slots as the rest of the budget pays for (none if
    nothing is left). Returns ``(plan, over)``: ``over`` is how many bytes the measured
    non-expert weights plus the buffers exceed the budget by (0 normally; a few MiB where
    the measurement exceeds the estimate), for the caller to report."""
    buffers = expert_stream_buffers(weights, mode)
    spare = budget_bytes - weights.dense_bytes - buffers * weights.layer_bytes
    plan = OffloadPlan(weights, budget_bytes, mode, _cache_slots(weights, spare), buffers)
    return plan, max(0, -spare)


def expert_stream_buffers(weights: ModelWeights, mode: str) -> int:
    """Layer-sized GPU buffers routed experts are copied into: two in copy mode, none when
    the GPU reads host memory in place (unified) or the model has no routed experts."""
    return 2 if mode == "copy" and weights.has_experts else 0


def _cache_slots(w: ModelWeights, spare_bytes: int) -> int:
    """GPU expert-cache slots per MoE layer that ``spare_bytes`` pays for (never all)."""
    slots = max(0, spare_bytes) // (w.moe_layers * w.expert_bytes)
    return int(min(slots, w.experts_per_layer - 1))


def dense_ring_slots(streamed_layers: int, depth: int) -> int:
    """GPU buffers of the dense ring: ``depth`` layers in flight plus the one computing
    (fewer when fewer layers stream)."""
    return min(depth + 1, streamed_layers)


def dense_layers_to_stream(weights: ModelWeights, room_bytes: int,
                           depth: int) -> tuple[tuple[int, ...], int] | None:
    """The fewest decoder layers whose linears, streamed through a ring of ``depth + 1``
    buffers, bring the non-expert weights on the GPU within ``room_bytes``; with the ring's
    slot count. None if even streaming every decoder layer does not fit.

    Streaming ``k`` layers saves their bytes but costs a ring of ``min(depth + 1, k)``
    buffers of the largest of them, so the largest layers go first; among equal layers
    (the usual case) the chosen ones are spread evenly over the model, which leaves the
    most compute between two streamed layers to hide each copy behind.
    """
    sizes = weights.decoder_linear_bytes
    candidates = [i for i, b in enumerate(sizes) if b > 0]
    for k in range(1, len(candidates) + 1):
        layers = _pick_layers(sizes, candidates, k)
        slots = dense_ring_slots(k, depth)
        on_gpu = (weights.dense_bytes - sum(sizes[i] for i in layers)
                  + slots * max(sizes[i] for i in layers))
        if on_gpu <= room_bytes:
            return layers, slots
    return None


def _pick_layers(sizes: tuple[int, ...], candidates: list[int], k: int) -> tuple[int, ...]:
    """``k`` of ``candidates``: the largest layers, ties spread evenly over the model."""
    cut = sorted((sizes[i] for i in candidates), reverse=True)[k - 1]
    bigger = [i for i in candidates if sizes[i] > cut]
    equal = [i for i in candidates if sizes[i] == cut]
    need = k - len(bigger)
    spread = [equal[(m * len(equal)) // need] for m in range(need)]
    return tuple(sorted(bigger + spread))


def _budget_too_small(w: ModelWeights, budget_bytes: int, buffers: int, depth: int) -> str:
    budget = (f"additional_config.flextensor.gpu_budget_gb={budget_bytes / GiB:.4g} "
              f"({fmt_bytes(budget_bytes)})")
    experts = (f" plus {fmt_bytes(buffers * w.layer_bytes)} for {buffers} layer-sized expert "
               f"stream buffers" if buffers else "")
    if not any(w.decoder_linear_bytes):
        floor = w.dense_bytes + buffers * w.layer_bytes
        return (f"{budget} cannot hold what FlexTensor keeps on the GPU: "
                f"{fmt_bytes(w.dense_bytes)} of non-expert weights (embeddings, attention, "
                f"norms, router, shared experts; this model's decoder layers have no linear "
                f"weights FlexTensor can stream){experts}. Raise gpu_budget_gb to at least "
                f"{_round_up_gib(floor)}, or use a GPU with more memory")
    every = tuple(i for i, b in enumerate(w.decoder_linear_bytes) if b > 0)
    slots = dense_ring_slots(len(every), depth)
    plan = OffloadPlan(w, budget_bytes, "copy", 0, buffers, every, slots)
    floor = plan.gpu_bytes
    shallow = ""
    if slots > 2:
        at_one = floor - (slots - 2) * plan.dense_slot_bytes
        shallow = (f", or lower additional_config.flextensor.dense_prefetch_depth={depth} to 1 "
                   f"(then {_round_up_gib(at_one)} GiB is enough)")
    return (f"{budget} cannot hold what FlexTensor keeps on the GPU even with the linear "
            f"weights of all {len(every)} decoder layers streamed from host memory: "
            f"{fmt_bytes(plan.resident_dense_bytes)} that stays (embeddings, lm_head, norms, "
            f"biases, routers), a ring of {slots} buffers of {fmt_bytes(plan.dense_slot_bytes)} "
            f"for streamed decoder layers (dense_prefetch_depth={depth}){experts}. Raise "
            f"gpu_budget_gb to at least {_round_up_gib(floor)}{shallow}, or use a GPU with "
            f"more memory")


def _host_too_small(plan: OffloadPlan, available: int, headroom: int) -> str:
    w = plan.weights
    homes = []
    if plan.experts_offloaded:
        homes.append(f"{fmt_bytes(w.routed_bytes)} of host memory for the routed experts' home")
    if plan.dense_layers:
        homes.append(f"{fmt_bytes(plan.dense_streamed_bytes)} of host memory for the linear "
                     f"weights of {len(plan.dense_layers)} streamed decoder layers")
    fix = ("(the budget does not change this: every expert lives in host memory)"
           if plan.experts_offloaded and not plan.dense_layers else
           f"(or raise additional_config.flextensor.gpu_budget_gb: at least "
           f"{_round_up_gib(w.dense_bytes + expert_stream_buffers(w, plan.mode) * w.layer_bytes)}"
           f" keeps every decoder layer on the GPU)")
    return (f"FlexTensor needs {' and '.join(homes)} plus host_memory_headroom_gb="
            f"{headroom / GiB:.4g} GiB, but only {fmt_bytes(available)} is available. Free host "
            f"memory, lower additional_config.flextensor.host_memory_headroom_gb, or use a "
            f"machine with more memory {fix}")


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


def budget_for_dense_layers(weights: ModelWeights, layers: int, depth: int = 1,
                            mode: str = "copy") -> int:
    """The smallest budget whose plan streams the linears of ``layers`` decoder layers
    (and caches no experts); a byte less streams more layers, if that saves anything."""
    candidates = [i for i, b in enumerate(weights.decoder_linear_bytes) if b > 0]
    if not depth + 1 < layers <= len(candidates):
        raise ValueError(f"streaming {layers} of {len(candidates)} decoder layers through a "
                         f"ring of depth {depth} + 1 buffers saves nothing or is impossible")
    chosen = _pick_layers(weights.decoder_linear_bytes, candidates, layers)
    buffers = expert_stream_buffers(weights, mode)
    plan = OffloadPlan(weights, 0, mode, 0, buffers, chosen, dense_ring_slots(layers, depth))
    return plan.gpu_bytes


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
    """Byte sizes of a model from its (text) config: MoE, or dense (no routed experts).

    Exact for Qwen2/3(-MoE), Llama and Mixtral layouts; for others (MLA attention, say) the
    dense part is an estimate, and on CUDA the worker measures it after loading.
    ``quant``: the checkpoint's quantization_config; FP8 linears (experts, and decoder-layer
    linears not in ``ignored_layers``) are 1 byte a weight plus float32 scales; everything
    else is counted at ``dtype_bytes``. ``decoder_linear_bytes`` holds, per decoder layer,
    the linear weights dense streaming can move to host memory (attention projections,
    dense MLP or shared experts).
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
    model_type = _get(cfg, "model_type")
    moe_ids = set(moe_layer_ids(cfg)) if experts else set()
    linear = _linear_bytes_for(dtype_bytes, quant)
    other = vocab * h * (1 if tied else 2) + h  # params: embeddings, lm head, final norm
    per_layer = []
    for i in range(layers):
        at = f"model.layers.{i}."
        nbytes = (linear(at + "self_attn.q_proj", heads * hd, h)
                  + linear(at + "self_attn.k_proj", kv * hd, h)
                  + linear(at + "self_attn.v_proj", kv * hd, h)
                  + linear(at + "self_attn.o_proj", h, heads * hd))
        other += 2 * h  # input and post-attention norms
        if model_type in ("qwen3_moe", "qwen3"):
            other += 2 * hd  # q_norm, k_norm
        if _get(cfg, "qkv_bias", "attention_bias",
                default=model_type in ("qwen2_moe", "qwen2")):
            other += heads * hd + 2 * kv * hd  # biases stay on the GPU
        mlp, inter = (at + "mlp.shared_expert.", shared) if i in moe_ids else (at + "mlp.",
                                                                                 dense_inter)
        if inter:
            nbytes += (linear(mlp + "gate_proj", inter, h) + linear(mlp + "up_proj", inter, h)
                       + linear(mlp + "down_proj", h, inter))
        if i in moe_ids:
            other += experts * h + (h if shared else 0)  # router, shared-expert gate
        per_layer.append(nbytes)
    block = None
    weight_bytes: float = dtype_bytes
    if quant and quant.get("quant_method") == "fp8":
        weight_bytes = 1
        if quant.get("weight_block_size"):
            block = tuple(int(b) for b in quant["weight_block_size"])
    return ModelWeights(dense_bytes=int(other * dtype_bytes) + sum(per_layer),
                        moe_layers=len(moe_ids), experts_per_layer=experts,
                        expert_bytes=expert_bytes_for(h, moe_inter, weight_bytes, block),
                        top_k=top_k, decoder_linear_bytes=tuple(per_layer))


def _linear_bytes_for(dtype_bytes: int, quant: dict | None):
    """``bytes(name, out_features, in_features)`` of one linear's weight in the checkpoint:
    FP8 (plus float32 scales) unless the quantization config leaves ``name`` unquantized."""
    fp8 = bool(quant) and quant.get("quant_method") == "fp8"
    block = tuple(int(b) for b in quant["weight_block_size"]) if (
        fp8 and quant.get("weight_block_size")) else None
    ignored = list((quant or {}).get("ignored_layers")
                   or (quant or {}).get("modules_to_not_convert") or [])

    def nbytes(name: str, n: int, k: int) -> int:
        if not fp8 or any(name == p or name.startswith(p + ".") for p in ignored):
            return n * k * dtype_bytes
        if block is None:
            return n * k + 4  # per-tensor scale
        return n * k + 4 * math.ceil(n / block[0]) * math.ceil(k / block[1])

    return nbytes

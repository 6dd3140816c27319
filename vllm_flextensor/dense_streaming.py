"""Dense-layer streaming: decoder layers whose linear weights live in host memory and pass
through a ring of GPU buffers, a few layers ahead of the compute.

When the GPU budget cannot hold every non-expert weight, the plan (``planner.py``) picks as
few decoder layers as needed; their linears (attention projections, dense MLP, shared
experts; never embeddings, lm_head, norms, biases or MoE routers) are *streamed*. Follow one
weight, ``model.layers.3.self_attn.qkv_proj.weight``:

1. Construction. vLLM builds the ``QKVParallelLinear``; its quant method's ``create_weights``
   allocates the weight on the GPU. When the attention module assigns the layer to
   ``self.qkv_proj``, torch's module-registration hook (``vllm_compat``) hands it to
   :func:`on_linear_built`: layer 3 is streamed, so the weight gets a host home (pinned,
   with its content) and the parameter becomes the GPU's UVA view of that home. The GPU
   tensor is freed: at most one linear is on the GPU while the model is built, and vLLM's
   checkpoint loader (or dummy initialiser) then writes the weight straight to host memory.
2. After loading. vLLM's own ``process_weights_after_loading`` runs on the layer (FP8 may
   re-lay out weights and scales); whatever tensors the layer holds then (parameters,
   buffers, tensor attributes; not the bias) get a host home too, if they are not already
   in one, and any home nothing reads any more is released. The layer's quant method becomes
   :class:`StreamedLinearMethod`. Once every streamed linear is in, the ring is allocated:
   ``dense_prefetch_depth + 1`` GPU buffers, each laid out to hold any streamed decoder
   layer's tensors.
3. Forward. ``LinearBase.forward`` calls ``quant_method.apply``, which calls the torch custom
   op ``vllm_flextensor::streamed_linear`` (opaque to torch.compile, with a fake for
   tracing). The op (:meth:`DenseStreaming.run`) enters decoder layer 3 in the ring: the
   compute stream waits (a CUDA event, no host synchronisation) until layer 3's tensors are
   in their slot, and the copies of the layers ``depth`` ahead are issued on a side stream
   (wrapping into the next forward pass), each into a slot whose last reader the compute
   stream has recorded as done. The layer's tensors are pointed at the slot, vLLM's own
   quant method computes (so bf16/fp16/fp32 and FP8 linears work alike), and the tensors
   are pointed back at their home.

On CPU the copies run synchronously, in the same schedule, into the same ring: the logic
CUDA runs. ``worker_stats`` / Prometheus count the bytes streamed and the time the compute
waited, per streamed decoder layer.
"""

import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from vllm_flextensor import vllm_compat
from vllm_flextensor.planner import GiB, OffloadPlan, fmt_bytes, plan_offload
from vllm_flextensor.streaming import CopyTimer

log = vllm_compat.logger("flextensor")

ALIGN = 512  # bytes between tensors in a ring slot (any dtype's view stays aligned)
_DECODER_LAYER = re.compile(r"^(?:.*\.)?(?:model|language_model)\.layers\.(\d+)\.")
_OUT_FEATURES: dict[int, int] = {}  # linear id -> output width, for the op's fake


def decoder_layer_of(prefix: str) -> tuple[int, str] | None:
    """``model.layers.3.self_attn.qkv_proj`` -> ``(3, "model.layers.3")``; None for linears
    outside decoder layers and for routers (``...mlp.gate``, ``...shared_expert_gate``),
    which every token of the layer reads before anything else and stay on the GPU."""
    m = _DECODER_LAYER.match(prefix)
    if m is None:
        return None
    leaf = prefix.rsplit(".", 1)[-1]
    if leaf == "gate" or leaf.endswith("_gate") or leaf == "router":
        return None
    return int(m.group(1)), prefix[:m.end() - 1]


def storage_span(t: torch.Tensor) -> int:
    """Elements of storage ``t`` covers from its first element (its strides included)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def flat(t: torch.Tensor) -> torch.Tensor:
    """The 1-D contiguous run of storage under ``t`` (same dtype)."""
    return t.as_strided((storage_span(t),), (1,))


@dataclass
class DenseLayerStats:
    forwards: int = 0
    copies: int = 0                # decoder-layer fills of a ring slot
    bytes_streamed: int = 0        # host -> GPU bytes
    stream_ms: float = 0.0         # copy time (side stream on CUDA)
    wait_ms: float = 0.0           # time the compute stood still for this layer's weights


@dataclass
class StreamedTensor:
    """One tensor of a streamed linear: its host home and how the layer holds it."""

    name: str
    kind: str                      # "param", "buffer" or "attr"
    param: Optional[torch.nn.Parameter]
    home: torch.Tensor             # 1-D host tensor (pinned on CUDA) over the storage span
    at_home: torch.Tensor          # what the layer holds between forwards (UVA view on CUDA)
    offset: int = 0                # byte offset in a ring slot

    @property
    def nbytes(self) -> int:
        return self.home.numel() * self.home.element_size()

    def view_in(self, slot: torch.Tensor) -> torch.Tensor:
        """This tensor, laid out as at home, in ring slot ``slot`` (a uint8 buffer)."""
        raw = slot[self.offset:self.offset + self.nbytes].view(self.home.dtype)
        return raw.as_strided(self.at_home.shape, self.at_home.stride())


@dataclass
class StreamedLinear:
    id: int
    linear: torch.nn.Module
    layer: int                     # decoder layer index
    inner: object = None           # vLLM's quant method
    preload: list = field(default_factory=list)    # (home, view) before loading
    tensors: list = field(default_factory=list)    # StreamedTensor after loading
    slot_views: list = field(default_factory=list)  # per ring slot: the tensors' views

    def point_at(self, views) -> None:
        lin = self.linear
        for st, v in zip(self.tensors, views):
            if st.kind == "param":
                st.param.data = v
            elif st.kind == "buffer":
                lin._buffers[st.name] = v
            else:
                lin.__dict__[st.name] = v

    def point_home(self) -> None:
        self.point_at([st.at_home for st in self.tensors])


class DenseRing:
    """``slots`` GPU buffers that the streamed decoder layers pass through, in forward order.

    The streamed layers ``order[0..k-1]`` of forward pass ``p`` are numbered
    ``g = p * k + i``; position ``g`` uses slot ``g % slots``. Entering position ``g``:

        compute stream  records "consumed" for the slot of the layer it leaves
        side stream     fills ``g``'s slot if it does not hold that layer yet (first pass)
        compute stream  waits for "filled" of ``g``'s slot (an event: no host sync)
        side stream     fills the slots of ``g+1 .. g+slots-1`` (the next pass's first
                        layers after the last), each after waiting for its "consumed"

    so with ``slots = depth + 1`` the copy of the layer ``depth`` ahead goes into the slot
    the compute just left, and runs while the layers in between compute. A slot keeps what
    it holds across passes (``holds``): nothing is copied twice in a row.
    """

    def __init__(self, order: list[int], layouts: dict[int, list[StreamedTensor]],
                 slots: int, slot_bytes: int, device: torch.device,
                 stats: dict[int, DenseLayerStats], on_pass_start=None):
        self.order = order
        self.position = {j: i for i, j in enumerate(order)}
        self.layouts = layouts
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.stats = stats
        self.on_pass_start = on_pass_start
        self.buffers = [torch.empty(slot_bytes, dtype=torch.uint8, device=device)
                        for _ in range(slots)]
        self.holds: list[int | None] = [None] * slots
        self.passes = 0
        self._current: tuple | None = None  # (layer, g, slot, compute stream)
        if self.is_cuda:
            self.stream = torch.cuda.Stream(device=device)
            self.filled = [torch.cuda.Event() for _ in range(slots)]
            self.consumed = [torch.cuda.Event() for _ in range(slots)]
            self.timer = CopyTimer()

    @property
    def slots(self) -> int:
        return len(self.buffers)

    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def enter(self, layer: int) -> int:
        """The slot holding ``layer``'s tensors, ready for the compute stream to read."""
        cur = self._current
        if cur is not None and cur[0] == layer:
            if self.is_cuda:
                self._join_other_stream(cur)
            return cur[2]
        i = self.position[layer]
        if cur is None or i <= self.position[cur[0]]:
            if cur is not None:
                self.passes += 1
            if self.on_pass_start is not None:
                self.on_pass_start()
        g = self.passes * len(self.order) + i
        if cur is not None:
            self._release(cur[2])
        slot = g % self.slots
        if self.holds[slot] != layer:
            self._fill(slot, layer)
        self._wait(slot, layer)
        for ahead in range(g + 1, g + self.slots):
            s, j = ahead % self.slots, self.order[ahead % len(self.order)]
            if self.holds[s] != j:
                self._fill(s, j)
        stream = torch.cuda.current_stream(self.device) if self.is_cuda else None
        self._current = (layer, g, slot, stream)
        return slot

    def _fill(self, slot: int, layer: int) -> None:
        """Copy ``layer``'s tensors from their homes into ``slot`` (side stream on CUDA)."""
        st = self.stats[layer]
        dst = self.buffers[slot]
        tensors = self.layouts[layer]
        st.copies += 1
        st.bytes_streamed += sum(t.nbytes for t in tensors)
        self.holds[slot] = layer
        if not self.is_cuda:
            t0 = time.perf_counter()
            for t in tensors:
                dst[t.offset:t.offset + t.nbytes].copy_(t.home.view(torch.uint8))
            ms = (time.perf_counter() - t0) * 1e3
            st.stream_ms += ms
            st.wait_ms += ms  # synchronous: the compute waited for all of it
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.consumed[slot])
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            for t in tensors:
                dst[t.offset:t.offset + t.nbytes].copy_(t.home.view(torch.uint8),
                                                        non_blocking=True)
            end.record(self.stream)
            self.filled[slot].record(self.stream)
        self.timer.started(slot, st, start, end)

    def _wait(self, slot: int, layer: int) -> None:
        self.stats[layer].forwards += 1
        if self.is_cuda:
            compute = torch.cuda.current_stream(self.device)
            self.timer.compute_arrives(slot, compute)
            compute.wait_event(self.filled[slot])

    def _join_other_stream(self, cur) -> None:
        """A linear of the current layer running on another stream (vLLM may run shared
        experts on one) waits for the slot there too."""
        compute = torch.cuda.current_stream(self.device)
        if compute != cur[3]:
            compute.wait_event(self.filled[cur[2]])

    def _release(self, slot: int) -> None:
        """Everything the compute stream queued so far may read ``slot``; later fills of it
        wait for this point."""
        if self.is_cuda:
            self.consumed[slot].record(torch.cuda.current_stream(self.device))

    def collect_timings(self) -> None:
        if self.is_cuda:
            self.timer.collect()


class StreamedLinearMethod(vllm_compat.LinearMethodProxy):
    """The quant method of a streamed linear: computes through the opaque custom op."""

    def __init__(self, inner, linear_id: int):
        self.inner = inner
        self.linear_id = linear_id

    def apply(self, layer, x, bias=None):
        return torch.ops.vllm_flextensor.streamed_linear(x, bias, self.linear_id)


class DenseStreaming:
    """Per-process dense streaming: the plan, the streamed linears, the ring, the counters."""

    _instance: "DenseStreaming | None" = None
    _engine = None            # the vLLM config _instance was made for
    _lock = threading.Lock()

    def __init__(self, cfg, plan: OffloadPlan, device: torch.device):
        self.cfg = cfg
        self.plan = plan
        self.device = device
        self.streamed = set(plan.dense_layers)
        self.linears: list[StreamedLinear] = []
        self.names: dict[int, str] = {}
        self.stats: dict[int, DenseLayerStats] = {}
        self.loaded = 0
        self.ring: DenseRing | None = None
        self.metrics = None

    @classmethod
    def get(cls) -> "DenseStreaming | None":
        return cls._instance

    @classmethod
    def for_current_engine(cls) -> "DenseStreaming | None":
        """The runtime of the engine being built here, made (and its plan logged) on the
        first call; None when that engine streams no dense layer."""
        engine = vllm_compat.current_vllm_config()
        if engine is None:
            return None
        with cls._lock:
            if cls._engine is not engine:
                cls._engine, cls._instance = engine, None
                cls._instance = cls._plan_for(engine)
            return cls._instance

    @classmethod
    def _plan_for(cls, engine) -> "DenseStreaming | None":
        from vllm_moe_core.config import parse_flextensor_config

        cfg = parse_flextensor_config(engine.additional_config)
        if not cfg.enabled or cfg.gpu_budget_gb < 0:
            return None
        device = vllm_compat.current_device()
        mode = vllm_compat.resolve_mode(cfg.mode, device)
        weights = vllm_compat.estimate_weights(engine.model_config)
        plan = plan_offload(weights, int(cfg.gpu_budget_gb * GiB), mode,
                            dense_prefetch_depth=cfg.dense_prefetch_depth)
        if not plan.dense_layers:
            return None
        vllm_compat.check_single_gpu_for_dense(*vllm_compat.parallel_sizes(engine))
        log.info("%s", plan.describe())
        _register_op()
        return cls(cfg, plan, device)

    # ---- 1. construction: weights go to their host home before loading -----------------
    def adopt(self, linear) -> None:
        """Take ``linear`` if its decoder layer is streamed: its tensors (but the bias) move
        to host memory now, vLLM's post-load step is wrapped."""
        if getattr(linear, "_flextensor_streamed", None) is not None:
            return
        where = decoder_layer_of(vllm_compat.linear_prefix(linear))
        if where is None or where[0] not in self.streamed:
            return
        vllm_compat.check_streamable_linear(linear)
        layer, name = where
        entry = StreamedLinear(len(self.linears), linear, layer)
        for pname, p in linear.named_parameters(recurse=False):
            if pname == "bias":
                continue
            home, view = self._make_home(p.data)
            p.data = view
            entry.preload.append((home, view))
        self.linears.append(entry)
        self.names[layer] = name
        self.stats.setdefault(layer, DenseLayerStats())
        _OUT_FEATURES[entry.id] = vllm_compat.linear_out_features(linear)
        linear._flextensor_streamed = entry.id
        vllm_compat.wrap_linear_post_load(linear, lambda run_vllm: self._after_loading(entry,
                                                                                       run_vllm))

    def _make_home(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A host copy of ``t`` (its whole storage span, pinned on CUDA), and the tensor the
        layer holds instead of ``t``: the GPU's UVA view of it, with ``t``'s strides."""
        home = vllm_compat.host_pages(storage_span(t) * t.element_size(), self.device)
        home = home.view(t.dtype)
        if home.numel() == 0:
            return home, torch.empty(t.shape, dtype=t.dtype, device=self.device)
        home.copy_(flat(t))
        base = vllm_compat.device_view_of_host(home, self.device)
        return home, base.as_strided(t.shape, t.stride())

    # ---- 2. after loading: whatever the layer holds goes home; the ring ----------------
    def _after_loading(self, entry: StreamedLinear, run_vllm) -> None:
        linear = entry.linear
        entry.inner = linear.quant_method
        run_vllm()  # vLLM's own post-load step (may re-lay out, add scales)
        kept = set()
        for name, kind, t in self._tensors_held(linear):
            home = self._preload_home_of(entry, t)
            if home is None:
                home, view = self._make_home(t)
            else:
                kept.add(id(home))
                view = t
            param = getattr(linear, name) if kind == "param" else None
            entry.tensors.append(StreamedTensor(name, kind, param, home, view))
        entry.point_home()
        for home, _ in entry.preload:
            if id(home) not in kept:
                vllm_compat.release_host_home(home)
        entry.preload = []
        linear.quant_method = StreamedLinearMethod(entry.inner, entry.id)
        self.loaded += 1
        if self.loaded == len(self.linears):
            self._build_ring()

    def _tensors_held(self, linear):
        """``(name, kind, tensor)`` of every tensor on this device the layer holds, but the
        bias (small; ``LinearBase.forward`` reads it before the quant method runs)."""
        seen, out = set(), []
        for name, p in linear.named_parameters(recurse=False):
            out.append((name, "param", p.data))
            seen.add(id(p))
        for name, b in linear.named_buffers(recurse=False):
            out.append((name, "buffer", b))
            seen.add(id(b))
        for name, v in list(vars(linear).items()):
            if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter) \
                    and id(v) not in seen:
                out.append((name, "attr", v))
        return [(n, k, t) for n, k, t in out
                if n != "bias" and t is not None and t.device == self.device]

    @staticmethod
    def _preload_home_of(entry: StreamedLinear, t: torch.Tensor) -> torch.Tensor | None:
        """The pre-load home ``t`` still is (vLLM's post-load left it alone), if any."""
        for home, view in entry.preload:
            if (home.numel() and t.data_ptr() == view.data_ptr() and t.dtype == home.dtype
                    and storage_span(t) <= home.numel()):
                return home
        return None

    def _build_ring(self) -> None:
        """Lay every streamed decoder layer's tensors out in one slot shape; allocate the
        ring and each linear's views into every slot."""
        layouts: dict[int, list[StreamedTensor]] = {}
        for entry in self.linears:
            layouts.setdefault(entry.layer, []).extend(entry.tensors)
        sizes = {}
        for layer, tensors in layouts.items():
            offset = 0
            for t in tensors:
                t.offset = offset
                offset += -(-t.nbytes // ALIGN) * ALIGN
            sizes[layer] = offset
        missing = sorted(self.streamed - set(layouts))
        if missing:
            log.warning("FlexTensor planned to stream decoder layers %s but found no linear "
                        "layers there; they stay as the model built them", missing)
        order = sorted(layouts)
        slots = min(self.plan.dense_ring_slots, len(order))
        self.ring = DenseRing(order, layouts, slots, max(sizes.values()), self.device,
                              self.stats, self._on_pass_start)
        for entry in self.linears:
            entry.slot_views = [[t.view_in(buf) for t in entry.tensors]
                                for buf in self.ring.buffers]
        log.info("FlexTensor dense streaming ready: %d linears of %d decoder layers in host "
                 "memory (%s), a GPU ring of %d x %s, copies %d layer%s ahead of the compute",
                 len(self.linears), len(order), fmt_bytes(sum(sizes.values())), slots,
                 fmt_bytes(max(sizes.values())), slots - 1, "" if slots == 2 else "s")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def ring_bytes_pending(self) -> int:
        """GPU bytes the ring will take that are not allocated yet (sized from the
        streamed linears' tensors as built, before any post-load step)."""
        if self.ring is not None:
            return 0
        per_layer: dict[int, int] = {}
        for entry in self.linears:
            tensors = ([h for h, _ in entry.preload] if entry.preload
                       else [t.home for t in entry.tensors])
            per_layer[entry.layer] = per_layer.get(entry.layer, 0) + sum(
                -(-(h.numel() * h.element_size()) // ALIGN) * ALIGN for h in tensors)
        slots = min(self.plan.dense_ring_slots, len(per_layer))
        return slots * max(per_layer.values(), default=0)

    # ---- 3. forward ---------------------------------------------------------------------
    def run(self, linear_id: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        entry = self.linears[linear_id]
        if self.ring is None:
            raise RuntimeError(
                f"FlexTensor: {self.loaded} of {len(self.linears)} streamed linears went "
                f"through vLLM's post-load step before the first forward; dense streaming "
                f"cannot run a layer whose weights are not in host memory yet")
        slot = self.ring.enter(entry.layer)
        entry.point_at(entry.slot_views[slot])
        try:
            return entry.inner.apply(entry.linear, x, bias)
        finally:
            entry.point_home()

    def _on_pass_start(self) -> None:
        if self.metrics is None:
            from vllm_flextensor.metrics import DENSE_FIELDS, MetricsPublisher

            self.metrics = MetricsPublisher(DENSE_FIELDS)
        self.metrics.publish(self.layer_stats())

    # ---- counters -----------------------------------------------------------------------
    def layer_stats(self) -> list[dict]:
        if self.ring is not None:
            self.ring.collect_timings()
        return [dict(layer=self.names[j], **asdict(self.stats[j])) for j in sorted(self.stats)]

    def summary(self) -> dict:
        layers = self.layer_stats()
        plan = self.plan
        ring = self.ring
        return {
            "plan": {
                "budget_gib": plan.budget_bytes / GiB,
                "decoder_layers": len(plan.weights.decoder_linear_bytes),
                "dense_layers": list(plan.dense_layers),
                "prefetch_depth": self.cfg.dense_prefetch_depth,
                "ring_slots": ring.slots if ring else plan.dense_ring_slots,
                "ring_bytes": ring.nbytes() if ring else 0,
                "streamed_bytes": sum(t.nbytes for e in self.linears for t in e.tensors),
                "linears": len(self.linears),
                "estimated_resident_gib": plan.resident_dense_bytes / GiB,
            },
            "totals": {k: sum(s[k] for s in layers) for k in asdict(DenseLayerStats())},
            "layers": layers,
        }


def on_linear_built(linear) -> None:
    """Called (through ``vllm_compat``) for every vLLM linear as it joins its parent."""
    runtime = DenseStreaming.for_current_engine()
    if runtime is not None:
        runtime.adopt(linear)


def worker_stats(worker=None) -> dict:
    """Dense streaming's plan and counters in this worker ({} if nothing streams)."""
    runtime = DenseStreaming.get()
    return runtime.summary() if runtime is not None else {}


_OP_REGISTERED = False


def _register_op() -> None:
    """``torch.ops.vllm_flextensor.streamed_linear(x, bias, linear_id)``: one streamed
    linear's forward. A custom op, so torch.compile keeps it opaque (the weights it reads
    change place every call); its fake gives the output shape for tracing."""
    global _OP_REGISTERED
    if _OP_REGISTERED:
        return

    @torch.library.custom_op("vllm_flextensor::streamed_linear", mutates_args=())
    def streamed_linear(x: torch.Tensor, bias: Optional[torch.Tensor],
                        linear_id: int) -> torch.Tensor:
        return DenseStreaming.get().run(linear_id, x, bias)

    @streamed_linear.register_fake
    def _(x, bias, linear_id):
        return x.new_empty((*x.shape[:-1], _OUT_FEATURES[linear_id]))

    _OP_REGISTERED = True


__all__ = ["DenseStreaming", "on_linear_built", "worker_stats", "decoder_layer_of"]

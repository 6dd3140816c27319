"""Composite memory: one virtual address range assembled from pages of several physical segments.

A *segment* is physical memory with a shareable handle, a file descriptor another process of the
same host can map: a ``memfd`` on the host, a CUDA VMM allocation (``cuMemCreate`` with POSIX-FD
handles) on a GPU. A *range* is reserved address space; :meth:`map` places pages of a segment at an
offset of it, so one range can show, back to back, pages of this process's own segment and pages of
shared receive segments, and any kernel sees an ordinary tensor over it.

Both backends have the same five calls: ``create``, ``import_fd``, ``reserve``, ``map`` and
``tensor``, and both work in page units (:attr:`page`): 4 KiB on the host, the device's VMM
granularity (2 MiB on Hopper) on a GPU. Mappings live as long as the object that made them
(``close`` releases everything); tensors returned by :meth:`tensor` do not own their memory.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from dataclasses import dataclass, field

import torch


class CompositeMemoryError(RuntimeError):
    """A segment could not be created, shared or mapped."""


@dataclass
class Segment:
    """Physical memory: ``nbytes`` (a page multiple) behind a shareable file descriptor."""

    nbytes: int
    fd: int                       # -1 once closed (the mappings keep the memory alive)
    handle: object = None         # CUDA: the CUmemGenericAllocationHandle
    imported: bool = False


def round_up(n: int, page: int) -> int:
    return (n + page - 1) // page * page


# ---- host ---------------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def _mmap(addr, nbytes, prot, flags, fd, offset) -> int:
    out = _libc.mmap(addr, nbytes, prot, flags, fd, offset)
    if out is None or out == _MAP_FAILED:
        err = ctypes.get_errno()
        raise CompositeMemoryError(f"mmap of {nbytes} bytes failed: {os.strerror(err)}")
    return out


class HostMemory:
    """Host backend: memfd segments mapped with ``mmap(MAP_SHARED | MAP_FIXED)``."""

    kind = "host"

    def __init__(self):
        self.page = mmap.PAGESIZE
        self._ranges: list[tuple[int, int]] = []
        self._segments: list[Segment] = []
        self._lock = threading.Lock()

    def create(self, nbytes: int, name: str) -> Segment:
        nbytes = round_up(max(nbytes, 1), self.page)
        fd = os.memfd_create(f"vllm-moe-{name}"[:240], os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
        except OSError as e:
            os.close(fd)
            raise CompositeMemoryError(f"cannot size a {nbytes}-byte memfd segment: {e}") from e
        seg = Segment(nbytes, fd)
        self._segments.append(seg)
        return seg

    def import_fd(self, fd: int, nbytes: int) -> Segment:
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise CompositeMemoryError(f"a peer's segment holds {size} bytes, {nbytes} expected")
        seg = Segment(nbytes, fd, imported=True)
        self._segments.append(seg)
        return seg

    def reserve(self, nbytes: int) -> int:
        """Address space for ``nbytes`` (a page multiple), inaccessible until mapped."""
        addr = _mmap(None, nbytes, 0,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        with self._lock:
            self._ranges.append((addr, nbytes))
        return addr

    def map(self, addr: int, segment: Segment, offset: int, nbytes: int) -> None:
        """Map ``segment[offset:offset+nbytes]`` at ``addr`` (all page multiples)."""
        if nbytes == 0:
            return
        if segment.fd < 0:
            raise CompositeMemoryError("segment already closed: map it before close_fd()")
        _mmap(addr, nbytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED,
              segment.fd, offset)

    def map_whole(self, segment: Segment) -> int:
        """The whole segment at a fresh address (for reading a peer's pages)."""
        addr = self.reserve(segment.nbytes)
        self.map(addr, segment, 0, segment.nbytes)
        return addr

    def tensor(self, addr: int, nbytes: int, device: torch.device | None = None) -> torch.Tensor:
        """A uint8 tensor over ``[addr, addr + nbytes)``; it does not own the memory."""
        buf = (ctypes.c_uint8 * nbytes).from_address(addr)
        return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)

    def close_fd(self, segment: Segment) -> None:
        if segment.fd >= 0:
            os.close(segment.fd)
            segment.fd = -1

    def close(self) -> None:
        """Unmap every range and close every descriptor (tensors over them become invalid)."""
        with self._lock:
            ranges, self._ranges = self._ranges, []
        for addr, nbytes in ranges:
            _libc.munmap(addr, nbytes)
        for seg in self._segments:
            self.close_fd(seg)
        self._segments.clear()


# ---- CUDA ---------------------------------------------------------------------------------------
def _cu():
    try:
        from cuda.bindings import driver
    except ImportError as e:  # pragma: no cover - depends on the install
        raise CompositeMemoryError(
            "composite expert memory on CUDA needs cuda-python's driver bindings: "
            "pip install 'cuda-python>=12.4' (cuda.bindings.driver)") from e
    return driver


def _check(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        drv = _cu()
        _, name = drv.cuGetErrorName(err)
        raise CompositeMemoryError(f"{what} failed: {name.decode() if name else err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


class _CudaArray:
    """Just enough of ``__cuda_array_interface__`` for ``torch.as_tensor`` to wrap a pointer."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "version": 3, "strides": None}


@dataclass
class _CudaRange:
    ptr: int
    nbytes: int
    mapped: list[tuple[int, int]] = field(default_factory=list)


class CudaMemory:
    """CUDA backend: VMM allocations exported as POSIX file descriptors, mapped into reserved
    virtual ranges with ``cuMemMap`` and made readable and writable by this device."""

    kind = "cuda"

    def __init__(self, device: torch.device):
        drv = _cu()
        self.device = torch.device(device)
        self.index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        torch.cuda.init()
        torch.empty(1, device=self.device)  # the primary context is current from here on
        prop = drv.CUmemAllocationProp()
        prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.index
        prop.requestedHandleTypes = (
            drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        self._prop = prop
        self.page = int(_check(drv.cuMemGetAllocationGranularity(
            prop, drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            "cuMemGetAllocationGranularity"))
        access = drv.CUmemAccessDesc()
        access.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.index
        access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = access
        self._ranges: list[_CudaRange] = []
        self._segments: list[Segment] = []

    def create(self, nbytes: int, name: str) -> Segment:
        drv = _cu()
        nbytes = round_up(max(nbytes, 1), self.page)
        handle = _check(drv.cuMemCreate(nbytes, self._prop, 0), f"cuMemCreate({nbytes})")
        fd = _check(drv.cuMemExportToShareableHandle(
            handle, drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
            "cuMemExportToShareableHandle")
        seg = Segment(nbytes, int(fd), handle=handle)
        self._segments.append(seg)
        return seg

    def import_fd(self, fd: int, nbytes: int) -> Segment:
        drv = _cu()
        handle = _check(drv.cuMemImportFromShareableHandle(
            fd, drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
            "cuMemImportFromShareableHandle")
        seg = Segment(nbytes, fd, handle=handle, imported=True)
        self._segments.append(seg)
        return seg

    def reserve(self, nbytes: int) -> int:
        drv = _cu()
        ptr = _check(drv.cuMemAddressReserve(nbytes, self.page, 0, 0), "cuMemAddressReserve")
        self._ranges.append(_CudaRange(int(ptr), nbytes))
        return int(ptr)

    def map(self, addr: int, segment: Segment, offset: int, nbytes: int) -> None:
        if nbytes == 0:
            return
        drv = _cu()
        _check(drv.cuMemMap(addr, nbytes, offset, segment.handle, 0), "cuMemMap")
        _check(drv.cuMemSetAccess(addr, nbytes, [self._access], 1), "cuMemSetAccess")
        for r in self._ranges:
            if r.ptr <= addr < r.ptr + r.nbytes:
                r.mapped.append((addr, nbytes))
                break

    def map_whole(self, segment: Segment) -> int:
        addr = self.reserve(segment.nbytes)
        self.map(addr, segment, 0, segment.nbytes)
        return addr

    def tensor(self, addr: int, nbytes: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.as_tensor(_CudaArray(addr, nbytes), device=self.device)

    def close_fd(self, segment: Segment) -> None:
        if segment.fd >= 0:
            os.close(segment.fd)
            segment.fd = -1

    def close(self) -> None:
        drv = _cu()
        torch.cuda.synchronize(self.device)
        for r in self._ranges:
            for addr, nbytes in r.mapped:
                drv.cuMemUnmap(addr, nbytes)
            drv.cuMemAddressFree(r.ptr, r.nbytes)
        self._ranges.clear()
        for seg in self._segments:
            self.close_fd(seg)
            if seg.handle is not None:
                drv.cuMemRelease(seg.handle)
                seg.handle = None
        self._segments.clear()


def memory_for(device: torch.device):
    """The backend for ``device``: :class:`CudaMemory` on CUDA, :class:`HostMemory` on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return CudaMemory(device)
    if device.type == "cpu":
        return HostMemory()
    raise CompositeMemoryError(f"composite expert memory supports cpu and cuda, not {device.type}")

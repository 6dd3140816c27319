"""Host time to enqueue one host-to-GPU copy, by how the host memory was pinned and copy size.

FlexTensor's decode steps enqueue ~10 expert copies per MoE layer; the torch profiler of a
batch-1 step on an H200 showed ``cudaMemcpyAsync`` taking ~100 us of host time per call.
This measures, for memory pinned in place with ``cudaHostRegister`` (FlexTensor's expert
homes), with ``cudaHostAlloc`` (torch's ``pin_memory=True``) and, for reference, pageable
memory: the host time of ``dst.copy_(src, non_blocking=True)`` (median of N calls, each on
an idle side stream) and the copy's device time (CUDA events).

    python benchmarks/h2d_enqueue_cost.py            # writes $OUT/h2d_enqueue_cost.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_flextensor import vllm_compat  # noqa: E402

MiB = 1 << 20


def expert_home(nbytes: int) -> torch.Tensor:
    """Host memory as FlexTensor pins its expert homes (``vllm_compat.host_home``)."""
    t = vllm_compat.host_home((nbytes,), torch.uint8, torch.device("cuda"))
    # host_home falls back to torch's allocator if registering fails: that would be the
    # other row of this table, not this one.
    assert t.data_ptr() in vllm_compat._REGISTERED, "cudaHostRegister failed"
    return t


def measure(src: torch.Tensor, dst: torch.Tensor, size: int, calls: int) -> dict:
    stream = torch.cuda.Stream()
    host_us, dev_ms = [], []
    for i in range(calls + 2):
        off = (i * size) % (src.numel() - size)
        s, d = src[off:off + size], dst[:size]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        with torch.cuda.stream(stream):
            start.record(stream)
            t0 = time.perf_counter()
            d.copy_(s, non_blocking=True)
            t1 = time.perf_counter()
            end.record(stream)
        end.synchronize()
        if i >= 2:  # warm-up
            host_us.append((t1 - t0) * 1e6)
            dev_ms.append(start.elapsed_time(end))
    med = statistics.median(dev_ms)
    return {"size_mib": size / MiB, "host_us_median": statistics.median(host_us),
            "host_us_max": max(host_us), "device_ms_median": med,
            "gb_per_s": size / (med / 1e3) / 1e9}


def main() -> int:
    out = Path(os.environ.get("OUT", "."))
    total = 1 << 30
    dst = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")
    kinds = {"cudaHostRegister (FlexTensor homes)": expert_home(total),
             "cudaHostAlloc (torch pin_memory)": torch.empty(total, dtype=torch.uint8,
                                                             pin_memory=True),
             "pageable": torch.empty(total, dtype=torch.uint8)}
    sizes = [int(x * MiB) for x in (0.0625, 1, 3, 6, 9.4, 48)]
    report = {"command": "python " + " ".join(sys.argv), "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "results": {}}
    for name, src in kinds.items():
        src.fill_(1)
        report["results"][name] = [measure(src, dst, n, 30) for n in sizes]
        for r in report["results"][name]:
            print(f"{name:38s} {r['size_mib']:7.2f} MiB  host {r['host_us_median']:8.1f} us "
                  f"(max {r['host_us_max']:8.1f})  device {r['device_ms_median']:.3f} ms "
                  f"{r['gb_per_s']:5.1f} GB/s", flush=True)
    (out / "h2d_enqueue_cost.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

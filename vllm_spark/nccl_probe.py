"""A short collective between the nodes that says which transport NCCL took, RDMA or
sockets, and how fast it was: ``python -m vllm_spark.nccl_probe RANK WORLD MASTER PORT MB
ITERS`` on every node (``vllm-spark nccl-probe`` starts them).

Each rank joins ``torch.distributed`` over TCP at MASTER:PORT (NCCL on CUDA nodes, Gloo on
CPU-only ones), all-reduces an MB MiB float32 tensor ITERS times after two warm-up rounds,
and prints one JSON line: backend, seconds per all-reduce and the bus bandwidth
(2 (n-1)/n x bytes / time, the figure nccl-tests reports). With ``NCCL_DEBUG=INFO`` in the
environment NCCL's own log lines (``NET/IB`` or ``NET/Socket``) go to the same output, where
:func:`vllm_spark.netenv.nccl_transport` reads the transport.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> None:
    import torch
    import torch.distributed as dist

    rank, world, master, port, mb, iters = (int(argv[0]), int(argv[1]), argv[2],
                                            int(argv[3]), float(argv[4]), int(argv[5]))
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{master}:{port}", rank=rank,
                            world_size=world)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    x = torch.ones(int(mb * (1 << 20)) // 4, dtype=torch.float32, device=device)
    for _ in range(2):
        dist.all_reduce(x)
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    if cuda:
        torch.cuda.synchronize()
    per = (time.perf_counter() - t0) / iters
    nbytes = x.numel() * 4
    print(json.dumps({"probe": "allreduce", "rank": rank, "backend": backend, "bytes": nbytes,
                      "seconds": per,
                      "busbw_GBps": 2 * (world - 1) / world * nbytes / per / 1e9}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

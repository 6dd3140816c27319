"""DWDP pull path on two GPUs: achieved peer-pull bandwidth, alone and under a GEMM.

Runs the real DWDP parts (``PeerGroup`` over CUDA IPC, ``ExpertPrefetcher``) with the MoE
shapes of a model config, two processes, one per GPU:

    python benchmarks/dwdp_pull_bandwidth.py --out result.json [--config qwen3_30b_a3b]

Rank 1 exports its experts of every layer; rank 0 pulls them layer after layer into the
ping-pong slots, timed with CUDA events on the side stream, (a) alone and (b) while a bf16
GEMM of prefill size runs on the compute stream (the overlap DWDP relies on). Reported:
bytes per layer, GB/s, fraction of the copy-engine ceiling (measured here as a plain
peer-to-peer ``copy_`` of one large buffer), GEMM slowdown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = {
    # hidden, moe_intermediate, experts, layers
    "qwen3_30b_a3b": (2048, 768, 128, 48),
    "qwen3_235b_a22b": (4096, 1536, 128, 94),
}


def run_rank(rank: int, args) -> None:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from vllm_dwdp.config import DwdpConfig
    from vllm_dwdp.peer_memory import PeerGroup, layout_slab, view_slab
    from vllm_dwdp.placement import plan_placement
    from vllm_dwdp.prefetch import ExpertPrefetcher

    hidden, inter, experts, layers = CONFIGS[args.config]
    layers = min(layers, args.layers)
    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)
    cfg = DwdpConfig(enabled=True, world_size=2, rank=rank, master_port=args.port,
                     transport="cuda_ipc", peer_timeout_s=120)
    group = PeerGroup(cfg, dev)
    placement = plan_placement(experts, 2, rank)
    n_local = len(placement.local_experts)
    published = []
    for layer in range(layers):
        params = {"w13_weight": torch.empty(n_local, 2 * inter, hidden, dtype=torch.bfloat16),
                  "w2_weight": torch.empty(n_local, hidden, inter, dtype=torch.bfloat16)}
        entries, nbytes = layout_slab(params)
        slab, handle = group.allocate(f"layer{layer}", nbytes)
        for t in view_slab(slab, entries).values():
            t.normal_()  # real data, not zeros
        published.append((handle, entries))
    torch.cuda.synchronize()
    peers = group.publish_and_gather(published)
    if rank == 1:
        group.mark_ready()
        while not group.store.check(["bench/done"]):
            time.sleep(0.2)
        return

    prefetch = ExpertPrefetcher(placement, depth=1, device=dev, cross_step=False)
    templates = {"w13_weight": torch.empty(n_local, 2 * inter, hidden, dtype=torch.bfloat16,
                                           device=dev),
                 "w2_weight": torch.empty(n_local, hidden, inter, dtype=torch.bfloat16, device=dev)}
    prefetch.allocate_slots(templates)
    for layer in range(layers):
        handle, entries = peers[1][layer]
        prefetch.add_layer(f"layer{layer}", {1: view_slab(group.open(handle), entries)})
    group.mark_ready()
    layer_bytes = prefetch.layers[0].nbytes

    # Ceiling: one large peer-to-peer copy_ (copy engine), same direction as the pulls.
    src = view_slab(group.open(peers[1][0][0]), peers[1][0][1])["w13_weight"]
    dst = torch.empty_like(src, device=dev)
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(10):
        dst.copy_(src, non_blocking=True)
    t1.record()
    torch.cuda.synchronize()
    ceiling = 10 * src.numel() * src.element_size() / (t0.elapsed_time(t1) / 1e3) / 1e9

    def pull_all(passes: int) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(prefetch.stream)
        for _ in range(passes):
            for i in range(layers):
                s = i % prefetch.num_slots
                prefetch.consumed[s].record(torch.cuda.current_stream())
                prefetch._pull(i, s)
        end.record(prefetch.stream)
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    pull_all(1)
    alone_s = pull_all(args.passes)
    alone_gbs = args.passes * layers * layer_bytes / alone_s / 1e9

    # Under a prefill-sized GEMM on the compute stream.
    a = torch.randn(args.gemm_tokens, hidden, dtype=torch.bfloat16, device=dev)
    b = torch.randn(hidden, 4 * hidden, dtype=torch.bfloat16, device=dev)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    g0, g1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g0.record()
    for _ in range(args.gemms):
        a @ b
    g1.record()
    torch.cuda.synchronize()
    gemm_alone_s = g0.elapsed_time(g1) / 1e3

    g0.record()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record(prefetch.stream)
    h0 = time.perf_counter()
    for _ in range(args.passes):
        for i in range(layers):
            s = i % prefetch.num_slots
            prefetch._pull(i, s)
    enqueue_s = time.perf_counter() - h0
    end.record(prefetch.stream)
    for _ in range(args.gemms):
        a @ b
    g1.record()
    torch.cuda.synchronize()
    gemm_overlap_s = g0.elapsed_time(g1) / 1e3
    overlap_pull_s = start.elapsed_time(end) / 1e3
    overlap_gbs = args.passes * layers * layer_bytes / overlap_pull_s / 1e9
    flops = 2 * args.gemm_tokens * hidden * 4 * hidden * args.gemms
    group.store.set("bench/done", b"1")
    result = {
        "config": args.config, "hidden": hidden, "moe_intermediate": inter, "experts": experts,
        "layers_pulled": layers, "remote_experts_per_layer": len(placement.remote_experts),
        "bytes_per_layer": layer_bytes, "passes": args.passes,
        "copy_engine_ceiling_gbs": round(ceiling, 1),
        "pull_gbs_alone": round(alone_gbs, 1),
        "pull_fraction_of_ceiling": round(alone_gbs / ceiling, 3),
        "pull_ms_per_layer_alone": round(alone_s / (args.passes * layers) * 1e3, 3),
        "pull_gbs_under_gemm": round(overlap_gbs, 1),
        "gemm_tflops_alone": round(flops / gemm_alone_s / 1e12, 1),
        "gemm_tflops_with_pulls": round(flops / gemm_overlap_s / 1e12, 1),
        "host_enqueue_ms_per_layer": round(enqueue_s / (args.passes * layers) * 1e3, 3),
        "copy_impl": os.environ.get("VLLM_DWDP_COPY_IMPL", "auto"),
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "command": " ".join(["python", "benchmarks/dwdp_pull_bandwidth.py"] + sys.argv[1:]),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="qwen3_30b_a3b", choices=sorted(CONFIGS))
    p.add_argument("--layers", type=int, default=16, help="layers exported (memory bound)")
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--gemm-tokens", type=int, default=16384)
    p.add_argument("--gemms", type=int, default=200)
    p.add_argument("--port", type=int, default=29911)
    p.add_argument("--out", default="dwdp_pull_bandwidth.json")
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank is not None:
        run_rank(args.rank, args)
        return
    procs = []
    for r in (0, 1):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="0,1" if r == 0 else "1,0")
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank", str(r)] + sys.argv[1:],
                                      env=env))
    rcs = [p.wait(timeout=900) for p in procs]
    if any(rcs):
        raise SystemExit(f"benchmark ranks exited with {rcs}")


if __name__ == "__main__":
    main()

"""vLLM's fused MoE kernel over composite expert memory vs. over ordinary tensors.

Two processes on one GPU, each a DWDP rank of a two-rank group: rank 1 stores experts
``[E/2, E)`` of one MoE layer in its own CUDA VMM pages and exports them; rank 0 (this process)
stores ``[0, E/2)`` and maps rank 1's pages, builds the layer's composite ``[E, ...]`` tensors
(``vllm_dwdp/expert_pages.py``: own pages + one receive slot) and fills the slot with one pull
from rank 1. It then times vLLM's ``fused_experts`` (the Triton fused MoE) on the composite
tensors and on plain tensors holding the same bytes, alternately, with CUDA events over CUDA-graph
replays (the kernels' time, not Python's launch overhead), and checks
both give bit-identical outputs. ``ratio`` is ``stock_ms / dwdp_ms`` (1.0: the same speed).

    python benchmarks/moe_kernel_parity.py --out benchmarks/results/moe_kernel_parity_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # routed experts of one MoE layer (config.json of each model)
    "Qwen3-30B-A3B": dict(experts=128, hidden=2048, intermediate=768, top_k=8),
    "Qwen3-235B-A22B": dict(experts=128, hidden=4096, intermediate=1536, top_k=8),
}
TOKENS = (1, 64, 2048, 8192, 16384)
BLOCK = 128


def build_weights(shape: dict, dtype: str, seed: int):
    """The same full layer in every process (seeded on the device): name -> [E, ...] tensor."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    e, h, i = shape["experts"], shape["hidden"], shape["intermediate"]
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    if dtype == "bf16":
        return {"w13_weight": w13, "w2_weight": w2}
    fp8 = torch.float8_e4m3fn
    return {
        "w13_weight": (w13 * 20).to(fp8), "w2_weight": (w2 * 20).to(fp8),
        "w13_weight_scale_inv": torch.rand(e, 2 * i // BLOCK, h // BLOCK, device="cuda",
                                           generator=g) * 1e-3 + 1e-3,
        "w2_weight_scale_inv": torch.rand(e, h // BLOCK, i // BLOCK, device="cuda",
                                          generator=g) * 1e-3 + 1e-3,
    }


def layer_pages(memory, weights: dict, first: int, last: int, name: str):
    from vllm_dwdp.expert_pages import build_layer

    local = {k: v[first:last].contiguous() for k, v in weights.items()}
    return build_layer(name, local, next(iter(weights.values())).shape[0], first, last, memory)


def peer(args) -> int:
    """Rank 1: export experts [E/2, E) of every (shape, dtype) case; stay until rank 0 leaves."""
    import threading

    import torch

    from vllm_dwdp.rendezvous import PeerGroup
    from vllm_moe_core.composite_memory import CudaMemory

    memory = CudaMemory(torch.device("cuda", 0))
    group = PeerGroup(args.group, 1, 2, 600, args.dir)
    layers, fds = [], []
    for n, (model, dtype) in enumerate(args.cases):
        w = build_weights(SHAPES[model], dtype, seed=n)
        e = SHAPES[model]["experts"]
        pages = layer_pages(memory, w, e // 2, e, f"{model}.{dtype}")
        del w
        layers.append({"tensors": pages.manifest(memory.page)})
        fds.append(pages.fds())
    torch.cuda.synchronize()
    group.publish({"layers": layers}, [fd for layer_fds in fds for fd in layer_fds])
    group.gather()
    gone = threading.Event()
    group.on_failure = lambda why: gone.set()
    group.start_watching()
    gone.wait()
    return 0


def graphed(fn, reps: int):
    """``fn`` called ``reps`` times, captured in one CUDA graph: replays time the kernels
    alone, without the host's launch work (which dominates at a few tokens)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return graph.replay


def time_pair(fns, reps: int, rounds: int) -> list[float]:
    """Median ms of one call of each function, timed with CUDA events over graph replays of
    ``reps`` calls; the functions alternate within every round."""
    import torch

    replays = [graphed(fn, reps) for fn in fns]
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for k, replay in enumerate(replays):
            replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replay()
            end.record()
            end.synchronize()
            samples[k].append(start.elapsed_time(end) / reps)
    return [statistics.median(s) for s in samples]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--dtypes", default="bf16,fp8")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--group", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--case", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cases = [(m, d) for m in args.models.split(",") for d in args.dtypes.split(",")]
    if args.peer:
        args.cases = [tuple(c.split(":")) for c in args.case]
        return peer(args)

    import torch
    import vllm
    from vllm.model_executor.layers.fused_moe import fused_experts
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config

    from vllm_dwdp.expert_pages import ReceiveSlot, compose_layer, fill_static, map_export, pull_copies
    from vllm_dwdp.rendezvous import PeerGroup
    from vllm_moe_core.composite_memory import CudaMemory

    rdir = tempfile.mkdtemp(prefix="moe-parity-")
    group_name = f"parity{os.getpid()}"
    cmd = [sys.executable, __file__, "--peer", "--group", group_name, "--dir", rdir,
           *[a for m, d in cases for a in ("--case", f"{m}:{d}")]]
    proc = subprocess.Popen(cmd, cwd=REPO)
    memory = CudaMemory(torch.device("cuda", 0))
    group = PeerGroup(group_name, 0, 2, 600, rdir)
    group.publish({"layers": []}, [])
    (manifest, fds), = group.gather().values()
    group.wait_served(600)
    rows = []
    try:
        for n, (model, dtype) in enumerate(cases):
            shape = SHAPES[model]
            e = shape["experts"]
            spans = [(0, e // 2), (e // 2, e)]
            full = build_weights(shape, dtype, seed=n)
            pages = layer_pages(memory, full, 0, e // 2, f"{model}.{dtype}")
            compose_layer(pages, ReceiveSlot(memory, n), memory, torch.device("cuda", 0))
            theirs = manifest["layers"][n]["tensors"]
            at = sum(len(x["tensors"]) for x in manifest["layers"][:n])
            peers = {1: map_export(memory, fds[at:at + len(theirs)], theirs)}
            fill_static(pages, spans, peers)
            copies = pull_copies(pages, spans, peers)
            for dst, src in copies:  # the receive slot: experts [E/2, E) from rank 1
                dst.copy_(src)
            torch.cuda.synchronize()
            comp = pages.views
            assert all(torch.equal(comp[k].view(torch.uint8), full[k].view(torch.uint8))
                       for k in full), "composite tensors differ from the plain ones"
            slot_mib = sum(d.numel() for d, _ in copies) / 2**20

            def quant(w):
                if dtype == "bf16":
                    return None
                return fp8_w8a8_moe_quant_config(w["w13_weight_scale_inv"],
                                                 w["w2_weight_scale_inv"],
                                                 block_shape=[BLOCK, BLOCK])

            q_plain, q_comp = quant(full), quant(comp)
            for tokens in map(int, args.tokens.split(",")):
                g = torch.Generator(device="cuda").manual_seed(tokens)
                x = torch.randn(tokens, shape["hidden"], device="cuda", dtype=torch.bfloat16,
                                generator=g)
                logits = torch.randn(tokens, e, device="cuda", generator=g)
                tw, ti = torch.topk(torch.softmax(logits, -1), shape["top_k"], dim=-1)
                ti = ti.to(torch.int32)

                def stock():
                    return fused_experts(x, full["w13_weight"], full["w2_weight"], tw, ti,
                                         quant_config=q_plain)

                def dwdp():
                    return fused_experts(x, comp["w13_weight"], comp["w2_weight"], tw, ti,
                                         quant_config=q_comp)

                equal = torch.equal(stock(), dwdp())
                reps = max(4, min(64, 40000 // max(tokens, 1)))
                stock_ms, dwdp_ms = time_pair([stock, dwdp], reps, args.rounds)
                row = {"model": model, "dtype": dtype, "tokens": tokens,
                       "dwdp_ms": round(dwdp_ms, 4), "stock_ms": round(stock_ms, 4),
                       "ratio": round(stock_ms / dwdp_ms, 4), "outputs_bit_equal": equal,
                       "slot_mib_from_peer": round(slot_mib, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            full = comp = q_plain = q_comp = None
            torch.cuda.empty_cache()
    finally:
        group.close()
        proc.wait(timeout=30)
    result = {
        "benchmark": "moe_kernel_parity",
        "what": "vLLM fused_experts over composite expert memory (experts [0, E/2) in this "
                "process's pages, [E/2, E) in a receive slot pulled from a second process) vs "
                "over plain tensors with the same bytes; ratio = stock_ms / dwdp_ms",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "vllm_version": vllm.__version__, "torch_version": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "date": datetime.date.today().isoformat(),
        "page_bytes": memory.page,
        "min_ratio": min(r["ratio"] for r in rows),
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

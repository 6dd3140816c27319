#!/usr/bin/env python3
"""Decode-sized MoE steps whose uncached experts are read over PCIe, one layer, one GPU.

    python3 benchmarks/uva_expert_reads.py --out uva_expert_reads.json [--sweep]

What FlexTensor's ``routed_reads: in_place`` does per MoE layer at small batches, and what
vLLM's ``--cpu-offload-gb`` does per offloaded layer, on Qwen3-30B-A3B's routed experts
(bf16, 128 experts of 9 MiB, top-8), uniform random routing, T = 1, 4, 8 tokens:

- ``ours_in_place``: ``split_moe`` with ``cache`` experts in a GPU tensor and every expert's
  home in pinned host memory, read through the GPU's view of it (FlexTensor's layout: the
  homes are made by ``vllm_flextensor.vllm_compat.host_home``, as the engine makes them);
  with ``--sweep``, also every tile config of :func:`sweep_configs`;
- ``vllm_uva``: vLLM's ``fused_experts`` with both weight tensors in pinned host memory
  (what ``--cpu-offload-gb`` leaves it: a UVA view of the whole layer);
- ``gather_uva``: ``index_select`` of the step's uncached routed experts from the host view
  into a GPU buffer (a GPU kernel reading host memory, row-contiguous);
- ``copy_engine``: the same experts copied host -> GPU with ``cudaMemcpyAsync`` (one copy
  per expert, the copy engine; what ``routed_reads: copy`` issues after its routing sync).

Times are CUDA-event medians (``Timer`` of ``moe_kernel_rate.py``); ``gbs`` is the bytes of
the uncached routed experts (those that cross PCIe) per second.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_kernel_rate import (MODELS, Timer, _err, import_kernels, load_shape,  # noqa: E402
                             make_inputs, measure, vllm_fused_moe)


def sweep_configs(sm):
    """Tile configs for host reads: wider K tiles read more of each weight row per visit
    (a bf16 row of W13 is 4 KiB, W2's 1.5 KiB)."""
    return [sm.KernelConfig(16, bn, bk, num_warps=4, num_stages=stages)
            for bk in (64, 128, 256) for bn in (16, 32, 64) for stages in (2, 3, 4)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", default="1,4,8")
    p.add_argument("--cache", type=int, default=21, help="experts cached on the GPU (of 128)")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=20)
    p.add_argument("--target-ms", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    from vllm_flextensor import vllm_compat

    sm = import_kernels()
    device = torch.device("cuda")
    shape = load_shape("qwen3_30b_a3b", MODELS["qwen3_30b_a3b"])
    E, H, I, K = shape["experts"], shape["hidden"], shape["inter"], shape["top_k"]
    C = args.cache
    result = dict(benchmark="uva_expert_reads", command="python3 benchmarks/uva_expert_reads.py "
                  + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                  gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  host=platform.node(), shape=shape, cache=C, rows=[], errors=[])
    timer = Timer(device, flush_mb=0, ahead_ms=1.0)

    # Every expert's home in pinned host memory (as the engine makes it), its GPU view.
    g = torch.Generator().manual_seed(args.seed)
    homes = {}
    for name, shp in (("w13", (E, 2 * I, H)), ("w2", (E, H, I))):
        h = vllm_compat.host_home(shp, torch.bfloat16, device)
        h.copy_(torch.randn(shp, generator=g).mul_(shp[2] ** -0.5))
        homes[name] = h
    views = {n: vllm_compat.device_view_of_host(h, device) for n, h in homes.items()}
    cache = {n: h[:C].to(device) for n, h in homes.items()}
    # Expert e sits in slot e: slots < C index the cache, the others the second tensor at
    # slot - C, which is the host view from expert C on.
    slot_of = torch.arange(E, dtype=torch.int32, device=device)
    recv13, recv2 = views["w13"][C:], views["w2"][C:]
    expert_bytes = 3 * H * I * 2
    vmake, vversion, vnote = vllm_fused_moe()
    result["vllm"] = vnote
    vrun = vmake(views["w13"], views["w2"], None, K)[0] if vmake else None
    configs = [None] + (sweep_configs(sm) if args.sweep else [])

    for T in [int(t) for t in args.tokens.split(",")]:
        x, w, ids = make_inputs(shape, T, device, args.seed + T)
        uncached = sorted({int(e) for e in ids.flatten().tolist() if int(e) >= C})
        moved = len(uncached) * expert_bytes
        ref = sm.split_moe_reference(x, w, ids, cache["w13"], cache["w2"], recv13, recv2,
                                     slot_of)

        def row(impl, fn, check=None, **extra):
            r = dict(tokens=T, impl=impl, uncached_experts=len(uncached), bytes=moved, **extra)
            try:
                if check is not None:
                    out = check()
                    r["max_abs_diff_vs_reference"] = float((out.float() - ref.float()).abs().max())
                r.update(measure(timer, fn, args))
                r["gbs"] = moved / (r["ms"] * 1e-3) / 1e9
            except Exception as e:  # noqa: BLE001
                r["error"] = _err(e)
            result["rows"].append(r)
            print(json.dumps(r), flush=True)

        for cfg in configs:
            def ours(cfg=cfg):
                return sm.split_moe(x, w, ids, cache["w13"], cache["w2"], recv13, recv2, slot_of,
                                    config=cfg)
            chosen = cfg or sm.pick_config(T, K, E, H, I, False)
            row("ours_in_place", ours, ours, config=chosen.as_dict(), default=cfg is None)
        if vrun is not None:
            row("vllm_uva", lambda: vrun(x, w, ids), lambda: vrun(x, w, ids),
                note="all experts on the host (--cpu-offload-gb's layout); moves the routed "
                     "experts, cached ones too")
        idx = torch.tensor(uncached, device=device)
        buf13 = torch.empty(len(uncached), 2 * I, H, dtype=torch.bfloat16, device=device)
        buf2 = torch.empty(len(uncached), H, I, dtype=torch.bfloat16, device=device)

        def gather():
            torch.index_select(views["w13"], 0, idx, out=buf13)
            torch.index_select(views["w2"], 0, idx, out=buf2)
        row("gather_uva", gather)

        def copies():
            for j, e in enumerate(uncached):
                buf13[j].copy_(homes["w13"][e], non_blocking=True)
                buf2[j].copy_(homes["w2"][e], non_blocking=True)
        row("copy_engine", copies)

    best = {}
    for r in result["rows"]:
        if r["impl"] == "ours_in_place" and "ms" in r:
            b = best.get(r["tokens"])
            if b is None or r["ms"] < b["ms"]:
                best[r["tokens"]] = r
    result["best_ours"] = {str(t): dict(ms=r["ms"], gbs=r["gbs"], config=r["config"])
                           for t, r in best.items()}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["best_ours"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""MoE kernel rate on one GPU: our split-weight Triton kernel vs vLLM's fused MoE kernel.

    python3 benchmarks/moe_kernel_rate.py --out moe_kernel_rate.json [--sweep] [--no-vllm]

For the routed-expert shapes of Qwen3-30B-A3B and Qwen3-235B-A22B (examples/configs/), in
bf16 and block FP8 (128x128 weight blocks, made with ``quantize_blocks_reference``), and for
T tokens per step with uniform random routing (top-k of the softmax of random logits), it
times one MoE layer's expert computation:

- ``ours_local``: ``split_moe`` with every expert in the local tensor;
- ``ours_split``: ``split_moe`` with half the experts local and half in a second tensor
  (the DWDP case of 2 ranks: a rank's own experts and its receive buffer);
- ``vllm``: vLLM's fused MoE kernel (``fused_experts``) on the same weights (see
  :func:`vllm_fused_moe`, the only code here that touches vLLM).

Times are CUDA-event medians of one call each, with L2 flushed before every call and the
host queue filled ahead (a GPU sleep before the start event), so ``ms`` is device time:
what the compute stream spends, not Python launch overhead. ``loop_ms`` is the mean of
back-to-back calls (L2 warm, host overhead included where the host is the bottleneck) and
``host_ms`` the host time to enqueue one call. Reported per row: TFLOP/s counting the
expert GEMMs (``2*T*K*3*H*I``), GB/s of the weight bytes of the experts the routing touched
(FP8: with their scales) and ours/vLLM (the ratio of rates). Before timing, outputs are
checked against ``split_moe_reference`` at a few small step sizes (``checks`` in the JSON),
so the timings compare equal work.

``--sweep`` also times :func:`candidate_configs` of our kernel (all-local) per shape, dtype
and T, to choose ``pick_config``'s defaults from measurements. ``vllm-dwdp plan
--kernel-rates OUT.json`` reads the JSON this writes. ``--smoke`` runs tiny shapes (on the
CPU without CUDA: plumbing only, times meaningless).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"qwen3_30b_a3b": ROOT / "examples/configs/qwen3_30b_a3b.json",
          "qwen3_235b_a22b": ROOT / "examples/configs/qwen3_235b_a22b.json"}
DEFAULT_TOKENS = (1, 8, 64, 512, 2048, 8192, 16384)
FP8_BLOCK = (128, 128)
IMPLS = ("ours_local", "ours_split", "vllm")
BENCHMARK = "moe_kernel_rate"  # the JSON's "benchmark" key, which vllm-dwdp plan checks


def _err(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}"[:2000] + where


def import_kernels():
    """Our kernels from this checkout's kernels/ (as ``vllm_dwdp_kernels``), so the timed code
    is the working tree's even where an older copy is installed."""
    if "vllm_dwdp_kernels" not in sys.modules:
        kdir = ROOT / "kernels"
        spec = importlib.util.spec_from_file_location(
            "vllm_dwdp_kernels", kdir / "__init__.py", submodule_search_locations=[str(kdir)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["vllm_dwdp_kernels"] = mod
        spec.loader.exec_module(mod)
    import vllm_dwdp_kernels.split_moe as sm

    return sm


def vllm_fused_moe():
    """vLLM's fused MoE kernel: ``(make, version, note)``; ``make`` is None without vLLM.

    ``make(w13, w2, scales, top_k)`` returns ``(run, tiles)``: ``run(x, topk_weights,
    topk_ids)`` computes the layer's routed experts on the same [E, 2I, H] / [E, H, I]
    weights (block FP8: float8_e4m3fn weights with their [E, N/128, K/128] float32
    ``weight_scale_inv``, as vLLM's ``Fp8MoEMethod`` holds them), ``tiles(M)`` the kernel
    config vLLM picks for M tokens (its tuned JSON for this GPU, else its defaults).

    Every touch of vLLM internals is here. vLLM 0.26: ``fused_experts`` from
    ``vllm.model_executor.layers.fused_moe`` (what vLLM's unquantised and block-FP8 Triton
    MoE paths end in; models such as arctic/minicpm call it directly), with a
    ``FusedMoEQuantConfig`` from ``config.fp8_w8a8_moe_quant_config(w1_scale, w2_scale,
    block_shape=[128, 128])`` for block FP8 (activations quantised per token per 128
    channels, dynamically, as ours); ``fused_moe.try_get_optimal_moe_config`` (and
    ``config._get_config_dtype_str``) only to record the tiles.
    """
    try:
        import vllm
        from vllm.model_executor.layers.fused_moe import fused_experts
        from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config
    except Exception as e:  # noqa: BLE001 - no vLLM, or one without this API
        return None, None, f"vLLM fused MoE not available: {_err(e)}"
    version = getattr(vllm, "__version__", "?")

    def make(w13, w2, scales, top_k):
        quant = None
        if scales is not None:
            quant = fp8_w8a8_moe_quant_config(w1_scale=scales[0], w2_scale=scales[1],
                                              block_shape=list(FP8_BLOCK))

        def run(x, topk_weights, topk_ids):
            return fused_experts(x, w13, w2, topk_weights, topk_ids, quant_config=quant)

        def tiles(m):
            try:
                from vllm.model_executor.layers.fused_moe.config import _get_config_dtype_str
                from vllm.model_executor.layers.fused_moe.fused_moe import (
                    try_get_optimal_moe_config)

                dtype = _get_config_dtype_str(x_dtype(w13), use_fp8_w8a8=scales is not None)
                return dict(try_get_optimal_moe_config(
                    tuple(w13.shape), tuple(w2.shape), top_k, dtype, m,
                    block_shape=list(FP8_BLOCK) if scales is not None else None))
            except Exception as e:  # noqa: BLE001 - informational only
                return {"error": _err(e)}

        return run, tiles

    note = f"vLLM {version}: fused_experts (Triton fused MoE)"
    if not version.startswith("0.26"):
        note += " -- NOTE: not vLLM 0.26, the version DP+EP is compared at"
    return make, version, note


def x_dtype(w):
    """Activation dtype that goes with these weights (bf16 for FP8 weights)."""
    import torch

    return torch.bfloat16 if w.dtype == torch.float8_e4m3fn else w.dtype


def load_shape(name: str, path: Path) -> dict:
    cfg = json.loads(path.read_text())
    return dict(model=name, hidden=cfg["hidden_size"], inter=cfg["moe_intermediate_size"],
                experts=cfg["num_experts"], top_k=cfg["num_experts_per_tok"])


class Timer:
    """CUDA-event timing of one call at a time (L2 flushed, host queue filled ahead), or
    wall-clock timing off CUDA (--smoke on a CPU)."""

    def __init__(self, device, flush_mb: int, ahead_ms: float):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(flush_mb * 2 ** 20 // 4, dtype=torch.int32, device=device) \
            if self.cuda and flush_mb > 0 else None
        self.cycles_per_ms = None
        self.ahead_ms = ahead_ms
        if self.cuda and hasattr(torch.cuda, "_sleep") and ahead_ms > 0:
            try:  # calibrate the GPU sleep
                torch.cuda._sleep(1000)
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                torch.cuda._sleep(1_000_000)
                e.record()
                torch.cuda.synchronize()
                self.cycles_per_ms = 1_000_000 / max(s.elapsed_time(e), 1e-3)
            except Exception:  # noqa: BLE001 - then no sleep: host time may leak into ms
                self.cycles_per_ms = None

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def host_ms(self, fn, reps: int = 3) -> float:
        """Host time to enqueue one call (median)."""
        out = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        self.sync()
        return statistics.median(out)

    def device_ms(self, fn, reps: int, host_ms: float) -> list[float]:
        torch = self.torch
        if not self.cuda:
            out = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
            return out
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
        ahead = max(self.ahead_ms, 2 * host_ms)
        for s, e in ev:
            if self.flush is not None:
                self.flush.zero_()
            if self.cycles_per_ms:
                torch.cuda._sleep(int(ahead * self.cycles_per_ms))
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in ev]

    def loop_ms(self, fn, reps: int) -> float:
        torch = self.torch
        if not self.cuda:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t0) * 1e3 / reps
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / reps


def make_row(shape: dict, dtype: str, tokens: int, impl: str, experts_touched: int,
             expert_bytes: int) -> dict:
    """One result row (``vllm-dwdp plan --kernel-rates`` reads hidden, inter, experts, top_k,
    dtype, tokens, impl, tflops and error)."""
    return dict(model=shape["model"], hidden=shape["hidden"], inter=shape["inter"],
                experts=shape["experts"], top_k=shape["top_k"], dtype=dtype, tokens=tokens,
                impl=impl, flops=2 * tokens * shape["top_k"] * 3 * shape["hidden"] * shape["inter"],
                experts_touched=experts_touched,
                weight_bytes_touched=experts_touched * expert_bytes,
                ms=None, tflops=None, weight_gbs=None, error=None)


def set_timing(row: dict, timing: dict) -> dict:
    row.update(timing)
    row["tflops"] = row["flops"] / (row["ms"] * 1e-3) / 1e12
    row["weight_gbs"] = row["weight_bytes_touched"] / (row["ms"] * 1e-3) / 1e9
    return row


def measure(timer: Timer, fn, args) -> dict:
    """Warm up, then time ``fn``: median device ms (and min), loop ms, host ms, repeats."""
    for _ in range(args.warmup):
        fn()
    timer.sync()
    host = timer.host_ms(fn)
    est = timer.loop_ms(fn, 3)
    reps = int(min(args.max_reps, max(args.min_reps, args.target_ms / max(est, 1e-3))))
    times = timer.device_ms(fn, reps, host)
    loop = timer.loop_ms(fn, reps)
    return dict(ms=statistics.median(times), ms_min=min(times), loop_ms=loop, host_ms=host,
                reps=reps)


def rel_err(out, ref) -> dict:
    o, r = out.float(), ref.float()
    return dict(max_abs_diff=float((o - r).abs().max()), ref_max_abs=float(r.abs().max()),
                rel_err=float((o - r).norm() / r.norm().clamp_min(1e-30)),
                finite=bool(o.isfinite().all()))


def build_weights(sm, shape: dict, dtype: str, device, seed: int) -> dict:
    """All-local and split (half local, half a separate receive tensor) operands."""
    import torch

    E, H, I = shape["experts"], shape["hidden"], shape["inter"]
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g, device=device, dtype=torch.bfloat16)
    w13.mul_(H ** -0.5)
    w2 = torch.randn(E, H, I, generator=g, device=device, dtype=torch.bfloat16)
    w2.mul_(I ** -0.5)
    scales = None
    if dtype == "fp8":
        def quantize(w):  # a few experts at a time: the reference works in float32
            q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=device)
            s = torch.empty(w.shape[0], -(-w.shape[1] // FP8_BLOCK[0]),
                            -(-w.shape[2] // FP8_BLOCK[1]), dtype=torch.float32, device=device)
            for i in range(0, w.shape[0], 8):
                q[i:i + 8], s[i:i + 8] = sm.quantize_blocks_reference(w[i:i + 8], *FP8_BLOCK)
            return q, s

        w13, s13 = quantize(w13)
        w2, s2 = quantize(w2)
        scales = (s13, s2)
    half = E // 2
    empty13, empty2 = w13[:0], w2[:0]
    slots = torch.arange(E, dtype=torch.int32, device=device)
    local = dict(w13_local=w13, w2_local=w2, w13_recv=empty13, w2_recv=empty2,
                 slot_of_expert=slots)
    split = dict(w13_local=w13[:half], w2_local=w2[:half], w13_recv=w13[half:].clone(),
                 w2_recv=w2[half:].clone(), slot_of_expert=slots)
    if scales is not None:
        s13, s2 = scales
        # Activation scales in the format vLLM is set to use here (VLLM_USE_DEEP_GEMM_E8M0).
        ue8m0 = os.environ.get("VLLM_USE_DEEP_GEMM_E8M0") == "1"
        local["scales"] = sm.BlockScales(s13, s2, s13[:0], s2[:0], *FP8_BLOCK, ue8m0=ue8m0)
        split["scales"] = sm.BlockScales(s13[:half], s2[:half], s13[half:].clone(),
                                         s2[half:].clone(), *FP8_BLOCK, ue8m0=ue8m0)
    per_expert = 3 * H * I * (2 if dtype == "bf16" else 1)
    if scales is not None:
        per_expert += 4 * (scales[0][0].numel() + scales[1][0].numel())
    return dict(w13=w13, w2=w2, scales=scales, local=local, split=split,
                expert_bytes=per_expert)


def make_inputs(shape: dict, tokens: int, device, seed: int):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, shape["hidden"], generator=g, device=device, dtype=torch.bfloat16)
    logits = torch.randn(tokens, shape["experts"], generator=g, device=device)
    w, ids = torch.softmax(logits, dim=-1).topk(shape["top_k"], dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)  # norm_topk_prob, as Qwen3-MoE
    return x, w.float().contiguous(), ids.to(torch.int32).contiguous()


def run_block(sm, shape, dtype, args, timer, device, vmake, result, save):
    """Every T for one shape and dtype: checks, timings, sweep; rows appended to result."""
    import torch

    name = shape["model"]
    fp8 = dtype == "fp8"
    try:
        W = build_weights(sm, shape, dtype, device, seed=args.seed)
    except Exception as e:  # noqa: BLE001
        result["errors"].append(dict(model=name, dtype=dtype, stage="weights", error=_err(e)))
        print(f"[{name} {dtype}] weights failed: {_err(e)}", flush=True)
        return
    K = shape["top_k"]
    fns = {}

    def ours(which, config=None):
        ops = W[which]
        return lambda x, tw, ti: sm.split_moe(x, tw, ti, **ops, config=config)

    fns["ours_local"] = ours("local")
    fns["ours_split"] = ours("split")
    vtiles = None
    if vmake is not None:
        try:
            fns["vllm"], vtiles = vmake(W["w13"], W["w2"], W["scales"], K)
        except Exception as e:  # noqa: BLE001
            result["errors"].append(dict(model=name, dtype=dtype, stage="vllm setup",
                                         error=_err(e)))
            print(f"[{name} {dtype}] vLLM setup failed: {_err(e)}", flush=True)

    # Equal work: each implementation against the reference, at a few step sizes.
    for t in args.check_tokens:
        x, tw, ti = make_inputs(shape, t, device, seed=args.seed + t)
        try:
            ref = sm.split_moe_reference(x, tw, ti, **W["local"])
        except Exception as e:  # noqa: BLE001
            result["checks"].append(dict(model=name, dtype=dtype, tokens=t, impl="reference",
                                         error=_err(e)))
            continue
        outs = {}
        for impl, fn in fns.items():
            row = dict(model=name, dtype=dtype, tokens=t, impl=impl)
            try:
                outs[impl] = fn(x, tw, ti)
                row.update(rel_err(outs[impl], ref))
                row["agree"] = row["finite"] and row["rel_err"] < args.tolerance
            except Exception as e:  # noqa: BLE001
                row.update(error=_err(e), agree=False)
            result["checks"].append(row)
            print(f"[check {name} {dtype} T={t}] {impl}: " + (
                row.get("error") or f"rel err {row['rel_err']:.2e}, max abs diff "
                f"{row['max_abs_diff']:.3e} (ref max {row['ref_max_abs']:.2f}) "
                f"{'OK' if row['agree'] else 'DISAGREES'}"), flush=True)
        if "ours_local" in outs and "ours_split" in outs:
            result["checks"].append(dict(model=name, dtype=dtype, tokens=t,
                                         impl="ours_split vs ours_local",
                                         **rel_err(outs["ours_split"], outs["ours_local"])))
        del ref, outs
    if device.type == "cuda":
        torch.cuda.empty_cache()

    print(HEADER, flush=True)
    for t in args.tokens:
        x, tw, ti = make_inputs(shape, t, device, seed=args.seed + 7 * t)
        touched = int(torch.unique(ti).numel())
        rows = {}
        for impl in IMPLS:
            row = make_row(shape, dtype, t, impl, touched, W["expert_bytes"])
            if impl not in fns:  # vLLM unavailable (said once at the start) or its setup failed
                row.update(skipped=True, error=result["vllm"]["note"] if vmake is None
                           else "vLLM setup failed (see errors)")
            else:
                try:
                    fn = fns[impl]
                    set_timing(row, measure(timer, lambda: fn(x, tw, ti), args))
                    if impl == "vllm":
                        row["config"] = vtiles(t) if vtiles else None
                    else:
                        row["config"] = sm.pick_config(t, K, shape["experts"], shape["hidden"],
                                                       shape["inter"], fp8).as_dict()
                except Exception as e:  # noqa: BLE001
                    row["error"] = _err(e)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            rows[impl] = row
        v = rows["vllm"]
        for impl in ("ours_local", "ours_split"):
            r = rows[impl]
            r["ratio_vs_vllm"] = (v["ms"] / r["ms"]) if r["ms"] and v["ms"] else None
        result["rows"].extend(rows.values())
        print_row(rows)
        del x, tw, ti
    if args.sweep:
        sweep_block(sm, shape, dtype, args, timer, device, W, result)
    del W, fns
    if device.type == "cuda":
        torch.cuda.empty_cache()
    save()


def sweep_block(sm, shape, dtype, args, timer, device, W, result):
    """Every candidate config of our kernel (all experts local) at every T."""
    name, fp8, K = shape["model"], dtype == "fp8", shape["top_k"]
    cands = sm.candidate_configs(fp8)
    quick = argparse.Namespace(**{**vars(args), "warmup": 2, "min_reps": min(args.min_reps, 3),
                                  "max_reps": min(args.max_reps, 10)})
    for t in args.tokens:
        x, tw, ti = make_inputs(shape, t, device, seed=args.seed + 7 * t)
        flops = 2 * t * K * 3 * shape["hidden"] * shape["inter"]
        picked = sm.pick_config(t, K, shape["experts"], shape["hidden"], shape["inter"], fp8)
        try:
            base = sm.split_moe(x, tw, ti, **W["local"], config=picked)
        except Exception as e:  # noqa: BLE001
            base = None
            result["errors"].append(dict(model=name, dtype=dtype, tokens=t, stage="sweep",
                                         error=_err(e)))
        best = None
        for c in cands:
            row = dict(model=name, dtype=dtype, tokens=t, config=c.as_dict(),
                       picked=c == picked, ms=None, tflops=None, error=None)
            try:
                fn = lambda c=c: sm.split_moe(x, tw, ti, **W["local"], config=c)  # noqa: E731
                out = fn()
                if base is not None:  # a fast but wrong config must not win
                    row["rel_err_vs_picked"] = rel_err(out, base)["rel_err"]
                row.update(measure(timer, fn, quick))
                row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                ok = row.get("rel_err_vs_picked", 0.0) < args.tolerance
                if ok and (best is None or row["ms"] < best["ms"]):
                    best = row
            except Exception as e:  # noqa: BLE001
                row["error"] = _err(e)
            result["sweep"].append(row)
        p = next((r for r in result["sweep"][-len(cands):] if r["picked"]), None)
        v = next((r for r in result["rows"] if r["impl"] == "vllm" and r["model"] == name
                  and r["dtype"] == dtype and r["tokens"] == t and r["ms"]), None)
        if best is not None:
            c = best["config"]
            result.setdefault("sweep_best", []).append(dict(
                model=name, dtype=dtype, tokens=t, config=c, ms=best["ms"],
                tflops=best["tflops"], picked_ms=p["ms"] if p else None,
                vllm_ms=v["ms"] if v else None))
            picked_ms = "%.3f ms" % p["ms"] if p and p["ms"] else "n/a"
            vllm_ms = "%.3f ms" % v["ms"] if v else "n/a"
            print(f"[sweep {name} {dtype} T={t}] best bm{c['block_m']} bn{c['block_n']} "
                  f"bk{c['block_k']} w{c['num_warps']} s{c['num_stages']}: {best['ms']:.3f} ms "
                  f"({best['tflops']:.0f} TF/s); pick_config {picked_ms}; vLLM {vllm_ms}",
                  flush=True)


HEADER = (f"{'model':<16} {'dtype':<5} {'T':>6} | {'ours ms':>8} {'TF/s':>6} {'GB/s':>6} | "
          f"{'split ms':>8} {'TF/s':>6} | {'vLLM ms':>8} {'TF/s':>6} {'GB/s':>6} | "
          f"{'ours/vLLM':>9} {'split/vLLM':>10}")


def print_row(rows: dict) -> None:
    def f(r, key, width, prec):
        v = r.get(key)
        if isinstance(v, (int, float)):
            return f"{v:>{width}.{prec}f}"
        return f"{'err' if r.get('error') and not r.get('skipped') else '-':>{width}}"

    a, b, v = rows["ours_local"], rows["ours_split"], rows["vllm"]
    print(f"{a['model']:<16} {a['dtype']:<5} {a['tokens']:>6} | {f(a, 'ms', 8, 3)} "
          f"{f(a, 'tflops', 6, 0)} {f(a, 'weight_gbs', 6, 0)} | {f(b, 'ms', 8, 3)} "
          f"{f(b, 'tflops', 6, 0)} | {f(v, 'ms', 8, 3)} {f(v, 'tflops', 6, 0)} "
          f"{f(v, 'weight_gbs', 6, 0)} | {f(a, 'ratio_vs_vllm', 9, 2)} "
          f"{f(b, 'ratio_vs_vllm', 10, 2)}", flush=True)
    for r in (a, b, v):
        if r.get("error") and not r.get("skipped"):
            print(f"    {r['impl']}: {r['error']}", flush=True)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"unavailable ({type(e).__name__})"
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    p.add_argument("--out", required=True, help="JSON result path")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: "
                   + ", ".join(MODELS))
    p.add_argument("--dtypes", default="bf16,fp8", help="comma-separated, of: bf16, fp8")
    p.add_argument("--tokens", type=ints, default=list(DEFAULT_TOKENS),
                   help="tokens per step, comma-separated")
    p.add_argument("--check-tokens", type=ints, default=[64, 2048],
                   help="step sizes checked against split_moe_reference before timing")
    p.add_argument("--tolerance", type=float, default=3e-2,
                   help="relative (norm) error under which outputs agree")
    p.add_argument("--sweep", action="store_true",
                   help="also time candidate_configs() of our kernel at every step size")
    p.add_argument("--no-vllm", action="store_true", help="time our kernel only")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=30)
    p.add_argument("--target-ms", type=float, default=150.0,
                   help="aim for this much timed work per case (repeats between the bounds)")
    p.add_argument("--flush-mb", type=int, default=256, help="L2 flush buffer (0: none)")
    p.add_argument("--ahead-ms", type=float, default=1.0,
                   help="GPU sleep before each timed call, so the host enqueues it ahead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, few repeats; runs on the CPU without CUDA (plumbing only)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; known: {', '.join(MODELS)}")
    for d in args.dtypes:
        if d not in ("bf16", "fp8"):
            p.error(f"unknown dtype {d!r}; known: bf16, fp8")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    import torch

    sm = import_kernels()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("moe_kernel_rate.py needs a CUDA GPU (or --smoke for a CPU plumbing run)")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if args.smoke:
        shapes = [dict(model="smoke", hidden=256, inter=128, experts=8, top_k=2)]
        args.tokens = [t for t in args.tokens if t <= 64] or [1, 16]
        args.check_tokens = [16]
        args.min_reps, args.max_reps, args.warmup = 2, 3, 1
    else:
        shapes = [load_shape(m, MODELS[m]) for m in args.models]

    # vLLM's block-FP8 activation scales: plain float scales by default; with
    # VLLM_USE_DEEP_GEMM_E8M0=1 (stock vLLM's default on Hopper) vLLM and ours both use
    # power-of-two (UE8M0) ones.
    os.environ.setdefault("VLLM_USE_DEEP_GEMM_E8M0", "0")
    vmake, vversion, vnote = (None, None, "not run (--no-vllm)") if args.no_vllm \
        else vllm_fused_moe()
    result = dict(
        benchmark=BENCHMARK,
        command=" ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        gpu=torch.cuda.get_device_name(device) if cuda else f"none (CPU: {platform.processor()})",
        versions={**versions(), "vllm": vversion},
        vllm=dict(available=vmake is not None, version=vversion, note=vnote,
                  VLLM_USE_DEEP_GEMM_E8M0=os.environ.get("VLLM_USE_DEEP_GEMM_E8M0")),
        kernels_from=str(Path(sm.__file__).resolve()),
        settings=dict(tokens=args.tokens, check_tokens=args.check_tokens, dtypes=args.dtypes,
                      fp8_block=list(FP8_BLOCK), routing="top-k of softmax(randn logits), "
                      "renormalised", warmup=args.warmup, reps=[args.min_reps, args.max_reps],
                      target_ms=args.target_ms, flush_mb=args.flush_mb, ahead_ms=args.ahead_ms,
                      tolerance=args.tolerance, smoke=args.smoke, sweep=args.sweep),
        definitions=dict(
            ms="median CUDA-event time of one call, L2 flushed, host queue filled ahead",
            loop_ms="mean of back-to-back calls (L2 warm, host overhead included)",
            host_ms="host time to enqueue one call",
            tflops="2*T*K*3*H*I / ms", weight_gbs="weight bytes of the experts touched / ms",
            ratio_vs_vllm="vLLM ms / our ms (>1: ours faster)",
            ours_split="half the experts local, half in a separate receive tensor (2 ranks)"),
        shapes=shapes, checks=[], rows=[], sweep=[], errors=[])
    if vmake is None:
        print(f"NOTE: {vnote}; timing our kernel only", flush=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        result["elapsed_s"] = round(time.time() - t_start, 1)
        tmp = out_path.with_suffix(out_path.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        os.replace(tmp, out_path)

    print(f"GPU: {result['gpu']}; torch {result['versions']['torch']}, triton "
          f"{result['versions']['triton']}, vLLM {vversion}; kernels: {result['kernels_from']}",
          flush=True)
    timer = Timer(device, args.flush_mb, args.ahead_ms)
    result["settings"]["sleep_cycles_per_ms"] = timer.cycles_per_ms
    for shape in shapes:
        for dtype in args.dtypes:
            run_block(sm, shape, dtype, args, timer, device, vmake, result, save)
    bad = [c for c in result["checks"] if c.get("agree") is False]
    result["all_checks_agree"] = not bad
    save()
    print(f"wrote {out_path} in {result['elapsed_s']:.0f} s"
          + (f"; {len(bad)} output check(s) DISAGREE or failed" if bad else
             "; every output check agrees"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""FlexTensor vs vLLM's ``--cpu-offload-gb`` at the same GPU weight budget, in one run.

A Qwen3-30B-A3B-shaped model (``examples/configs/qwen3_30b_a3b.json``, dummy bf16 weights,
no tokenizer) with ``--off-gpu`` (default 75%) of its routed-expert bytes off the GPU:

- ``flextensor``: ``additional_config.flextensor.gpu_budget_gb`` = all weights minus those bytes
  (experts cached by routing frequency, the rest streamed from pinned host memory);
- ``cpu_offload_gb``: stock vLLM, ``cpu_offload_gb`` = those bytes (UVA: the GPU reads the
  offloaded parameters over PCIe wherever its kernels touch them).

Each variant runs in its own process, one after the other, and measures decode tokens/s at
batch 1, 8 and 64 and prefill tokens/s. The parent also measures pinned host-to-device copy
bandwidth, so the JSON reports ``stream_fraction_of_h2d`` (FlexTensor's copy bandwidth,
bytes streamed / side-stream copy time, over that ceiling) and
``decode_bs1_speedup_vs_cpu_offload_gb``. Writes ``$OUT/flextensor_h200.json`` (with the
command) and ``$OUT/flextensor_h200.png``.

    python benchmarks/flextensor_bench.py                  # GPU, ~6-7 minutes on one H200
    python benchmarks/flextensor_bench.py --tiny           # CPU smoke test of the script logic

Both variants run eagerly (``enforce_eager``; no torch.compile or CUDA graphs: start-up time)
unless ``--compile`` is given; FlexTensor never captures CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GiB = 1 << 30


# ---- the worker: one engine, one variant ---------------------------------------------------
def run_variant(spec: dict) -> dict:
    """Start one engine and time decode and prefill; runs in its own process."""
    import random

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.monotonic()
    llm = LLM(model=spec["model"], load_format="dummy", skip_tokenizer_init=True,
              dtype=spec["dtype"], seed=0, enforce_eager=not spec["compile"],
              max_model_len=spec["max_model_len"], max_num_seqs=max(spec["decode_batches"]),
              max_num_batched_tokens=spec["max_num_batched_tokens"],
              additional_config=spec.get("additional_config") or {},
              **spec.get("engine_kwargs", {}))
    startup_s = time.monotonic() - t0
    rng = random.Random(0)
    vocab = spec["vocab_size"]

    def prompts(n, length):
        return [TokensPrompt(prompt_token_ids=[rng.randrange(10, vocab - 10) for _ in range(length)])
                for _ in range(n)]

    def timed(batch, max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                detokenize=False)
        t = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return elapsed

    stats_fn = None
    if spec.get("additional_config", {}).get("flextensor"):
        from vllm_flextensor.moe_layer import worker_stats

        stats_fn = lambda: llm.collective_rpc(worker_stats)[0]  # noqa: E731
    result = {"startup_s": startup_s, "decode": {}, "prefill": {}}
    timed(prompts(2, spec["prompt_len"]), 4)  # warm-up
    before = stats_fn() if stats_fn else None
    steps = spec["decode_steps"]
    for b in spec["decode_batches"]:
        # Fresh prompts for each call: prefix caching must not shorten the second prefill.
        first = timed(prompts(b, spec["prompt_len"]), 1)  # prefill + first token
        total = timed(prompts(b, spec["prompt_len"]), 1 + steps)
        decode_s = max(total - first, 1e-9)
        result["decode"][str(b)] = {"batch": b, "steps": steps, "seconds": decode_s,
                                    "tok_per_s": b * steps / decode_s}
    n, length = spec["prefill_batch"], spec["prefill_len"]
    seconds = timed(prompts(n, length), 1)
    result["prefill"] = {"prompts": n, "prompt_len": length, "seconds": seconds,
                         "tok_per_s": n * length / seconds}
    if stats_fn:
        after = stats_fn()
        result["flextensor_plan"] = after["plan"]
        result["flextensor_mode"] = after["mode"]
        result["flextensor_counters"] = {
            k: after["totals"][k] - before["totals"][k]
            for k in after["totals"] if k != "cache_hit_rate"}
        c = result["flextensor_counters"]
        c["cache_hit_rate"] = c["cache_hits"] / c["cache_lookups"] if c["cache_lookups"] else 0.0
        c["stream_gb_per_s"] = (c["bytes_streamed"] / (c["stream_ms"] / 1e3) / 1e9
                                if c["stream_ms"] > 0 else None)
    import vllm

    result["vllm_version"] = vllm.__version__
    return result


# ---- the parent: model, budget, bandwidth, variants, report ---------------------------------
def h2d_bandwidth_gbs(nbytes: int = 2 * GiB, repeats: int = 5) -> dict:
    """Pinned host -> GPU copy bandwidth (GB/s), the ceiling for streaming experts."""
    import torch

    if not torch.cuda.is_available():
        return {"gb_per_s": None, "reason": "no CUDA device (CPU run)"}
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = 0.0
    for _ in range(repeats):
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best = max(best, nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
    del host, dev
    torch.cuda.empty_cache()
    return {"gb_per_s": best, "bytes": nbytes, "repeats": repeats, "how": "torch copy_ of a "
            "pinned uint8 tensor, best of repeats, CUDA events"}


def model_dir(args, workdir: Path) -> tuple[str, dict]:
    if args.tiny:
        from tests.harness.checkpoints import build_qwen3_moe

        # 12 layers of 16 experts: enough layers that 2 layer-sized stream buffers leave room
        # for a cache at 75% of expert bytes off the GPU (3 layers would not).
        path = build_qwen3_moe(workdir / "tiny_qwen3_moe", num_layers=12, num_experts=16)
        return str(path), json.loads((path / "config.json").read_text())
    cfg = json.loads((REPO / "examples/configs/qwen3_30b_a3b.json").read_text())
    cfg["num_hidden_layers"] = args.layers
    path = workdir / f"qwen3_30b_a3b_{args.layers}layers"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path), cfg


def flextensor_library_status() -> dict:
    try:
        import flextensor  # noqa: F401
    except ImportError as e:
        return {"run": False, "reason": f"the flextensor package is not installed here ({e}); the "
                "device has no network to install it"}
    return {"run": False, "reason": "installed, but this benchmark has no adapter for it yet"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny checkpoint")
    p.add_argument("--layers", type=int, default=24,
                   help="decoder layers of the 30B shape (48 = the full model; fewer start faster)")
    p.add_argument("--off-gpu", type=float, default=0.75, help="share of routed-expert bytes off the GPU")
    p.add_argument("--variants", default="flextensor,cpu_offload_gb,flextensor_uva")
    p.add_argument("--decode-steps", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--compile", action="store_true", help="torch.compile (and CUDA graphs for stock)")
    p.add_argument("--timeout", type=float, default=240, help="seconds per variant")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(run_variant(spec)))
        return 0

    from vllm_flextensor.planner import estimate_model_weights

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="flextensor-bench-"))
    model, cfg = model_dir(args, workdir)
    dtype, dtype_bytes = ("float32", 4) if args.tiny else ("bfloat16", 2)
    w = estimate_model_weights(cfg, dtype_bytes)
    off_bytes = int(args.off_gpu * w.routed_bytes)
    budget_bytes = w.dense_bytes + w.routed_bytes - off_bytes
    common = dict(model=model, dtype=dtype, compile=args.compile, vocab_size=cfg["vocab_size"],
                  decode_batches=[1, 8, 64], prompt_len=32 if not args.tiny else 8,
                  decode_steps=args.decode_steps or (16 if not args.tiny else 4),
                  prefill_batch=8 if not args.tiny else 2,
                  prefill_len=1024 if not args.tiny else 64,
                  max_model_len=2048 if not args.tiny else 256,
                  max_num_batched_tokens=8192 if not args.tiny else 256)
    engine_kwargs = {} if args.tiny else {"gpu_memory_utilization": args.gpu_memory_utilization}
    specs = {
        "flextensor": dict(common, engine_kwargs=engine_kwargs, additional_config={
            "flextensor": {"enabled": True, "gpu_budget_gb": budget_bytes / GiB}}),
        "cpu_offload_gb": dict(common, engine_kwargs=dict(engine_kwargs,
                                                          cpu_offload_gb=off_bytes / GiB)),
        # Same plan, but the kernel reads uncached experts over PCIe in place (UVA) instead
        # of copying them into stream buffers: what `mode: unified` does on GH200 / GB10.
        "flextensor_uva": dict(common, engine_kwargs=engine_kwargs, additional_config={
            "flextensor": {"enabled": True, "gpu_budget_gb": budget_bytes / GiB,
                           "mode": "unified"}}),
    }
    h2d = h2d_bandwidth_gbs() if not args.tiny else {"gb_per_s": None, "reason": "--tiny (CPU)"}
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": "Qwen3-30B-A3B shape (examples/configs/qwen3_30b_a3b.json)" if not args.tiny
        else "tiny random Qwen3-MoE (tests/harness/checkpoints.py)",
        "num_hidden_layers": cfg["num_hidden_layers"],
        "layers_note": None if args.tiny or args.layers == 48 else
        f"{args.layers} of 48 decoder layers (config num_hidden_layers) to fit the device time "
        f"limit; per-layer behaviour is the full model's; full-model tokens/s would be about "
        f"{args.layers}/48 of these",
        "dtype": dtype, "load_format": "dummy", "enforce_eager": not args.compile,
        "weights": {"dense_gib": w.dense_bytes / GiB, "routed_experts_gib": w.routed_bytes / GiB,
                    "expert_mib": w.expert_bytes / 2**20, "moe_layers": w.moe_layers,
                    "experts_per_layer": w.experts_per_layer, "top_k": w.top_k},
        "off_gpu_fraction_of_expert_bytes": args.off_gpu,
        "off_gpu_gib": off_bytes / GiB,
        "gpu_weight_budget_gib": budget_bytes / GiB,
        "gpu_memory_utilization": None if args.tiny else args.gpu_memory_utilization,
        "h2d_pinned": h2d,
        "flextensor_library": flextensor_library_status(),
        "variants": {},
    }
    if args.tiny:
        report["tiny_note"] = ("CPU: host and device are one memory; vLLM's cpu_offload_gb keeps "
                               "CPU weights in place, so this checks the script, not speed")
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    if args.tiny:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for name in args.variants.split(","):
        spec_path, res_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
        spec_path.write_text(json.dumps(specs[name]))
        log_path = out / f"flextensor_bench_{name}.log"
        print(f"[flextensor_bench] running {name} ...", flush=True)
        t = time.monotonic()
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path),
                                     str(res_path)], env=env, cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = f"timeout after {args.timeout:.0f} s"
        if rc == 0:
            report["variants"][name] = json.loads(res_path.read_text())
        else:
            tail = log_path.read_text()[-3000:]
            report["variants"][name] = {"error": f"exit {rc}", "log_tail": tail}
        report["variants"][name]["wall_s"] = time.monotonic() - t
        print(f"[flextensor_bench] {name}: {json.dumps(report['variants'][name])[:600]}",
              flush=True)
    summarize(report)
    name = "flextensor_tiny_cpu" if args.tiny else "flextensor_h200"
    plot(report, out / f"{name}.png")
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("summary", "h2d_pinned")}, indent=2))
    return 0 if all("error" not in v for v in report["variants"].values()) else 1


def summarize(report: dict) -> None:
    v = report["variants"]
    ours, stock = v.get("flextensor", {}), v.get("cpu_offload_gb", {})
    uva = v.get("flextensor_uva", {})
    s = {}
    for b in ("1", "8", "64"):
        a = ours.get("decode", {}).get(b, {}).get("tok_per_s")
        c = stock.get("decode", {}).get(b, {}).get("tok_per_s")
        u = uva.get("decode", {}).get(b, {}).get("tok_per_s")
        s[f"decode_bs{b}_tok_per_s"] = {"flextensor": a, "cpu_offload_gb": c, "flextensor_uva": u}
        s[f"decode_bs{b}_speedup_vs_cpu_offload_gb"] = a / c if a and c else None
        s[f"decode_bs{b}_uva_speedup_vs_cpu_offload_gb"] = u / c if u and c else None
    a, c = ours.get("prefill", {}).get("tok_per_s"), stock.get("prefill", {}).get("tok_per_s")
    u = uva.get("prefill", {}).get("tok_per_s")
    s["prefill_tok_per_s"] = {"flextensor": a, "cpu_offload_gb": c, "flextensor_uva": u}
    s["prefill_speedup_vs_cpu_offload_gb"] = a / c if a and c else None
    s["prefill_uva_speedup_vs_cpu_offload_gb"] = u / c if u and c else None
    counters = ours.get("flextensor_counters", {})
    stream = counters.get("stream_gb_per_s")
    h2d = report["h2d_pinned"].get("gb_per_s")
    s["stream_gb_per_s"] = stream
    s["stream_fraction_of_h2d"] = stream / h2d if stream and h2d else None
    s["cache_hit_rate"] = counters.get("cache_hit_rate")
    s["compute_wait_s"] = counters.get("wait_ms", 0) / 1e3 if counters else None
    s["routing_sync_s"] = counters.get("routing_sync_ms", 0) / 1e3 if counters else None
    report["summary"] = s
    report["decode_bs1_speedup_vs_cpu_offload_gb"] = s["decode_bs1_speedup_vs_cpu_offload_gb"]
    report["stream_fraction_of_h2d"] = s["stream_fraction_of_h2d"]


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report["plot"] = plot_with_pillow(report, path)
        return
    s = report["summary"]
    labels = ["decode bs1", "decode bs8", "decode bs64", "prefill"]
    keys = ["decode_bs1_tok_per_s", "decode_bs8_tok_per_s", "decode_bs64_tok_per_s",
            "prefill_tok_per_s"]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.8))
    for ax, label, key in zip(axes, labels, keys):
        vals = [s[key]["flextensor"] or 0, s[key]["cpu_offload_gb"] or 0]
        bars = ax.bar(["FlexTensor", "--cpu-offload-gb"], vals, color=["tab:green", "tab:gray"])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_title(label)
        ax.set_ylabel("tokens/s")
    h2d = report["h2d_pinned"].get("gb_per_s")
    frac = s.get("stream_fraction_of_h2d")
    fig.suptitle(f"{report['model']}, {report['num_hidden_layers']} layers, "
                 f"{100 * report['off_gpu_fraction_of_expert_bytes']:.0f}% of expert bytes off "
                 f"GPU; H2D {h2d and f'{h2d:.1f}'} GB/s, streaming at "
                 f"{frac and f'{100 * frac:.0f}'}% of it", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    report["plot"] = str(path)


def plot_with_pillow(report: dict, path: Path) -> str:
    """Plain bar chart with Pillow (a vLLM dependency) where matplotlib is not installed."""
    try:
        from PIL import Image, ImageDraw
    except ImportError as e:
        return f"not drawn: neither matplotlib nor Pillow ({e})"
    s = report["summary"]
    panels = [("decode bs1", "decode_bs1_tok_per_s"), ("decode bs8", "decode_bs8_tok_per_s"),
              ("decode bs64", "decode_bs64_tok_per_s"), ("prefill", "prefill_tok_per_s")]
    img = Image.new("RGB", (1200, 420), "white")
    d = ImageDraw.Draw(img)
    h2d, frac = report["h2d_pinned"].get("gb_per_s"), s.get("stream_fraction_of_h2d")
    d.text((10, 8), f"{report['model']}, {report['num_hidden_layers']} layers; tokens/s, green "
                    f"FlexTensor, grey --cpu-offload-gb; H2D {h2d and round(h2d, 1)} GB/s, "
                    f"streaming at {frac and round(100 * frac)}% of it", fill="black")
    for i, (label, key) in enumerate(panels):
        vals = [s[key]["flextensor"] or 0, s[key]["cpu_offload_gb"] or 0]
        top = max(vals) or 1
        x0 = 30 + i * 290
        for j, (v, color) in enumerate(zip(vals, ("green", "grey"))):
            h = int(300 * v / top)
            d.rectangle([x0 + j * 110, 380 - h, x0 + j * 110 + 90, 380], fill=color)
            d.text((x0 + j * 110, 365 - h), f"{v:.1f}", fill="black")
        d.text((x0, 395), label, fill="black")
    img.save(path)
    return str(path)


if __name__ == "__main__":
    sys.exit(main())

"""FlexTensor vs vLLM's ``--cpu-offload-gb`` at the same GPU weight budget, in one run.

A Qwen3-30B-A3B-shaped model (``examples/configs/qwen3_30b_a3b.json``, dummy bf16 weights,
no tokenizer) with ``--off-gpu`` (default 75%) of its routed-expert bytes off the GPU:

- ``flextensor``: ``additional_config.flextensor.gpu_budget_gb`` = all weights minus those bytes
  (experts cached by routing frequency, the rest streamed from pinned host memory), with
  ``prestage_next_layer: true`` (each decode layer also copies the experts the next layer's
  router picks for its hidden states);
- ``flextensor_no_prestage``: the same plan with ``prestage_next_layer: false`` (each decode
  layer copies its uncached experts only after its own routing, none while the layer before
  computes);
- ``flextensor_in_place``: the same plan with ``routed_reads: in_place`` (decode steps read
  uncached routed experts from pinned host memory inside the kernel, no host sync);
- ``flextensor_uva``: the same plan in ``mode: unified`` (every uncached expert read in place);
- ``cpu_offload_gb``: stock vLLM, ``cpu_offload_gb`` = those bytes (UVA: the GPU reads the
  offloaded parameters over PCIe wherever its kernels touch them);
- ``flextensor_lib``: NVIDIA's ``flextensor`` library (PyPI, not this repo) through its vLLM
  worker (``worker_cls`` = ``flextensor.contrib.vllm.worker.FlexTensorOffloadWorker``,
  ``FT_ENABLED=1``), its weight budget ``FT_MAX_GPU_MEM_FRACTION`` = the same budget over the
  GPU's total memory. It offloads whole decoder layers (vLLM's ``make_layers`` units) and
  streams them through a ring of layer-sized GPU blocks; it does not look at the routing.
  Needs the library and its dependencies (``.whl/README.txt``); if it does not start, the JSON
  records ``run: false`` and the tail of its log.

Each variant runs in its own process, one after the other (the engine core in that process
too, so every prompt of a batch is queued before the first step), and measures decode
tokens/s at batch 1, 8 and 64 (over the total time of the timed decode steps) and prefill
tokens/s. The parent also measures pinned host-to-device copy bandwidth, so the JSON reports
``stream_fraction_of_h2d`` (FlexTensor's copy bandwidth, bytes streamed / side-stream copy
time, over that ceiling) and ``decode_bs1_speedup_vs_cpu_offload_gb``. Writes
``$OUT/flextensor_<gpu>.json`` (with the command) and ``$OUT/flextensor_<gpu>.png``
(``<gpu>``: h100, h200, ...).

    python benchmarks/flextensor_bench.py                  # GPU, ~6-7 minutes on one H200
                                                           # before flextensor_lib was added
    python benchmarks/flextensor_bench.py --tiny           # CPU smoke test of the script logic
    python benchmarks/flextensor_bench.py --dry-run        # each variant's command, env and spec
    python benchmarks/flextensor_bench.py --variants flextensor,cpu_offload_gb,flextensor@2 \
        --profile 8    # a variant twice in one run; 8 profiled batch-1 steps of each

All variants run eagerly (``enforce_eager``; no torch.compile or CUDA graphs: start-up time)
unless ``--compile`` is given; FlexTensor never captures CUDA graphs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import signal
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
    # Which of this package's modules the engine imported (vLLM imports a plugin's module only
    # when it loads the plugin; this worker imports none of them before this point).
    loaded = sorted(m for m in ("vllm_dwdp", "vllm_flextensor", "vllm_spark") if m in sys.modules)
    rng = random.Random(0)
    vocab = spec["vocab_size"]

    def prompts(n, length):
        return [TokensPrompt(prompt_token_ids=[rng.randrange(10, vocab - 10) for _ in range(length)])
                for _ in range(n)]

    stats_fn = None
    if spec.get("additional_config", {}).get("flextensor"):
        from vllm_flextensor.moe_layer import worker_stats

        stats_fn = lambda: llm.collective_rpc(worker_stats)[0]  # noqa: E731
    result = {"startup_s": startup_s, "plugin_modules_loaded": loaded, "decode": {},
              "prefill": {}}
    if spec.get("record_tokens"):  # every timed batch's greedy tokens, to compare engines
        result["token_ids"] = []
    steps = spec["decode_steps"]
    engine = llm.llm_engine
    calls = itertools.count()

    def step_times(batch, max_tokens):
        """Queue ``batch``, run the engine step by step: the wall time of each step that
        produced output. In-process (the default, see ``env_all_variants``) every prompt is
        queued before the first step, so a batch is scheduled the same way every run."""
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                detokenize=False)
        call = next(calls)
        finished = {}
        for j, p in enumerate(batch):
            engine.add_request(f"bench-{call}-{j}", p, params)
        times, t = [], time.perf_counter()
        while engine.has_unfinished_requests():
            outs = engine.step()
            if outs:
                now = time.perf_counter()
                times.append(now - t)
                t = now
            assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs if o.finished)
            if "token_ids" in result:
                finished.update((o.request_id, list(o.outputs[0].token_ids))
                                for o in outs if o.finished)
        if "token_ids" in result:
            result["token_ids"].append([finished[f"bench-{call}-{j}"] for j in range(len(batch))])
        return times

    step_times(prompts(2, spec["prompt_len"]), 4)  # warm-up
    before = stats_fn() if stats_fn else None

    for b in spec["decode_batches"]:
        # Each engine step timed on its own: the first steps prefill, the last `steps` are
        # decode steps of the whole batch (a difference of two generate() calls carried the
        # prefills' variance: with 16 steps, --cpu-offload-gb's batch-1 decode came out 21
        # and 82 tokens/s on two runs). Tokens/s from their mean, i.e. their total time:
        # outputs sometimes arrive two steps at once (one sample near 0 ms, the next
        # double), which moves a median but not a sum.
        times = step_times(prompts(b, spec["prompt_len"]), steps + 4)
        decode = sorted(times[-steps:])
        mean = sum(decode) / len(decode)
        median = decode[len(decode) // 2]
        result["decode"][str(b)] = {
            "batch": b, "steps": len(decode), "step_ms_mean": mean * 1e3,
            "step_ms_median": median * 1e3,
            "step_ms_min": decode[0] * 1e3, "step_ms_max": decode[-1] * 1e3,
            "first_steps_ms": [x * 1e3 for x in times[:-steps]],
            "tok_per_s": b / mean, "tok_per_s_from_median": b / median}
    n, length = spec["prefill_batch"], spec["prefill_len"]
    # ``prefill_repeats`` > 1: one untimed prefill of the shape first (kernels it alone
    # needs compile then), then that many timed, each over new prompts; their median counts.
    repeats = spec.get("prefill_repeats", 1)
    if repeats > 1:
        step_times(prompts(n, length), 1)
    runs = [step_times(prompts(n, length), 1) for _ in range(repeats)]
    each = [sum(t) for t in runs]
    seconds = sorted(each)[len(each) // 2]
    result["prefill"] = {"prompts": n, "prompt_len": length, "seconds": seconds,
                         "steps": len(runs[0]), "tok_per_s": n * length / seconds}
    if repeats > 1:
        result["prefill"]["seconds_each"] = each
    if spec.get("profile"):
        result["profile"] = profile_decode(step_times, prompts(1, spec["prompt_len"]),
                                           spec["profile"])
    if stats_fn:
        after = stats_fn()
        result["flextensor_plan"] = after["plan"]
        result["flextensor_mode"] = after["mode"]
        result["flextensor_counters"] = {
            k: after["totals"][k] - before["totals"][k]
            for k in after["totals"] if k != "cache_hit_rate"}
        c = result["flextensor_counters"]
        c["cache_hit_rate"] = c["cache_hits"] / c["cache_lookups"] if c["cache_lookups"] else 0.0
        # Copy-engine bandwidth: bytes the side stream copied over the time it spent copying
        # (in-place reads of routed experts are in bytes_streamed but have no copy time).
        copied = c.get("bytes_copied", c["bytes_streamed"])
        c["stream_gb_per_s"] = copied / (c["stream_ms"] / 1e3) / 1e9 if c["stream_ms"] > 0 else None
    import vllm

    result["vllm_version"] = vllm.__version__
    return result


def profile_decode(step_times, batch, steps: int) -> dict:
    """``steps`` batch-1 decode steps under the torch profiler (the engine core must run in
    this process): where host and GPU time go, as two tables written to the file
    ``$FLEXTENSOR_BENCH_PROFILE_OUT`` (self CPU time, self device time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        times = step_times(batch, steps + 1)
    table = prof.key_averages()
    text = ["self CPU time, all steps:", table.table(sort_by="self_cpu_time_total", row_limit=30)]
    if torch.cuda.is_available():
        text += ["self device time, all steps:",
                 table.table(sort_by="self_device_time_total", row_limit=30)]
    path = os.environ.get("FLEXTENSOR_BENCH_PROFILE_OUT")
    if path:
        Path(path).write_text("\n".join(text))
    return {"steps": steps, "step_ms": [t * 1e3 for t in times], "tables": path}


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


FT_LIB_WORKER_CLS = "flextensor.contrib.vllm.worker.FlexTensorOffloadWorker"


def flextensor_library_status() -> dict:
    """Before the runs: is NVIDIA's flextensor installed (metadata only, no import)?"""
    import importlib.metadata

    try:
        version = importlib.metadata.version("flextensor")
    except importlib.metadata.PackageNotFoundError as e:
        return {"run": False, "version": None, "reason": f"the flextensor package is not "
                f"installed here ({e!r}); install .whl/*.whl (see .whl/README.txt)"}
    return {"run": False, "version": version, "reason": "the flextensor_lib variant was not "
            "requested (--variants)"}


def exception_lines(log: str, limit: int = 20) -> list[str]:
    """The ``SomeError: message`` lines of a log, vLLM's process/log prefixes stripped, in
    order and without repeats (the first is the root cause, the last what the client saw)."""
    import re

    prefix = re.compile(r"^(\(\S+ pid=\d+\) )?(\w+ [\d-]+ [\d:.]+ \[[^\]]*\] )?")
    exc = re.compile(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b[^:\s]*: ")
    found = [prefix.sub("", ln).strip()[:800] for ln in log.splitlines()]
    found = list(dict.fromkeys(ln for ln in found if exc.match(ln)))
    return found if len(found) <= limit else found[:limit // 2] + found[-(limit // 2):]


def gpu_total_bytes() -> int | None:
    """Total device memory as the library sees it (cudaMemGetInfo), for its fraction budget."""
    import torch

    return torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None


def _gpu_tag() -> str:
    """h100 / h200 / ...: result files are named for the GPU they were measured on."""
    import torch

    name = torch.cuda.get_device_name(0).lower() if torch.cuda.is_available() else "cpu"
    for tag in ("h200", "h100", "b200", "gb10", "gh200", "a100"):
        if tag in name:
            return tag
    return "gpu"


def run_worker(spec: dict, env: dict, workdir: Path, name: str, log_path: Path,
               timeout: float) -> tuple[int | str, dict | None, str]:
    """Run :func:`run_variant` on ``spec`` in a process of its own (its own process group:
    on a timeout the engine core, a child of the worker, goes too and frees the GPU).
    Returns (exit status or the timeout, its result or None, its log)."""
    spec_path, res_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, __file__, "--worker", str(spec_path), str(res_path)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout:.0f} s"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    text = log_path.read_text(errors="replace")
    return rc, (json.loads(res_path.read_text()) if rc == 0 else None), text


def worker_command(workdir: Path, name: str) -> list[str]:
    """The command :func:`run_worker` runs for ``name`` (for --dry-run)."""
    return [sys.executable, __file__, "--worker", str(workdir / f"{name}.spec.json"),
            str(workdir / f"{name}.result.json")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny checkpoint")
    p.add_argument("--layers", type=int, default=24,
                   help="decoder layers of the 30B shape (48 = the full model; fewer start faster)")
    p.add_argument("--off-gpu", type=float, default=0.75, help="share of routed-expert bytes off the GPU")
    p.add_argument("--variants", default="flextensor,flextensor_no_prestage,cpu_offload_gb,"
                   "flextensor_in_place,flextensor_uva,flextensor_lib")
    p.add_argument("--decode-steps", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--compile", action="store_true", help="torch.compile (and CUDA graphs for stock)")
    p.add_argument("--timeout", type=float, default=240, help="seconds per variant")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after the timed runs, profile STEPS batch-1 decode steps (torch "
                   "profiler, host and GPU; needs the engine in-process) of the variants in "
                   "--profile-variants; tables in $OUT/flextensor_bench_<variant>_profile.txt")
    p.add_argument("--profile-variants", default="flextensor,cpu_offload_gb")
    p.add_argument("--engine-process", action="store_true",
                   help="run each engine core in its own process (vLLM's default; batches then "
                   "depend on when prompts reach it)")
    p.add_argument("--lib-timeout", type=float, default=None,
                   help="seconds for flextensor_lib (default: --timeout); it stages and pins every "
                   "weight on the host at start-up and streams whole layers, so it may need more")
    p.add_argument("--lib-env", default="", help="extra KEY=VALUE,... for flextensor_lib "
                   "(e.g. FT_NUM_BLOCKS=2 or DISABLE_BEARTYPE=1); the library's defaults otherwise")
    p.add_argument("--dry-run", action="store_true",
                   help="write the specs and print each variant's command and env; start no engine")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.profile and args.engine_process:
        p.error("--profile needs the engine core in the worker's process: drop --engine-process")
    args.profile_variants = args.profile_variants.split(",")
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
                  decode_steps=args.decode_steps or (48 if not args.tiny else 4),
                  prefill_batch=8 if not args.tiny else 2,
                  prefill_len=1024 if not args.tiny else 64,
                  max_model_len=2048 if not args.tiny else 256,
                  max_num_batched_tokens=8192 if not args.tiny else 256)
    engine_kwargs = {} if args.tiny else {"gpu_memory_utilization": args.gpu_memory_utilization}

    def ours(**settings) -> dict:
        """A FlexTensor variant: the same budget (so the same plan), ``settings`` on top."""
        return dict(common, engine_kwargs=engine_kwargs, additional_config={"flextensor": {
            "enabled": True, "gpu_budget_gb": budget_bytes / GiB, **settings}})

    specs = {
        # Each decode layer also copies the next layer's guessed experts behind its own.
        "flextensor": ours(prestage_next_layer=True),
        "cpu_offload_gb": dict(common, engine_kwargs=dict(engine_kwargs,
                                                          cpu_offload_gb=off_bytes / GiB)),
        # No layer copies the next one's guessed experts ahead of its routing.
        "flextensor_no_prestage": ours(prestage_next_layer=False),
        # Decode steps read uncached routed experts over PCIe from the kernel
        # (routed_reads: in_place, no host sync) instead of copying them after routing.
        "flextensor_in_place": ours(routed_reads="in_place"),
        # The kernel reads uncached experts over PCIe in place (UVA) instead of copying them
        # into stream buffers: what `mode: unified` does on GH200 / GB10.
        "flextensor_uva": ours(mode="unified"),
    }
    # NVIDIA's flextensor through its vLLM worker. Its budget covers every weight on the GPU
    # (resident ones and its stream blocks), as a fraction of the device's total memory.
    total = gpu_total_bytes()
    lib_env = {"FT_ENABLED": "1"}
    if total:
        lib_env["FT_MAX_GPU_MEM_FRACTION"] = repr(budget_bytes / total)
    lib_env.update(kv.split("=", 1) for kv in args.lib_env.split(",") if kv)
    specs["flextensor_lib"] = dict(common, engine_kwargs=dict(engine_kwargs,
                                                              worker_cls=FT_LIB_WORKER_CLS),
                                   env=lib_env, log_grep=["FlexTensor", "flextensor",
                                                          "Model loading took", "KV cache"])
    h2d = h2d_bandwidth_gbs() if not args.tiny else {"gb_per_s": None, "reason": "--tiny (CPU)"}
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": "Qwen3-30B-A3B shape (examples/configs/qwen3_30b_a3b.json)" if not args.tiny
        else "tiny random Qwen3-MoE (tests/harness/checkpoints.py)",
        "num_hidden_layers": cfg["num_hidden_layers"],
        "layers_note": None if args.tiny or args.layers == 48 else
        f"{args.layers} of 48 decoder layers (config num_hidden_layers) to keep a run within 10 "
        f"minutes; per-layer behaviour is the full model's; full-model tokens/s would be about "
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
        "gpu_total_bytes": total,
        "flextensor_library": flextensor_library_status(),
        "variants": {},
    }
    if args.tiny:
        report["tiny_note"] = ("CPU: host and device are one memory; vLLM's cpu_offload_gb keeps "
                               "CPU weights in place, so this checks the script, not speed")
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    # Every variant decodes greedily: FlashInfer's top-k/top-p sampler is never used (and
    # compiles for minutes on a fresh machine). The engine core runs in the worker's process
    # unless --engine-process: with it in its own process, the first step takes whichever
    # prompts have arrived, and a prefill of 8 prompts ran in one step in one run and two in
    # the next (0.46 s and 0.93 s: every step streams the layers' experts once).
    report["env_all_variants"] = {"VLLM_USE_FLASHINFER_SAMPLER": "0"}
    if not args.engine_process:
        report["env_all_variants"]["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.update(report["env_all_variants"])
    if args.tiny:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    stem = "flextensor_tiny_cpu" if args.tiny else f"flextensor_{_gpu_tag()}"
    for name in args.variants.split(","):
        # "flextensor@2": the flextensor variant again (a second sample in the same run)
        variant = name.split("@")[0]
        spec = dict(specs[variant], profile=args.profile if variant in args.profile_variants
                    else None)
        log_path = out / f"flextensor_bench_{name}.log"
        cmd = worker_command(workdir, name)
        venv = dict(env, **specs[variant].get("env", {}))
        if spec["profile"]:
            venv["FLEXTENSOR_BENCH_PROFILE_OUT"] = str(out / f"flextensor_bench_{name}_profile.txt")
        timeout = (args.lib_timeout if variant == "flextensor_lib" and args.lib_timeout
                   else args.timeout)
        if args.dry_run:
            print(f"[flextensor_bench] {name}: env {json.dumps(specs[variant].get('env', {}))} "
                  f"timeout {timeout:.0f} s\n  {shlex.join(cmd)}\n  spec {json.dumps(spec)}")
            continue
        print(f"[flextensor_bench] running {name} ...", flush=True)
        t = time.monotonic()
        rc, result, text = run_worker(spec, venv, workdir, name, log_path, timeout)
        if rc == 0:
            report["variants"][name] = result
        else:
            report["variants"][name] = {"error": f"exit {rc}", "error_lines":
                                        exception_lines(text), "log_tail": text[-3000:]}
        if spec.get("log_grep"):
            report["variants"][name]["log_lines"] = [
                ln[:1500] for ln in text.splitlines()
                if any(k in ln for k in spec["log_grep"]) and "File \"" not in ln][:40]
        if spec.get("env"):
            report["variants"][name]["env"] = spec["env"]
        report["variants"][name]["wall_s"] = time.monotonic() - t
        if variant == "flextensor_lib":
            lib = report["flextensor_library"]
            lib.update(run="error" not in report["variants"][name], variant=name,
                       worker_cls=FT_LIB_WORKER_CLS, env=spec["env"])
            errs = report["variants"][name].get("error_lines") or ["(no exception in its log)"]
            # The first exception is the root cause (the engine's worker); the last, what the
            # client saw.
            lib["reason"] = (None if lib["run"] else f"{report['variants'][name]['error']}: "
                             + " ... ".join(dict.fromkeys([errs[0], errs[-1]])))
        print(f"[flextensor_bench] {name}: {json.dumps(report['variants'][name])[:600]}",
              flush=True)
        # Written after every variant: a run stopped later (a time limit) keeps what finished.
        summarize(report)
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    if args.dry_run:
        print(json.dumps({k: v for k, v in report.items() if k != "variants"}, indent=2))
        return 0
    summarize(report)
    plot(report, out / f"{stem}.png")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("summary", "h2d_pinned")}, indent=2))
    # The library failing to start is a finding (flextensor_library.run false), not a failure.
    return 0 if all("error" not in v for k, v in report["variants"].items()
                    if k != "flextensor_lib") else 1


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
    # NVIDIA's flextensor library (flextensor_lib): its tokens/s next to the others, its
    # speedup over --cpu-offload-gb, and ours over it.
    lib = v.get("flextensor_lib", {})
    for key, get in [(f"decode_bs{b}", lambda r, b=b: r.get("decode", {}).get(b, {}))
                     for b in ("1", "8", "64")] + [("prefill", lambda r: r.get("prefill", {}))]:
        a, c, x = (get(r).get("tok_per_s") for r in (ours, stock, lib))
        s[f"{key}_tok_per_s"]["flextensor_lib"] = x
        s[f"{key}_lib_speedup_vs_cpu_offload_gb"] = x / c if x and c else None
        s[f"{key}_speedup_vs_flextensor_lib"] = a / x if a and x else None
    # Every other variant that ran (e.g. flextensor_in_place): tokens/s and speedup.
    for name, r in v.items():
        if name in ("flextensor", "cpu_offload_gb", "flextensor_uva", "flextensor_lib"):
            continue
        for key, get in [(f"decode_bs{b}", lambda r, b=b: r.get("decode", {}).get(b, {}))
                         for b in ("1", "8", "64")] + [("prefill", lambda r: r.get("prefill", {}))]:
            x, c = get(r).get("tok_per_s"), get(stock).get("tok_per_s")
            s[f"{key}_tok_per_s"][name] = x
            s[f"{key}_{name}_speedup_vs_cpu_offload_gb"] = x / c if x and c else None
    counters = ours.get("flextensor_counters", {})
    stream = counters.get("stream_gb_per_s")
    h2d = report["h2d_pinned"].get("gb_per_s")
    s["stream_gb_per_s"] = stream
    s["stream_fraction_of_h2d"] = stream / h2d if stream and h2d else None
    s["cache_hit_rate"] = counters.get("cache_hit_rate")
    # Pre-staging: experts copied on a guess of the next layer's routing, and the share of
    # them its router then picked (dummy weights: every layer sees nearly the same hidden
    # states, so the guess is better than a trained model's would be).
    staged = counters.get("experts_prestaged")
    s["experts_prestaged"] = staged
    s["prestage_hit_rate"] = counters["prestaged_used"] / staged if staged else None
    s["compute_wait_s"] = counters.get("wait_ms", 0) / 1e3 if counters else None
    s["routing_sync_s"] = counters.get("routing_sync_ms", 0) / 1e3 if counters else None
    report["summary"] = s
    report["decode_bs1_speedup_vs_cpu_offload_gb"] = s["decode_bs1_speedup_vs_cpu_offload_gb"]
    report["stream_fraction_of_h2d"] = s["stream_fraction_of_h2d"]


PLOT_VARIANTS = [("flextensor", "FlexTensor\n(copy)", "tab:green"),
                 ("flextensor_no_prestage", "FlexTensor\n(no pre-\nstaging)", "darkseagreen"),
                 ("flextensor_in_place", "FlexTensor\n(in_place)", "yellowgreen"),
                 ("flextensor_uva", "FlexTensor\n(unified)", "olivedrab"),
                 ("cpu_offload_gb", "--cpu-\noffload-gb", "tab:gray"),
                 ("flextensor_lib", "flextensor\n(NVIDIA lib)", "tab:blue")]


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
    # Every variant that has a number in some panel, in this order.
    shown = [(v, name, color) for v, name, color in PLOT_VARIANTS
             if any(s[k].get(v) for k in keys)]
    fig, axes = plt.subplots(1, 4, figsize=(3.2 + 2.2 * len(shown), 3.8))
    for ax, label, key in zip(axes, labels, keys):
        bars = ax.bar([name for _, name, _ in shown], [s[key].get(v) or 0 for v, _, _ in shown],
                      color=[color for _, _, color in shown])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_title(label)
        ax.set_ylabel("tokens/s")
        ax.tick_params(axis="x", labelsize=7)
    h2d = report["h2d_pinned"].get("gb_per_s")
    frac = s.get("stream_fraction_of_h2d")
    title = (f"{report['model']}, {report['num_hidden_layers']} layers, "
             f"{100 * report['off_gpu_fraction_of_expert_bytes']:.0f}% of expert bytes off "
             f"GPU; H2D {h2d and f'{h2d:.1f}'} GB/s, streaming at "
             f"{frac and f'{100 * frac:.0f}'}% of it")
    # Variants that ran but have no bar: say why, so a missing bar is not read as zero.
    missing = [f"{name}: {v['error']}" for name, v in report["variants"].items()
               if "error" in v]
    if missing:
        title += "\nno numbers: " + "; ".join(missing)
    fig.suptitle(title, fontsize=9)
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
    lib = any(s[k].get("flextensor_lib") for _, k in panels)  # NVIDIA's flextensor, where it ran
    d.text((10, 8), f"{report['model']}, {report['num_hidden_layers']} layers; tokens/s, green "
                    f"FlexTensor, grey --cpu-offload-gb{', blue flextensor lib' if lib else ''}; "
                    f"H2D {h2d and round(h2d, 1)} GB/s, "
                    f"streaming at {frac and round(100 * frac)}% of it", fill="black")
    for i, (label, key) in enumerate(panels):
        vals = [s[key]["flextensor"] or 0, s[key]["cpu_offload_gb"] or 0]
        vals += [s[key].get("flextensor_lib") or 0] if lib else []
        top = max(vals) or 1
        x0 = 30 + i * 290
        for j, (v, color) in enumerate(zip(vals, ("green", "grey", "blue"))):
            h = int(300 * v / top)
            d.rectangle([x0 + j * 85, 380 - h, x0 + j * 85 + 70, 380], fill=color)
            d.text((x0 + j * 85, 365 - h), f"{v:.1f}", fill="black")
        d.text((x0, 395), label, fill="black")
    img.save(path)
    return str(path)


if __name__ == "__main__":
    sys.exit(main())

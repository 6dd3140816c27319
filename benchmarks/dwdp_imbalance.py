"""DWDP vs vLLM data parallel + expert parallel (and TP+EP) on imbalanced prefill.

    python benchmarks/dwdp_imbalance.py --gpus 2 --modes dwdp,dep --isl 2048,8192,16384 \\
        --load-cv 0,0.2,0.4 --out results.json

Workload: every rank is kept busy with its own queue of ``--requests`` prompts; rank r's
prompts are ``ISL * f_r`` tokens long, with the factors ``f`` of mean 1 and coefficient of
variation ``load_cv`` (so per-step work differs across ranks), ``--osl`` output tokens each,
one prompt prefilled per step (``max_num_seqs``=1). Each rank is one process on one GPU:

- ``dwdp``: N independent engines with ``additional_config.dwdp`` (this project).
- ``dep``: vLLM's offline data parallel with expert parallelism (``VLLM_DP_*``,
  ``enable_expert_parallel=True``): the ranks run in lock-step.
- ``tpep``: one engine, ``tensor_parallel_size=N``, ``enable_expert_parallel=True``, all
  ranks' prompts in one queue (``max_num_seqs``=N).

Reported per mode and (ISL, load_cv): per-GPU throughput (mean over ranks of the tokens a rank
processed divided by its own time: what a busy GPU delivers), makespan throughput (all tokens
/ slowest rank / N), per-request output tokens/s (interactivity), and speedup of DWDP over
DP+EP on both. Weights are dummy (``load_format="dummy"``) with the shapes of ``--config``.
All engines run eagerly (no CUDA graphs) in every mode, so the comparison is like for like.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_factors(n: int, cv: float) -> list[float]:
    """n factors with mean 1 and (population) coefficient of variation exactly cv."""
    if n == 1 or cv == 0:
        return [1.0] * n
    z = [i - (n - 1) / 2 for i in range(n)]
    sd = statistics.pstdev(z)
    f = [1 + cv * zi / sd for zi in z][::-1]  # rank 0 is the most loaded
    if min(f) <= 0.05:
        raise SystemExit(f"load_cv {cv} is too large for {n} ranks (a rank would get no work)")
    return f


def prompts_for(rank: int, n: int, isl: int, cv: float, count: int, vocab: int) -> list[list[int]]:
    import random

    length = max(16, round(isl * load_factors(n, cv)[rank]))
    rnd = random.Random(1000 * rank + isl)
    return [[rnd.randrange(100, vocab - 100) for _ in range(length)] for _ in range(count)]


# --------------------------------------------------------------------------- worker side
def worker(args) -> None:
    from torch.distributed import TCPStore
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rank, n, mode = args.rank, args.gpus, args.mode
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    isls = [int(x) for x in args.isl.split(",")]
    cvs = [float(x) for x in args.load_cv.split(",")]
    max_len = int(max(isls) * (1 + max(cvs) * 2)) + args.osl + 64
    kwargs = dict(model=args.model, load_format="dummy", skip_tokenizer_init=True,
                  enforce_eager=True, max_model_len=max_len,
                  max_num_batched_tokens=max_len, gpu_memory_utilization=0.85,
                  max_num_seqs=n if mode == "tpep" else 1, seed=0)
    if mode == "dwdp":
        kwargs["additional_config"] = {"dwdp": {"enabled": True, "world_size": n, "rank": rank,
                                                "group": f"imbalance{args.port}"}}
    elif mode == "dep":
        kwargs["enable_expert_parallel"] = True
    elif mode == "tpep":
        kwargs.update(tensor_parallel_size=n, enable_expert_parallel=True)
    store = TCPStore("127.0.0.1", args.port, world_size=args.procs, is_master=rank == 0,
                     wait_for_workers=False)
    llm = LLM(**kwargs)
    sp = SamplingParams(max_tokens=args.osl, temperature=0, ignore_eos=True, detokenize=False)
    llm.generate([TokensPrompt(prompt_token_ids=[5] * 64)] * 2, sp, use_tqdm=False)  # warm-up
    rows = []
    for isl in isls:
        for cv in cvs:
            if mode == "tpep":
                prompts = [p for r in range(n) for p in
                           prompts_for(r, n, isl, cv, args.requests, cfg["vocab_size"])]
            else:
                prompts = prompts_for(rank, n, isl, cv, args.requests, cfg["vocab_size"])
            key = f"go/{isl}/{cv}"
            store.add(key, 1)
            while int(store.add(key, 0)) < args.procs:  # start together
                time.sleep(0.01)
            t0 = time.perf_counter()
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp,
                                use_tqdm=False)
            elapsed = time.perf_counter() - t0
            in_tok = sum(len(p) for p in prompts)
            out_tok = sum(len(o.outputs[0].token_ids) for o in outs)
            rows.append({"rank": rank, "isl": isl, "load_cv": cv, "seconds": elapsed,
                         "input_tokens": in_tok, "output_tokens": out_tok,
                         "requests": len(prompts)})
            done = f"done/{isl}/{cv}"
            store.add(done, 1)
            while int(store.add(done, 0)) < args.procs:  # dep ranks must not run ahead
                time.sleep(0.01)
    with open(args.worker_out, "w") as f:
        json.dump(rows, f)


# --------------------------------------------------------------------------- driver side
def write_model_dir(config_path: str) -> str:
    d = tempfile.mkdtemp(prefix="dwdp-bench-model-")
    shutil.copy(config_path, os.path.join(d, "config.json"))
    return d


def run_mode(mode: str, args, model_dir: str, tmp: str) -> list[dict]:
    n = args.gpus
    procs_n = 1 if mode == "tpep" else n
    port = args.port + {"dwdp": 0, "dep": 100, "tpep": 200}[mode]
    procs = []
    for r in range(procs_n):
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        devices = [str(d) for d in range(n)]
        if mode == "dwdp":
            env["CUDA_VISIBLE_DEVICES"] = ",".join([devices[r]] + devices[:r] + devices[r + 1:])
        elif mode == "dep":
            env.update(VLLM_DP_RANK=str(r), VLLM_DP_RANK_LOCAL=str(r), VLLM_DP_SIZE=str(n),
                       VLLM_DP_MASTER_IP="127.0.0.1", VLLM_DP_MASTER_PORT=str(port + 50),
                       CUDA_VISIBLE_DEVICES=",".join(devices))
        out = os.path.join(tmp, f"{mode}-{r}.json")
        cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--rank", str(r),
               "--procs", str(procs_n), "--port", str(port), "--worker-out", out,
               "--model", model_dir, "--gpus", str(n), "--isl", args.isl,
               "--load-cv", args.load_cv, "--osl", str(args.osl), "--requests", str(args.requests)]
        log = open(os.path.join(tmp, f"{mode}-{r}.log"), "w")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), out,
                      log.name))
    rows = []
    for p, out, log in procs:
        rc = p.wait(timeout=args.timeout)
        if rc != 0:
            tail = open(log).read()[-4000:]
            raise SystemExit(f"{mode} rank process failed ({rc}):\n{tail}")
        rows += json.load(open(out))
    return rows


def summarize(mode: str, rows: list[dict], n: int) -> list[dict]:
    out = []
    for key in sorted({(r["isl"], r["load_cv"]) for r in rows}):
        rs = [r for r in rows if (r["isl"], r["load_cv"]) == key]
        tokens = [r["input_tokens"] + r["output_tokens"] for r in rs]
        if mode == "tpep":
            per_gpu = tokens[0] / rs[0]["seconds"] / n
            makespan = per_gpu
            out_tps_user = rs[0]["output_tokens"] / rs[0]["seconds"] / rs[0]["requests"]
        else:
            per_gpu = statistics.mean(t / r["seconds"] for t, r in zip(tokens, rs))
            makespan = sum(tokens) / max(r["seconds"] for r in rs) / n
            out_tps_user = statistics.mean(r["output_tokens"] / r["seconds"] / r["requests"]
                                           for r in rs)
        out.append({"mode": mode, "isl": key[0], "load_cv": key[1], "num_gpus": n,
                    "tps_per_gpu": per_gpu, "makespan_tps_per_gpu": makespan,
                    "output_tps_per_user": out_tps_user, "ranks": rs})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "examples/configs/qwen3_30b_a3b.json"))
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--modes", default="dwdp,dep")
    p.add_argument("--isl", default="2048,8192,16384")
    p.add_argument("--load-cv", default="0,0.2,0.4")
    p.add_argument("--osl", type=int, default=8)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--port", type=int, default=31000)
    p.add_argument("--timeout", type=float, default=1500)
    p.add_argument("--out", default="dwdp_imbalance.json")
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--procs", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    model_dir = write_model_dir(args.config)
    tmp = tempfile.mkdtemp(prefix="dwdp-bench-")
    summary = []
    for mode in args.modes.split(","):
        t0 = time.time()
        summary += summarize(mode, run_mode(mode, args, model_dir, tmp), args.gpus)
        print(f"[{mode}] done in {time.time() - t0:.0f} s", flush=True)
    rows = []
    for s in summary:
        if s["mode"] != "dwdp":
            continue
        dep = next((d for d in summary if d["mode"] == "dep" and d["isl"] == s["isl"]
                    and d["load_cv"] == s["load_cv"]), None)
        row = {"num_gpus": s["num_gpus"], "isl": s["isl"], "load_cv": s["load_cv"],
               "dwdp_tps_per_gpu": round(s["tps_per_gpu"], 1),
               "dwdp_makespan_tps_per_gpu": round(s["makespan_tps_per_gpu"], 1),
               "dwdp_output_tps_per_user": round(s["output_tps_per_user"], 2)}
        if dep:
            row.update(dep_tps_per_gpu=round(dep["tps_per_gpu"], 1),
                       dep_makespan_tps_per_gpu=round(dep["makespan_tps_per_gpu"], 1),
                       dep_output_tps_per_user=round(dep["output_tps_per_user"], 2),
                       speedup_vs_dep=round(s["tps_per_gpu"] / dep["tps_per_gpu"], 3),
                       makespan_speedup_vs_dep=round(
                           s["makespan_tps_per_gpu"] / dep["makespan_tps_per_gpu"], 3))
        rows.append(row)
    result = {"command": "python benchmarks/dwdp_imbalance.py " + " ".join(sys.argv[1:]),
              "config": os.path.basename(args.config), "osl": args.osl,
              "requests_per_rank": args.requests, "rows": rows, "all": summary}
    try:
        import torch
        import vllm

        result.update(vllm_version=vllm.__version__, gpu=torch.cuda.get_device_name(0))
    except Exception as e:  # noqa: BLE001 - recorded in the result, not hidden
        result["env_error"] = repr(e)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()

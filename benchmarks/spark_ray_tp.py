"""TP=2 over Ray with NCCL on sockets (as between two DGX Sparks) vs TP=2 in one process
group over NVLink, on one 2-GPU host.

    OUT=/tmp/out PYTHONPATH=/tmp/site python benchmarks/spark_ray_tp.py          # 2 GPUs
    python benchmarks/spark_ray_tp.py --tiny --out /tmp/spark-tiny                # CPU smoke

Two Ray nodes run on this host, started by vllm_spark's own code (inventory with two
``ssh: local`` hosts, ``cluster.up``): the head at 127.0.0.2 with ``CUDA_VISIBLE_DEVICES=0``,
the worker at 127.0.0.3 with ``=1``, one GPU each, so vLLM's Ray executor puts one TP rank on
each "node". Both get vllm_spark's node environment (NCCL/Gloo on ``lo``, Ray token auth)
plus NCCL forced onto sockets (P2P, SHM and IB disabled, ``NCCL_NET=Socket``). The baseline
is the same model with ``--distributed-executor-backend mp`` on GPUs 0,1 (NVLink).

Model: the Qwen3-30B-A3B shape (examples/configs/qwen3_30b_a3b.json), config.json only,
``load_format=dummy``, ``skip_tokenizer_init``: no download. Each measurement runs in its own
process: prefill tok/s (batch B of L-token prompts, 1 output token) and decode tok/s
(``B * (D - 1)`` tokens over the time beyond that prefill) at a few batch sizes.
Writes ``$OUT/spark_ray_tp_h200.json`` (``--tiny``: ``spark_ray_tp_tiny.json``) with the
command, after each phase, so a timeout still leaves the finished part.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_CONFIG = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
               "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256,
               "moe_intermediate_size": 64, "num_experts": 8, "num_experts_per_tok": 2,
               "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
               "vocab_size": 512, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
               "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
               "hidden_act": "silu"}


def measure(spec: dict) -> dict:
    """Runs in a child process: build the engine, time prefill and decode per batch size."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, load_format="dummy",
              tensor_parallel_size=2, distributed_executor_backend=spec["executor"],
              enforce_eager=spec["enforce_eager"], max_model_len=spec["max_model_len"],
              max_num_seqs=max(spec["batches"]), dtype=spec["dtype"],
              **({"gpu_memory_utilization": 0.85} if not spec["tiny"] else {}))
    startup = time.time() - t0
    rng = random.Random(0)
    vocab = json.loads((Path(spec["model"]) / "config.json").read_text())["vocab_size"]
    L, D = spec["prompt_len"], spec["decode_len"]

    def prompts(b):
        return [TokensPrompt(prompt_token_ids=[rng.randrange(10, vocab - 10) for _ in range(L)])
                for _ in range(b)]

    def timed(b, n):
        ps = prompts(b)
        t = time.time()
        llm.generate(ps, SamplingParams(max_tokens=n, ignore_eos=True, detokenize=False,
                                        temperature=0.0), use_tqdm=False)
        return time.time() - t

    timed(2, 4)  # warm-up
    rows = []
    for b in spec["batches"]:
        t_prefill = timed(b, 1)
        t_total = timed(b, D)
        decode_s = max(t_total - t_prefill, 1e-9)
        rows.append({"batch": b, "prompt_len": L, "decode_len": D,
                     "prefill_s": round(t_prefill, 4), "total_s": round(t_total, 4),
                     "prefill_tok_s": round(b * L / t_prefill, 1),
                     "decode_tok_s": round(b * (D - 1) / decode_s, 1)})
    return {"startup_s": round(startup, 1), "rows": rows}


def run_measurement(spec: dict, env: dict, timeout: float, workdir: Path) -> dict:
    spec_path = workdir / f"{spec['name']}.spec.json"
    out_path = workdir / f"{spec['name']}.out.json"
    log_path = workdir / f"{spec['name']}.log"
    spec_path.write_text(json.dumps(spec))
    with open(log_path, "w") as log:
        p = subprocess.Popen([sys.executable, __file__, "--measure", str(spec_path),
                              str(out_path)], env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            rc = "timeout"
    if rc != 0 or not out_path.exists():
        tail = log_path.read_text()[-2000:]
        return {"error": f"exit {rc}", "log_tail": tail}
    return json.loads(out_path.read_text())


def ray_inventory(model: str, tiny: bool):
    from vllm_spark.inventory import parse_inventory
    from vllm_spark.netenv import SOCKET_ONLY_NCCL

    env = {"VLLM_SPARK_CPU_RAY": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"} \
        if tiny else dict(SOCKET_ONLY_NCCL)
    hosts = []
    for i, ip in enumerate(["127.0.0.2", "127.0.0.3"]):
        host_env = dict(env) if tiny else {**env, "CUDA_VISIBLE_DEVICES": str(i)}
        hosts.append({"name": f"gpu{i}", "ssh": "local", "address": ip, "env": host_env})
    return parse_inventory({
        "cluster": {"name": f"bench{os.getpid()}", "interface": "lo", "python": sys.executable,
                    "model": model, "num_gpus": 1,
                    "ray_port": 36379, "dashboard_port": 38265, "serve_port": 38000},
        "hosts": hosts})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="capture CUDA graphs (default eager: both runs fit in 8 minutes)")
    ap.add_argument("--phase-timeout", type=float, default=200)
    ap.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        spec = json.loads(Path(args.measure[0]).read_text())
        Path(args.measure[1]).write_text(json.dumps(measure(spec)))
        return 0

    from vllm_spark import cluster
    from vllm_spark.preflight import node_envs

    started = time.time()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / ("spark_ray_tp_tiny.json" if args.tiny else "spark_ray_tp_h200.json")
    work = Path(tempfile.mkdtemp(prefix="spark-ray-tp-"))
    model = work / "model"
    model.mkdir()
    config = TINY_CONFIG if args.tiny else json.loads(
        (ROOT / "examples/configs/qwen3_30b_a3b.json").read_text())
    (model / "config.json").write_text(json.dumps(config))
    batches = [int(b) for b in (args.batches or ("1,4" if args.tiny else "1,8,32")).split(",")]
    base = {"model": str(model), "batches": batches, "tiny": args.tiny,
            "enforce_eager": args.tiny or not args.cuda_graphs,
            "prompt_len": 32 if args.tiny else 1024, "decode_len": 8 if args.tiny else 64,
            "max_model_len": 256 if args.tiny else 2048,
            "dtype": "float32" if args.tiny else "bfloat16"}
    result = {"command": " ".join(["python",
                                   "benchmarks/spark_ray_tp.py", *sys.argv[1:]]),
              "model": "tiny qwen3_moe" if args.tiny else "Qwen3-30B-A3B shape (dummy weights)",
              "settings": base, "runs": {}}
    try:
        import vllm

        result["vllm"] = vllm.__version__
    except ImportError:
        pass

    def save():
        result["wall_s"] = round(time.time() - started, 1)
        out_file.write_text(json.dumps(result, indent=2))

    # 1) baseline: one process group, mp executor (NVLink on GPUs)
    env = dict(os.environ)
    if args.tiny:
        env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    else:
        env["CUDA_VISIBLE_DEVICES"] = "0,1"
    result["runs"]["mp_nvlink"] = run_measurement({**base, "name": "mp", "executor": "mp"},
                                                  env, args.phase_timeout, work)
    save()

    # 2) two Ray "nodes", NCCL on sockets
    inv = ray_inventory(str(model), args.tiny)
    try:
        report = cluster.up(inv, timeout=90, log=lambda m: print(f"[ray] {m}", flush=True))
        head_env = node_envs(inv, report.facts)[inv.head.name]
        env = {**os.environ, **head_env,
               "RAY_ADDRESS": f"{inv.head.address}:{inv.ray_port}"}
        result["ray_node_env"] = {k: v for k, v in head_env.items() if "TOKEN" not in k}
        result["runs"]["ray_socket"] = run_measurement(
            {**base, "name": "ray", "executor": "ray"}, env, args.phase_timeout, work)
    except Exception as e:  # noqa: BLE001 - recorded in the result, then re-raised below
        result["runs"]["ray_socket"] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        cluster.down(inv, log=lambda m: print(f"[ray] {m}", flush=True))
    mp, ray = result["runs"]["mp_nvlink"], result["runs"]["ray_socket"]
    if "rows" in mp and "rows" in ray:
        result["ray_over_mp"] = [
            {"batch": a["batch"],
             "prefill": round(b["prefill_tok_s"] / a["prefill_tok_s"], 3),
             "decode": round(b["decode_tok_s"] / a["decode_tok_s"], 3)}
            for a, b in zip(mp["rows"], ray["rows"])]
    save()
    print(json.dumps(result, indent=2))
    return 0 if "rows" in mp and "rows" in ray else 1


if __name__ == "__main__":
    sys.exit(main())

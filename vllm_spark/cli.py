"""``vllm-spark`` command line: one vLLM server across nodes reached over SSH (Ray, or
vLLM's native multi-node).

    vllm-spark preflight -i sparks.yaml          # every problem, one line each; exit 1 if any
    vllm-spark up        -i sparks.yaml          # preflight + Ray head/workers (token auth)
    vllm-spark serve     -i sparks.yaml --tp 2   # (up if needed) + vllm serve over Ray
    vllm-spark serve     -i sparks.yaml --tp 2 --via-job   # as a Ray job on a running cluster
    vllm-spark serve     -i sparks.yaml --tp 2 --mode native  # vLLM's own multi-node, no Ray
    vllm-spark serve     -i sparks.yaml --recipe qwen3-235b-a22b-nvfp4   # a preset
    vllm-spark status | logs [-f] | down | sync-model [--delete] | firewall  -i sparks.yaml
    vllm-spark recipes                            # the presets and their vllm serve flags
    vllm-spark watchdog  -i sparks.yaml --stall-seconds 120 [--restart]
    vllm-spark bench     -i sparks.yaml --concurrency 1,4,16   # PNG: tok/s/GPU vs tok/s/user
    vllm-spark nccl-probe -i sparks.yaml          # RDMA or sockets, bus bandwidth

Options after ``--`` go to vLLM unchanged (``-- --max-model-len 32768``).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from vllm_spark import cluster, preflight, remote, serve
from vllm_spark.inventory import InventoryError, load_inventory


def _preflight(args, inv) -> int:
    ports = None if args.stage == "up" else [inv.serve_port]
    # at the serve stage a Ray cluster should be up: every node's token must match the head's
    report = preflight.run_preflight(inv, ports=ports, full_hash=args.full_hash,
                                     tokens=args.stage == "serve")
    for line in report.lines():
        print(line)
    print("preflight: OK" if report.ok else "preflight: FAILED")
    return 0 if report.ok else 1


def _up(args, inv) -> int:
    cluster.up(inv, nccl_debug=args.nccl_debug, timeout=args.timeout)
    return 0


def _plan(args, inv) -> serve.ServePlan:
    """The serve plan from the flags, on top of ``--recipe`` (flags and ``--`` args win)."""
    tp, pp, mode, extra = 1, 1, "ray", []
    if args.recipe:
        from vllm_spark.recipe import load_recipe

        r = load_recipe(args.recipe)
        tp, pp, mode, extra = r.tensor_parallel, r.pipeline_parallel, r.mode, r.serve_flags()
        for node in inv.nodes:
            node.env = {**r.env, **node.env}
        if len(inv.nodes) < r.nodes:
            print(f"vllm-spark: note: recipe {r.name} is sized for {r.nodes} nodes, the "
                  f"inventory has {len(inv.nodes)}")
    return serve.ServePlan(model=args.model, tensor_parallel=args.tp or tp,
                           pipeline_parallel=args.pp or pp, data_parallel=args.dp,
                           served_model_name=args.served_model_name, mode=args.mode or mode,
                           api_key=not args.no_api_key, extra=extra + args.vllm_args)


def _serve(args, inv) -> int:
    if args.model:
        for node in inv.nodes:
            node.model = args.model
    plan = _plan(args, inv)
    plan.model = inv.head.model
    if args.via_job:
        if plan.mode != "ray":
            print("vllm-spark: --via-job submits to Ray; it needs --mode ray", file=sys.stderr)
            return 2
        serve.submit_job(inv, plan, nccl_debug=args.nccl_debug, timeout=args.timeout)
        return 0
    serve.record_serve_argv(inv, args.argv)
    if plan.mode == "ray" and not args.no_up:
        cluster.up(inv, nccl_debug=args.nccl_debug)
    serve.start_server(inv, plan, nccl_debug=args.nccl_debug, timeout=args.timeout)
    print(f"follow the log: vllm-spark logs -f -i {inv.path}; stop: vllm-spark down -i {inv.path}")
    return 0


def _watchdog(args, inv) -> int:
    from pathlib import Path

    from vllm_spark import watchdog

    url = _server_url(args, inv)
    restart = None
    if args.restart:
        saved = serve.last_serve_argv(inv)
        if saved is None:
            print("vllm-spark: --restart needs a server started by `vllm-spark serve` "
                  "(none recorded on the head)", file=sys.stderr)
            return 2

        def restart():
            cluster.down(inv)
            main(saved)

    print(f"watchdog: watching {url}/metrics every {args.interval:g} s; a stall is "
          f"{args.stall_seconds:g} s without a token while requests run")
    stalls = watchdog.watch(inv, url, stall_seconds=args.stall_seconds, interval=args.interval,
                            out_dir=Path(args.out), restart=restart,
                            max_restarts=args.max_restarts if args.restart else 0)
    return 1 if stalls else 0


def _server_url(args, inv) -> str:
    if args.url:
        return args.url
    report = preflight.run_preflight(inv, ports=[], model_check=False)
    if inv.head.name not in report.facts:
        raise preflight.PreflightFailed(report)
    return f"http://{inv.serve_host or report.facts[inv.head.name]['address']}:{inv.serve_port}"


def _bench(args, inv) -> int:
    from pathlib import Path

    from vllm_spark import bench

    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        print(f"vllm-spark: --concurrency takes numbers like 1,4,16, got {args.concurrency!r}",
              file=sys.stderr)
        return 2
    bench.run_bench(inv, _server_url(args, inv), levels, out_dir=Path(args.out),
                    gpus=args.gpus or sum(n.num_gpus for n in inv.nodes),
                    prompts_per_level=args.prompts_per_level, input_len=args.input_len,
                    output_len=args.output_len, model=args.model,
                    api_key=not args.no_api_key)
    return 0


def _status(args, inv) -> int:
    cluster.status(inv)
    return 0


def _logs(args, inv) -> int:
    node = inv.node(args.node) if args.node else inv.head
    remote.prepare_state_dir(node)
    log = shlex.quote(f"{node.state_dir}/{args.which}.log")
    cmd = f"tail -n {int(args.lines)} {'-F' if args.follow else ''} {log}"
    proc = remote.popen(node, cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return 0


def _down(args, inv) -> int:
    return 0 if cluster.down(inv) else 1


def _nccl_probe(args, inv) -> int:
    res = cluster.nccl_probe(inv, mb=args.mb, iters=args.iters)
    return 1 if res["transport"] == "socket" else 0


def _firewall(args, inv) -> int:
    from vllm_spark import firewall

    report = preflight.run_preflight(inv, ports=[], model_check=False)
    if not report.ok:
        raise preflight.PreflightFailed(report)
    if args.apply:
        return 0 if firewall.apply(inv, report.facts) else 1
    for node in inv.nodes:
        print(f"# {node.name}: vllm-spark firewall -i {inv.path} --apply loads this there")
        print(firewall.node_rules(inv, node, report.facts))
    return 0


def _sync_model(args, inv) -> int:
    from vllm_spark.sync import sync_model

    sync_model(inv, source=args.source, delete=args.delete)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-spark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("-i", "--inventory", required=True, help="hosts file (.yaml/.toml/.json)")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("preflight", _preflight, "check every node; one line per problem")
    sp.add_argument("--full-hash", action="store_true", help="hash every model file")
    sp.add_argument("--stage", choices=["up", "serve"], default="up",
                    help="up: Ray and serve ports must be free; serve: only the serve port")
    sp = add("up", _up, "start the Ray head and workers over SSH")
    sp.add_argument("--nccl-debug", action="store_true", help="NCCL_DEBUG=INFO on every node")
    sp.add_argument("--timeout", type=float, default=120)
    sp = add("serve", _serve, "start vllm serve across the cluster (--mode ray or native)")
    sp.add_argument("--model", help="model directory (default: the inventory's)")
    sp.add_argument("--recipe", help="a preset from `vllm-spark recipes` (or a YAML path)")
    sp.add_argument("--tp", type=int, help="tensor-parallel size (default 1, or the recipe's)")
    sp.add_argument("--pp", type=int, help="pipeline-parallel size (default 1, or the recipe's)")
    sp.add_argument("--dp", type=int, default=1, help="data-parallel size (Ray DP backend)")
    sp.add_argument("--served-model-name")
    sp.add_argument("--mode", choices=serve.MODES,
                    help="ray: Ray cluster + Ray executor (default); native: vLLM's own "
                    "multi-node (--nnodes/--node-rank/--master-addr, headless workers), no Ray")
    sp.add_argument("--no-api-key", action="store_true",
                    help="serve without an API key (default: a fresh key, printed once)")
    sp.add_argument("--no-up", action="store_true", help="the Ray cluster is already up")
    sp.add_argument("--via-job", action="store_true",
                    help="submit as a Ray job to the running cluster (`ray job submit`)")
    sp.add_argument("--nccl-debug", action="store_true",
                    help="NCCL_DEBUG=INFO and report NET/IB vs NET/Socket from the log")
    sp.add_argument("--timeout", type=float, default=1800, help="seconds to wait for /health")
    sp.add_argument("vllm_args", nargs=argparse.REMAINDER,
                    help="after --: arguments for vLLM unchanged")
    sub.add_parser("recipes", help="list the serve presets (--recipe NAME) and their flags")
    sp = add("watchdog", _watchdog, "stop-the-world detector: requests in flight and no token "
             "for --stall-seconds -> every node's logs collected, the stalled node named")
    sp.add_argument("--stall-seconds", type=float, default=120)
    sp.add_argument("--interval", type=float, default=5, help="seconds between /metrics reads")
    sp.add_argument("--url", help="server base URL (default: the head's serve address)")
    sp.add_argument("--out", default=".", help="where the stall-<time> log dirs go")
    sp.add_argument("--restart", action="store_true",
                    help="after a stall: `down`, then the last `serve` again")
    sp.add_argument("--max-restarts", type=int, default=3)
    sp = add("bench", _bench, "vllm bench serve at several concurrencies; PNG of tokens/s "
             "per GPU vs tokens/s per user")
    sp.add_argument("--concurrency", default="1,2,4,8,16,32", help="comma-separated levels")
    sp.add_argument("--prompts-per-level", type=int, default=8,
                    help="prompts per run = this x the concurrency")
    sp.add_argument("--input-len", type=int, default=1024)
    sp.add_argument("--output-len", type=int, default=256)
    sp.add_argument("--gpus", type=int, help="GPUs serving (default: the inventory's num_gpus)")
    sp.add_argument("--model", help="served model name (default: the server's first)")
    sp.add_argument("--url", help="server base URL (default: the head's serve address)")
    sp.add_argument("--no-api-key", action="store_true", help="the server has no API key")
    sp.add_argument("--out", default="vllm-spark-bench", help="directory for JSON and PNG")
    add("status", _status, "Ray nodes alive, by host")
    sp = add("logs", _logs, "print (or follow) the server log on the head")
    sp.add_argument("-f", "--follow", action="store_true")
    sp.add_argument("--node", help="another host's log (default: the head)")
    sp.add_argument("--which", choices=["serve", "ray"], default="serve",
                    help="the vllm serve log or the `ray start` log")
    sp.add_argument("-n", "--lines", type=int, default=100)
    add("down", _down, "stop the server and Ray on every node")
    sp = add("nccl-probe", _nccl_probe, "a short all-reduce across the nodes: RDMA or "
             "sockets, and its bus bandwidth")
    sp.add_argument("--mb", type=float, default=256, help="MiB per all-reduce")
    sp.add_argument("--iters", type=int, default=20)
    sp = add("firewall", _firewall, "nftables rules keeping Ray's ports (which listen on "
             "every interface) on the cluster network; print, or --apply on every node")
    sp.add_argument("--apply", action="store_true", help="load the rules with `nft -f -`")
    sp = add("sync-model", _sync_model, "copy the model to nodes missing it (rsync over the "
             "cluster network)")
    sp.add_argument("--source", help="node that has the model (default: the head)")
    sp.add_argument("--delete", action="store_true",
                    help="also delete files on the targets that the source lacks")
    return p


def _recipes() -> int:
    from vllm_spark.recipe import load_recipe, recipe_paths

    for path in recipe_paths():
        r = load_recipe(path.stem)
        print(f"{r.name:32s} {r.nodes} nodes, TP {r.tensor_parallel}: {r.description}")
        print(f"{'':32s} model {r.model}; flags: {' '.join(r.serve_flags())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.command == "recipes":
        return _recipes()
    if getattr(args, "vllm_args", None) and args.vllm_args[0] == "--":
        args.vllm_args = args.vllm_args[1:]
    try:
        inv = load_inventory(args.inventory)
        return args.fn(args, inv)
    except (InventoryError, remote.NodeError, ValueError) as e:
        print(f"vllm-spark: {e}", file=sys.stderr)
        return 1
    except preflight.PreflightFailed as e:
        print("\n".join(e.report.lines()), file=sys.stderr)
        print("preflight: FAILED (nothing was started)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

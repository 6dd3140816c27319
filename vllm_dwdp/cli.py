"""``vllm-dwdp`` command line.

- ``serve MODEL [options] [vLLM options]``: one DWDP engine per GPU behind one OpenAI endpoint
  (options this command does not know go to every ``vllm serve`` it starts).
- ``plan --model CONFIG.json --gpus N``: predicted pull time, break-even tokens per step and
  speedup over DP+EP (see ``vllm_dwdp/planner.py`` for the model).
- ``settings``: every plugin key with its environment variable, default and meaning.
"""

from __future__ import annotations

import argparse
import sys


def _settings(args) -> int:
    from vllm_moe_core.config import DwdpConfig, FlexTensorConfig, describe_settings

    print(describe_settings(DwdpConfig, args.markdown))
    print()
    print(describe_settings(FlexTensorConfig, args.markdown))
    return 0


def _serve(args, extra: list[str]) -> int:
    from vllm_dwdp.launcher import RouterError, launch, plan_from_args

    plan = plan_from_args(args, extra)
    try:
        return launch(plan, args.host, args.port, args.startup_timeout)
    except RouterError as e:
        raise SystemExit(f"vllm-dwdp serve: {e}") from None


def _plan(args) -> int:
    from vllm_dwdp.planner import KernelRatesError, plan_report

    try:
        report = plan_report(args.model, args.gpus, isl=args.isl, load_cv=args.load_cv,
                             replication=args.replication, weight_bytes=args.weight_bytes,
                             link_gbs=args.link_gbs, gemm_tflops=args.gemm_tflops,
                             kernel_rates=args.kernel_rates)
    except KernelRatesError as e:
        raise SystemExit(f"vllm-dwdp plan --kernel-rates: {e}") from None
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vllm_dwdp.launcher import add_serve_args

    parser = argparse.ArgumentParser(prog="vllm-dwdp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    settings = sub.add_parser("settings", help="list every plugin setting")
    settings.add_argument("--markdown", action="store_true", help="as Markdown tables (README)")
    settings.set_defaults(func=_settings)
    from vllm_dwdp import planner

    plan = sub.add_parser("plan", help="predict whether DWDP pays off")
    plan.add_argument("--model", required=True, help="the model's config.json")
    plan.add_argument("--gpus", type=int, required=True)
    plan.add_argument("--isl", type=int, default=8192, help="prompt length (attention cost)")
    plan.add_argument("--load-cv", type=float, default=0.0, help="per-rank load spread")
    plan.add_argument("--replication", type=float, default=0.0)
    plan.add_argument("--weight-bytes", type=float, default=2.0, help="2 bf16, ~1.03 fp8")
    plan.add_argument("--link-gbs", type=float, default=planner.DEFAULT_LINK_GBS)
    plan.add_argument("--gemm-tflops", type=float, default=planner.DEFAULT_GEMM_TFLOPS)
    plan.add_argument("--kernel-rates", metavar="JSON", default=None,
                      help="MoE kernel rates measured by benchmarks/moe_kernel_rate.py: expert "
                           "GEMMs at the rate of the nearest step size (bf16 rows for "
                           "--weight-bytes >= 1.5, else fp8) instead of --gemm-tflops")
    plan.set_defaults(func=_plan)
    serve = sub.add_parser("serve", help="serve a model with DWDP, one engine per GPU")
    add_serve_args(serve)
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if args.command == "serve":
        return args.func(args, extra)
    if extra:
        raise SystemExit(f"vllm-dwdp {args.command}: unknown arguments {extra}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

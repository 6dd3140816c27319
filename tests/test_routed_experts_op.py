"""The plugins' routed-experts compute stays outside torch.compile's trace: a compiled graph
calls it every step with that step's real shapes and state (a trace would freeze both)."""

import torch

from vllm_dwdp import vllm_compat


class Layer:
    pass


def test_compiled_graph_calls_the_stateful_compute_every_step():
    calls = []

    def compute(x, topk_weights, topk_ids):
        calls.append(x.shape[0])
        # A Python decision on the step's size, as the plugins make (tiles, whole layers).
        return x * 2 if x.shape[0] >= 4 else x * 3

    layer = Layer()
    vllm_compat.make_routed_experts_opaque(layer, compute)
    step = torch.compile(
        lambda x: vllm_compat.routed_experts_outside_compile(
            layer, x, x, x.long()) + 1, fullgraph=True, dynamic=True)
    big, small = torch.ones(5, 4), torch.ones(2, 4)
    assert torch.equal(step(big), big * 2 + 1)
    assert torch.equal(step(small), small * 3 + 1)
    assert torch.equal(step(big), big * 2 + 1)
    assert calls == [5, 2, 5]


def test_eager_calls_go_straight_to_the_compute():
    layer = Layer()
    vllm_compat.make_routed_experts_opaque(layer, lambda x, w, i: x - 1)
    x = torch.zeros(3, 2)
    assert torch.equal(vllm_compat.routed_experts_outside_compile(layer, x, x, x.long()), x - 1)

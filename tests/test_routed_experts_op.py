"""The plugins' routed-experts compute stays outside torch.compile's trace: a compiled graph
calls it every step with that step's real shapes and state (a trace would freeze both)."""

import torch

from vllm_moe_core import vllm_compat


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
    graphs = []

    def record(gm, example_inputs):  # a torch.compile backend that keeps what it was given
        graphs.append(gm)
        return gm.forward

    step = torch.compile(
        lambda x: vllm_compat.routed_experts_outside_compile(
            layer, x, x, x.long()) + 1, backend=record, fullgraph=True, dynamic=True)
    big, small = torch.ones(5, 4), torch.ones(2, 4)
    assert torch.equal(step(big), big * 2 + 1)
    assert torch.equal(step(small), small * 3 + 1)
    assert torch.equal(step(big), big * 2 + 1)
    assert calls == [5, 2, 5]
    # One graph for every size, holding the opaque op and none of the compute's own ops:
    # the size decision is made at run time, not frozen into the trace.
    assert len(graphs) == 1
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert "vllm_moe_core.routed_experts" in targets
    assert not any("mul" in t for t in targets), targets


def test_eager_calls_go_straight_to_the_compute():
    layer = Layer()
    vllm_compat.make_routed_experts_opaque(layer, lambda x, w, i: x - 1)
    x = torch.zeros(3, 2)
    assert torch.equal(vllm_compat.routed_experts_outside_compile(layer, x, x, x.long()), x - 1)

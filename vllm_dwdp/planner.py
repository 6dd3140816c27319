"""``vllm-dwdp plan``: will DWDP pay off for this model, GPU count and step size?

A roofline per MoE layer, for one rank running T tokens in a step:

- DWDP pulls the experts it does not store: ``B_pull = (E - E/N)(1 - r) * 3*H*I*b`` bytes
  over its GPU's link (``link_gbs``), on a side stream, while the layer computes:
  ``t_dwdp = max(t_compute(T), B_pull / link)``; no collective, so each rank runs at its own
  pace (``t_compute`` of its own tokens).
- DP + EP keeps all experts resident but moves every token's hidden state to and from the
  ranks owning its experts (dispatch + combine, ``2*K*H*b_act`` bytes a token, the remote
  share ``(N-1)/N``) and runs in lock-step: each step lasts as long as the most loaded rank.
  With per-rank load spread ``cv`` (coefficient of variation), the expected maximum of N
  ranks is ``1 + cv * k_N`` times the mean (``k_N``: expected maximum of N standard normals).

``t_compute(T) = T * flops_per_token / gemm_rate``, counting the expert GEMMs (``2*K*3*H*I``)
and the attention projections and scores of the layer (prefill, average context ISL/2).
Rates default to what ``benchmarks/`` measured on H200 (see benchmarks/NOTES.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

# Expected maximum of N independent standard normal variables.
_EXPECTED_MAX_NORMAL = {1: 0.0, 2: 0.5642, 3: 0.8463, 4: 1.0294, 6: 1.2672, 8: 1.4236}

DEFAULT_LINK_GBS = 389.0     # benchmarks/results/dwdp_pull_bandwidth_h200.json (pull_gbs_alone)
DEFAULT_GEMM_TFLOPS = 690.0  # same file, gemm_tflops_alone (bf16, 16K x 2048 x 8192)


@dataclass(frozen=True)
class MoeShape:
    hidden: int
    moe_intermediate: int
    experts: int
    top_k: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, cfg: dict) -> MoeShape:
        def get(*names, default=None):
            for n in names:
                if n in cfg:
                    return cfg[n]
            if default is None:
                raise ValueError(f"model config has none of {names}: is it a MoE model?")
            return default

        heads = get("num_attention_heads")
        return cls(hidden=get("hidden_size"),
                   moe_intermediate=get("moe_intermediate_size", "intermediate_size"),
                   experts=get("num_experts", "num_local_experts", "n_routed_experts"),
                   top_k=get("num_experts_per_tok", "moe_topk"),
                   layers=get("num_hidden_layers"), heads=heads,
                   kv_heads=get("num_key_value_heads", default=heads),
                   head_dim=get("head_dim", default=get("hidden_size") // heads))

    def expert_bytes(self, weight_bytes: float) -> float:
        return 3 * self.hidden * self.moe_intermediate * weight_bytes

    def flops_per_token(self, context: float) -> float:
        experts = 2 * self.top_k * 3 * self.hidden * self.moe_intermediate
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        proj = 2 * (self.hidden * (q + 2 * kv) + q * self.hidden)
        scores = 2 * 2 * context * q
        return experts + proj + scores


@dataclass(frozen=True)
class Prediction:
    tokens_per_step: int
    t_compute_ms: float
    t_pull_ms: float
    t_a2a_ms: float
    dwdp_layer_ms: float
    dep_layer_ms: float

    @property
    def speedup_vs_dep(self) -> float:
        return self.dep_layer_ms / self.dwdp_layer_ms


def expected_max_factor(num_ranks: int, cv: float) -> float:
    k = _EXPECTED_MAX_NORMAL.get(num_ranks)
    if k is None:  # Blom's approximation for other N
        from statistics import NormalDist

        k = NormalDist().inv_cdf((num_ranks - 0.375) / (num_ranks + 0.25))
    return 1.0 + cv * k


def predict(shape: MoeShape, num_ranks: int, tokens_per_step: int, *, isl: int = 8192,
            load_cv: float = 0.0, replication: float = 0.0, weight_bytes: float = 2.0,
            act_bytes: float = 2.0, link_gbs: float = DEFAULT_LINK_GBS,
            gemm_tflops: float = DEFAULT_GEMM_TFLOPS) -> Prediction:
    remote = (shape.experts - shape.experts / num_ranks) * (1 - replication)
    t_pull = remote * shape.expert_bytes(weight_bytes) / (link_gbs * 1e9)
    t_compute = tokens_per_step * shape.flops_per_token(isl / 2) / (gemm_tflops * 1e12)
    a2a_bytes = tokens_per_step * 2 * shape.top_k * shape.hidden * act_bytes * (num_ranks - 1) / num_ranks
    t_a2a = a2a_bytes / (link_gbs * 1e9)
    dwdp = max(t_compute, t_pull)
    dep = expected_max_factor(num_ranks, load_cv) * (t_compute + t_a2a)
    return Prediction(tokens_per_step, t_compute * 1e3, t_pull * 1e3, t_a2a * 1e3, dwdp * 1e3,
                      dep * 1e3)


def break_even_tokens(shape: MoeShape, num_ranks: int, **kw) -> int:
    """Smallest tokens per step at which the pull hides behind the layer's compute."""
    one = predict(shape, num_ranks, 1, **kw)
    return math.ceil(one.t_pull_ms / one.t_compute_ms)


def plan_report(config_path: str, num_ranks: int, *, isl: int, load_cv: float,
                replication: float, weight_bytes: float, link_gbs: float,
                gemm_tflops: float, steps=(1024, 2048, 4096, 8192, 16384, 32768)) -> str:
    with open(config_path) as f:
        shape = MoeShape.from_config(json.load(f))
    kw = dict(isl=isl, load_cv=load_cv, replication=replication, weight_bytes=weight_bytes,
              link_gbs=link_gbs, gemm_tflops=gemm_tflops)
    lines = [
        f"model: {shape.experts} experts x {shape.layers} MoE layers, top-{shape.top_k}, "
        f"hidden {shape.hidden}, expert intermediate {shape.moe_intermediate}",
        f"ranks: {num_ranks}; link {link_gbs:.0f} GB/s; GEMM {gemm_tflops:.0f} TFLOP/s; "
        f"ISL {isl}; load cv {load_cv}; replication {replication}",
        f"pulled per layer: {predict(shape, num_ranks, 1, **kw).t_pull_ms * link_gbs / 1e3:.3f} GB"
        f" -> {predict(shape, num_ranks, 1, **kw).t_pull_ms:.2f} ms",
        f"break-even: DWDP hides its pulls from {break_even_tokens(shape, num_ranks, **kw)} "
        f"tokens per step per rank",
        "",
        f"{'tokens/step':>12} {'compute ms':>11} {'pull ms':>8} {'a2a ms':>7} "
        f"{'DWDP ms':>8} {'DP+EP ms':>9} {'speedup':>8}",
    ]
    for t in steps:
        p = predict(shape, num_ranks, t, **kw)
        lines.append(f"{t:>12} {p.t_compute_ms:>11.2f} {p.t_pull_ms:>8.2f} {p.t_a2a_ms:>7.2f} "
                     f"{p.dwdp_layer_ms:>8.2f} {p.dep_layer_ms:>9.2f} {p.speedup_vs_dep:>7.2f}x")
    return "\n".join(lines)

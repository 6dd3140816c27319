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

With measured MoE kernel rates (``--kernel-rates``, the JSON of
``benchmarks/moe_kernel_rate.py``) the expert GEMMs run at the rate measured at the nearest
step size (in log scale) for this shape and weight format, instead of ``gemm_rate``: DWDP's
at our split-weight kernel's (``ours_split``, else ``ours_local``), DP+EP's at vLLM's fused
MoE kernel's (``vllm``, else the same as DWDP's); the attention GEMMs keep ``gemm_rate``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

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

    def expert_flops_per_token(self) -> float:
        return 2 * self.top_k * 3 * self.hidden * self.moe_intermediate


KERNEL_RATES_BENCHMARK = "moe_kernel_rate"  # the "benchmark" key of its JSON
DWDP_IMPLS = ("ours_split", "ours_local")   # our kernel: experts split over two tensors, or not
DEP_IMPLS = ("vllm",)                        # vLLM's fused MoE kernel (DP+EP)


class KernelRatesError(ValueError):
    pass


@dataclass(frozen=True)
class KernelRates:
    """Measured MoE kernel TFLOP/s for one expert shape and weight format, by tokens per step.

    ``rates`` maps an implementation (``ours_split``, ``ours_local``, ``vllm``) to
    ``((tokens, tflops), ...)`` sorted by tokens.
    """

    rates: dict = field(default_factory=dict)
    dtype: str = "bf16"
    gpu: str = "?"
    source: str = "?"

    def impl_for(self, side: str) -> str | None:
        """Which measured implementation stands for ``side`` ("dwdp" or "dep")."""
        order = DWDP_IMPLS if side == "dwdp" else DEP_IMPLS + DWDP_IMPLS
        return next((impl for impl in order if self.rates.get(impl)), None)

    def tflops(self, side: str, tokens: int) -> float:
        """Rate measured at the step size nearest to ``tokens`` (log scale; ties: smaller)."""
        impl = self.impl_for(side)
        if impl is None:
            raise KernelRatesError(f"{self.source}: no measured rate for {side}")
        points = self.rates[impl]
        _, rate = min(points, key=lambda p: (abs(math.log(p[0]) - math.log(max(tokens, 1))), p[0]))
        return rate


def kernel_dtype(weight_bytes: float) -> str:
    """Weight format of the measured rows that ``weight_bytes`` (per weight) stands for."""
    return "bf16" if weight_bytes >= 1.5 else "fp8"


def load_kernel_rates(path: str, shape: MoeShape, dtype: str) -> KernelRates:
    """The rows of a ``benchmarks/moe_kernel_rate.py`` JSON that match this expert shape
    (hidden, expert intermediate, experts, top-k) and weight format; failed rows are skipped."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("benchmark") != KERNEL_RATES_BENCHMARK:
        raise KernelRatesError(f"{path} is not a JSON written by benchmarks/moe_kernel_rate.py "
                               f"(its 'benchmark' key must be {KERNEL_RATES_BENCHMARK!r})")
    want = (shape.hidden, shape.moe_intermediate, shape.experts, shape.top_k)
    rates: dict = {}
    seen = set()
    for row in data.get("rows", []):
        key = (row.get("hidden"), row.get("inter"), row.get("experts"), row.get("top_k"))
        seen.add(key + (row.get("dtype"),))
        tflops = row.get("tflops")
        if key != want or row.get("dtype") != dtype or row.get("error") or not tflops:
            continue
        rates.setdefault(row["impl"], []).append((int(row["tokens"]), float(tflops)))
    rates = {impl: tuple(sorted(points)) for impl, points in rates.items()}
    if not any(rates.get(impl) for impl in DWDP_IMPLS):
        have = ", ".join(f"H={h} I={i} E={e} K={k} {d}" for h, i, e, k, d in sorted(
            seen, key=str)) or "no rows"
        raise KernelRatesError(
            f"{path} has no measured rate of our kernel for H={want[0]} I={want[1]} "
            f"E={want[2]} K={want[3]} {dtype} (it has: {have})")
    return KernelRates(rates, dtype, str(data.get("gpu", "?")), path)


@dataclass(frozen=True)
class Prediction:
    tokens_per_step: int
    t_compute_ms: float
    t_pull_ms: float
    t_a2a_ms: float
    dwdp_layer_ms: float
    dep_layer_ms: float
    t_compute_dep_ms: float | None = None  # DP+EP's compute (differs with measured kernel rates)

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
            gemm_tflops: float = DEFAULT_GEMM_TFLOPS,
            kernel_rates: KernelRates | None = None) -> Prediction:
    remote = (shape.experts - shape.experts / num_ranks) * (1 - replication)
    t_pull = remote * shape.expert_bytes(weight_bytes) / (link_gbs * 1e9)
    flops = tokens_per_step * shape.flops_per_token(isl / 2)
    if kernel_rates is None:
        t_compute = t_compute_dep = flops / (gemm_tflops * 1e12)
    else:
        moe = tokens_per_step * shape.expert_flops_per_token()
        t_other = (flops - moe) / (gemm_tflops * 1e12)
        t_compute = t_other + moe / (kernel_rates.tflops("dwdp", tokens_per_step) * 1e12)
        t_compute_dep = t_other + moe / (kernel_rates.tflops("dep", tokens_per_step) * 1e12)
    a2a_bytes = tokens_per_step * 2 * shape.top_k * shape.hidden * act_bytes * (num_ranks - 1) / num_ranks
    t_a2a = a2a_bytes / (link_gbs * 1e9)
    dwdp = max(t_compute, t_pull)
    dep = expected_max_factor(num_ranks, load_cv) * (t_compute_dep + t_a2a)
    return Prediction(tokens_per_step, t_compute * 1e3, t_pull * 1e3, t_a2a * 1e3, dwdp * 1e3,
                      dep * 1e3, t_compute_dep * 1e3)


def break_even_tokens(shape: MoeShape, num_ranks: int, **kw) -> int:
    """Smallest tokens per step at which the pull hides behind the layer's compute."""
    one = predict(shape, num_ranks, 1, **kw)
    if kw.get("kernel_rates") is None:  # compute is linear in tokens
        return math.ceil(one.t_pull_ms / one.t_compute_ms)

    # Measured rates vary with the step: double, then bisect to where the pull starts to
    # hide (the rate steps at measured sizes, so compute need not grow monotonically).
    def hidden(t: int) -> bool:
        p = predict(shape, num_ranks, t, **kw)
        return p.t_compute_ms >= p.t_pull_ms

    hi = 1
    while not hidden(hi):
        if hi > 1 << 40:
            raise KernelRatesError("the pull never hides behind the measured compute")
        hi *= 2
    lo = hi // 2  # not hidden (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hidden(mid) else (mid, hi)
    return hi


def plan_report(config_path: str, num_ranks: int, *, isl: int, load_cv: float,
                replication: float, weight_bytes: float, link_gbs: float,
                gemm_tflops: float, steps=(1024, 2048, 4096, 8192, 16384, 32768),
                kernel_rates: str | None = None) -> str:
    """The ``vllm-dwdp plan`` table; ``kernel_rates``: a ``moe_kernel_rate.py`` JSON path."""
    with open(config_path) as f:
        shape = MoeShape.from_config(json.load(f))
    rates = None
    if kernel_rates is not None:
        rates = load_kernel_rates(kernel_rates, shape, kernel_dtype(weight_bytes))
    kw = dict(isl=isl, load_cv=load_cv, replication=replication, weight_bytes=weight_bytes,
              link_gbs=link_gbs, gemm_tflops=gemm_tflops, kernel_rates=rates)
    lines = [
        f"model: {shape.experts} experts x {shape.layers} MoE layers, top-{shape.top_k}, "
        f"hidden {shape.hidden}, expert intermediate {shape.moe_intermediate}",
        f"ranks: {num_ranks}; link {link_gbs:.0f} GB/s; GEMM {gemm_tflops:.0f} TFLOP/s; "
        f"ISL {isl}; load cv {load_cv}; replication {replication}",
    ]
    if rates is not None:
        dep_impl = rates.impl_for("dep")
        lines.append(
            f"expert GEMMs at measured {rates.dtype} kernel rates ({rates.source}, {rates.gpu}): "
            f"DWDP {rates.impl_for('dwdp')}, DP+EP {dep_impl}"
            + ("" if dep_impl in DEP_IMPLS else " (no vLLM rows: DP+EP at our kernel's rate)")
            + f"; attention GEMMs at {gemm_tflops:.0f} TFLOP/s")
    lines += [
        f"pulled per layer: {predict(shape, num_ranks, 1, **kw).t_pull_ms * link_gbs / 1e3:.3f} GB"
        f" -> {predict(shape, num_ranks, 1, **kw).t_pull_ms:.2f} ms",
        f"break-even: DWDP hides its pulls from {break_even_tokens(shape, num_ranks, **kw)} "
        f"tokens per step per rank",
        "",
        f"{'tokens/step':>12} {'compute ms':>11} {'pull ms':>8} {'a2a ms':>7} "
        f"{'DWDP ms':>8} {'DP+EP ms':>9} {'speedup':>8}"
        + ("" if rates is None
           else f" {'DP+EP compute ms':>16} {'ours TF/s':>9} {'DP+EP TF/s':>10}"),
    ]
    for t in steps:
        p = predict(shape, num_ranks, t, **kw)
        line = (f"{t:>12} {p.t_compute_ms:>11.2f} {p.t_pull_ms:>8.2f} {p.t_a2a_ms:>7.2f} "
                f"{p.dwdp_layer_ms:>8.2f} {p.dep_layer_ms:>9.2f} {p.speedup_vs_dep:>7.2f}x")
        if rates is not None:
            line += (f" {p.t_compute_dep_ms:>16.2f} {rates.tflops('dwdp', t):>9.0f} "
                     f"{rates.tflops('dep', t):>10.0f}")
        lines.append(line)
    return "\n".join(lines)

"""Split-weight MoE: the routed experts of one layer, read from two weight tensors.

DWDP keeps a rank's own experts in place (``w13_local``/``w2_local``) and pulls the others
into a receive buffer (``w13_recv``/``w2_recv``). One ``slot_of_expert`` table says where
each global expert lives: slots ``0 .. E_local-1`` index the local tensors, slots
``E_local .. E_local+E_recv-1`` the receive buffer. Nothing is copied to join them.

For every token t with routed experts e_k and weights g_k (k < top_k)::

    out[t] = sum_k g_k * W2[e_k] @ (silu(W1_gate[e_k] @ x[t]) * (W1_up[e_k] @ x[t]))

with ``W13[e] = [W1_gate; W1_up]`` stacked along dim 0, as vLLM stores ``w13_weight``.

Shapes: x [T, H]; topk_weights [T, K] (float); topk_ids [T, K] (int, global ids);
w13_* [E_*, 2I, H]; w2_* [E_*, H, I]; slot_of_expert [E] (int32). Output [T, H], x.dtype.

FP8 experts (block-scaled, as DeepSeek-V3 / Qwen3-FP8 checkpoints store them and vLLM's
``Fp8MoEMethod`` loads them): the weights are ``float8_e4m3fn`` and :class:`BlockScales` holds
their ``weight_scale_inv`` tensors, one float32 scale per [block_n x block_k] tile
(dequantised weight = fp8 value x scale). Activations are quantised the way vLLM does it
for this format: per token, per group of ``block_k`` consecutive channels, dynamically
(scale = max|a| / 448), both before the gate/up GEMM and before the down GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

FP8_MAX = 448.0  # largest float8_e4m3fn value
FP8_EPS = 1e-10  # floor of a group's max |a|, as vLLM's per-token-group quantiser


@dataclass(frozen=True)
class BlockScales:
    """Block scales of FP8 experts: w13_* [E_*, 2I/bn, H/bk], w2_* [E_*, H/bn, I/bk] (float32)."""

    w13_local: torch.Tensor
    w2_local: torch.Tensor
    w13_recv: torch.Tensor
    w2_recv: torch.Tensor
    block_n: int = 128
    block_k: int = 128
    # Activation scales rounded up to powers of two (UE8M0), as vLLM quantises activations
    # when DeepGEMM's E8M0 format is on (vLLM 0.26+ on Hopper/Blackwell by default).
    ue8m0: bool = False


def _check(x, topk_weights, topk_ids, w13_local, w2_local, w13_recv, w2_recv, slot_of_expert):
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, hidden], got shape {tuple(x.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must "
            f"both be [tokens={x.shape[0]}, top_k]")
    for name, w13, w2 in (("local", w13_local, w2_local), ("recv", w13_recv, w2_recv)):
        if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0]:
            raise ValueError(f"w13_{name} [E, 2I, H] and w2_{name} [E, H, I] disagree: "
                             f"{tuple(w13.shape)} vs {tuple(w2.shape)}")
        if w13.shape[2] != x.shape[1] or w2.shape[1] != x.shape[1] or w13.shape[1] != 2 * w2.shape[2]:
            raise ValueError(f"w13_{name} {tuple(w13.shape)} / w2_{name} {tuple(w2.shape)} do not "
                             f"fit hidden size {x.shape[1]}")
    total = w13_local.shape[0] + w13_recv.shape[0]
    if slot_of_expert.dim() != 1:
        raise ValueError("slot_of_expert must be 1-D [num_experts]")
    return total


def _check_fp8(w13_local, w2_local, w13_recv, w2_recv, scales: BlockScales | None) -> bool:
    """True for block-scaled FP8 experts (scales given), after checking they fit."""
    fp8 = w13_local.dtype == torch.float8_e4m3fn
    if fp8 != (scales is not None):
        raise ValueError("FP8 expert weights need their block scales (scales=BlockScales(...)), "
                         "and block scales need FP8 weights; got weights of "
                         f"{w13_local.dtype} with scales {'given' if scales else 'missing'}")
    if not fp8:
        return False
    bn, bk = scales.block_n, scales.block_k
    for name, w, sc in (("w13_local", w13_local, scales.w13_local),
                        ("w2_local", w2_local, scales.w2_local),
                        ("w13_recv", w13_recv, scales.w13_recv), ("w2_recv", w2_recv, scales.w2_recv)):
        want = (w.shape[0], -(-w.shape[1] // bn), -(-w.shape[2] // bk))
        if w.dtype != torch.float8_e4m3fn or tuple(sc.shape) != want:
            raise ValueError(f"{name}: weights {w.dtype} {tuple(w.shape)} need float8_e4m3fn "
                             f"weights and scales of shape {want} for {bn}x{bk} blocks; got "
                             f"scales {tuple(sc.shape)}")
    return True


def quantize_groups_reference(a: torch.Tensor, group: int,
                              ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-``group``-channel dynamic FP8 quantisation: (fp8 values, float32 scales).

    scale = max(|a|) / 448 per group (``ue8m0``: rounded up to a power of two)."""
    M, K = a.shape
    pad = (-K) % group
    g = torch.nn.functional.pad(a.float(), (0, pad)).view(M, -1, group)
    scale = g.abs().amax(-1).clamp(min=FP8_EPS) / FP8_MAX
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (g / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(M, -1)[:, :K], scale


def quantize_blocks_reference(w: torch.Tensor, block_n: int = 128,
                              block_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 quantisation of a [..., N, K] weight, as block-FP8 checkpoints store it:
    (float8_e4m3fn weight, float32 ``weight_scale_inv`` [..., N/bn, K/bk])."""
    *lead, n, k = w.shape
    pn, pk = (-n) % block_n, (-k) % block_k
    t = torch.nn.functional.pad(w.float(), (0, pk, 0, pn))
    t = t.view(*lead, (n + pn) // block_n, block_n, (k + pk) // block_k, block_k)
    scale = t.abs().amax(dim=(-3, -1)).clamp(min=FP8_EPS) / FP8_MAX
    q = (t / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.view(*lead, n + pn, k + pk)[..., :n, :k].contiguous()
    return q, scale


def _dequantize_groups(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    return q.float() * scale.repeat_interleave(group, dim=1)[:, :q.shape[1]]


def dequantize_blocks_reference(w: torch.Tensor, scale: torch.Tensor, bn: int = 128,
                                bk: int = 128) -> torch.Tensor:
    """A [N, K] block-FP8 weight times its ``weight_scale_inv`` [N/bn, K/bk], in float32
    (undoes :func:`quantize_blocks_reference` up to FP8 rounding)."""
    n, k = w.shape
    return w.float() * scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]


def split_moe_reference(x, topk_weights, topk_ids, w13_local, w2_local, w13_recv, w2_recv,
                        slot_of_expert, scales: BlockScales | None = None) -> torch.Tensor:
    """Pure-torch split-weight MoE (float32 accumulation). Runs on any device."""
    _check(x, topk_weights, topk_ids, w13_local, w2_local, w13_recv, w2_recv, slot_of_expert)
    fp8 = _check_fp8(w13_local, w2_local, w13_recv, w2_recv, scales)
    T, H = x.shape
    e_local = w13_local.shape[0]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1).long()
    flat_w = topk_weights.reshape(-1).float()
    flat_tok = torch.arange(T, device=x.device).repeat_interleave(topk_ids.shape[1])
    slots = slot_of_expert.long()[flat_ids]
    order = torch.argsort(slots, stable=True)
    slots, flat_w, flat_tok = slots[order], flat_w[order], flat_tok[order]
    used, counts = torch.unique_consecutive(slots, return_counts=True)
    start = 0
    for slot, n in zip(used.tolist(), counts.tolist()):
        local = slot < e_local
        i = slot if local else slot - e_local
        w13, w2 = (w13_local[i], w2_local[i]) if local else (w13_recv[i], w2_recv[i])
        toks = flat_tok[start:start + n]
        a = x[toks].float()
        if fp8:
            s13, s2 = ((scales.w13_local[i], scales.w2_local[i]) if local
                       else (scales.w13_recv[i], scales.w2_recv[i]))
            a = _dequantize_groups(*quantize_groups_reference(a, scales.block_k, scales.ue8m0),
                                   scales.block_k)
            w13 = dequantize_blocks_reference(w13, s13, scales.block_n, scales.block_k)
            w2 = dequantize_blocks_reference(w2, s2, scales.block_n, scales.block_k)
        h = (a @ w13.float().t()).to(x.dtype).float()  # gate/up in x.dtype, as the kernel
        inter = h.shape[1] // 2
        # silu(gate) and silu(gate) * up each rounded to x.dtype, as vLLM's SiLU-and-mul
        silu = torch.nn.functional.silu(h[:, :inter]).to(x.dtype).float()
        act = (silu * h[:, inter:]).to(x.dtype).float()
        if fp8:
            act = _dequantize_groups(*quantize_groups_reference(act, scales.block_k,
                                                                scales.ue8m0),
                                     scales.block_k)
        y = (act @ w2.float().t()) * flat_w[start:start + n, None]
        out.index_add_(0, toks, y.to(x.dtype).float())  # per-pair results in x.dtype, as the kernel
        start += n
    return out.to(x.dtype)


def split_moe(x, topk_weights, topk_ids, w13_local, w2_local, w13_recv, w2_recv,
              slot_of_expert, scales: BlockScales | None = None, *,
              config: KernelConfig | None = None) -> torch.Tensor:
    """Split-weight MoE; the Triton kernel on CUDA, the reference elsewhere.

    ``config`` picks the Triton tiles (CUDA only); ``None`` lets :func:`pick_config` choose
    by problem size.
    """
    if not x.is_cuda:
        return split_moe_reference(x, topk_weights, topk_ids, w13_local, w2_local, w13_recv,
                                   w2_recv, slot_of_expert, scales)
    return _split_moe_triton(x, topk_weights, topk_ids, w13_local, w2_local, w13_recv, w2_recv,
                             slot_of_expert, scales, config=config)


@dataclass(frozen=True)
class KernelConfig:
    """Tiles and launch options of the two Triton kernels (gate/up+act and down).

    ``block_m`` rows of (token, k) pairs of one expert, ``block_n`` output columns and
    ``block_k`` reduction columns per step. For FP8 experts ``block_k`` is the weight scale
    block (one K tile = one scale column = one activation quantisation group) and
    ``block_n`` must divide the scale block; the launcher enforces both.
    """

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def as_dict(self) -> dict:
        return {"block_m": self.block_m, "block_n": self.block_n, "block_k": self.block_k,
                "num_warps": self.num_warps, "num_stages": self.num_stages}


def pick_config(tokens: int, top_k: int, num_experts: int, hidden: int, inter: int,
                fp8: bool) -> KernelConfig:
    """Tiles for one call, chosen from the problem size alone (pure: no device queries).

    What matters is ``m = tokens * top_k / num_experts``, the average rows an expert gets
    (``num_experts`` counts every slot, local and received). The kernel pads each expert's
    rows to ``block_m``, so with few rows per expert (decode, small prefill chunks) a
    64-row tile mostly multiplies padding and there are few programs to spread over the SMs:

    - ``m <= 1`` (decode): 16-row tiles and narrow N tiles (bf16 32 columns, FP8 64), so
      the few experts a step touches spread over more SMs; 4 warps, 4 stages;
    - ``m <= 16``: 16-row tiles, 64 columns, 4 warps;
    - ``m <= 48``: 64 x 64 tiles (bf16) or 64 x 128 (FP8), 4 warps;
    - otherwise bf16 128 x 128 tiles with 8 warps and 4 stages, FP8 64 x 128, 8 warps, 3.

    These are the best of :func:`candidate_configs` (or within 5% of it) at each step size
    in ``benchmarks/results/h100-2026-11-25-1152/moe_kernel_rate_sweep.json``
    (Qwen3-30B-A3B's experts on an H100;
    ``python benchmarks/moe_kernel_rate.py --sweep`` measures them again).
    ``block_k`` stays 64 for bf16/fp16/fp32 (every output element sums the same 64-wide K
    tiles in the same order whatever the step size) and is 128 for FP8 (the launcher uses
    the scales' own block; 128 for the usual 128x128 blocks; the gate/up kernel's N tile
    is then that block too, one quantisation group of the down GEMM's activations).
    ``hidden`` and ``inter`` are accepted so that a measured table can key on them later;
    the current rules do not use them.
    """
    del hidden, inter  # not used by the current rules
    block_k = 128 if fp8 else 64
    m = tokens * top_k / max(num_experts, 1)
    if m <= 1:
        return KernelConfig(16, 64 if fp8 else 32, block_k, num_warps=4, num_stages=4)
    if m <= 16:
        return KernelConfig(16, 64, block_k, num_warps=4, num_stages=3 if fp8 else 4)
    if m <= 48:
        return KernelConfig(64, 128 if fp8 else 64, block_k, num_warps=4,
                            num_stages=4 if fp8 else 3)
    if fp8:
        return KernelConfig(64, 128, block_k, num_warps=8, num_stages=3)
    return KernelConfig(128, 128, block_k, num_warps=8, num_stages=4)


def candidate_configs(fp8: bool) -> list[KernelConfig]:
    """Valid configs to time (``benchmarks/moe_kernel_rate.py --sweep``): every config
    :func:`pick_config` can return, then alternatives around them (smaller N tiles for
    more programs at few rows, larger M tiles and deeper pipelines for many rows)."""
    bk = 128 if fp8 else 64
    picks = [pick_config(tokens, 1, 1, 0, 0, fp8) for tokens in (1, 16, 48, 1 << 20)]
    extra = [KernelConfig(16, 32, bk, 4, 4), KernelConfig(16, 128, bk, 4, 3),
             KernelConfig(32, 128, bk, 4, 3), KernelConfig(64, 64, bk, 4, 3),
             KernelConfig(64, 128, bk, 4, 4), KernelConfig(128, 64, bk, 4, 4),
             KernelConfig(128, 128, bk, 8, 3), KernelConfig(128, 128, bk, 8, 4),
             KernelConfig(16, 64, bk, 4, 3 if not fp8 else 4)]
    if not fp8:  # other K steps (another accumulation order, within bf16 tolerance)
        extra += [KernelConfig(16, 64, 128, 4, 3), KernelConfig(64, 128, 32, 8, 4),
                  KernelConfig(128, 128, 32, 8, 4)]
    out: list[KernelConfig] = []
    for c in picks + extra:
        if c not in out:
            out.append(c)
    return out


def align_pairs_by_slot(topk_ids, slot_of_expert, num_slots: int, block_m: int):
    """Group (token, k) pairs by weight slot, padding each slot's run to ``block_m`` rows
    (pure torch: the reference of the Triton layout kernels, and the CPU path).

    Returns ``sorted_pair`` [max_blocks * block_m] (pair index t*K+k, or -1 for padding),
    ``block_slot`` [max_blocks] (slot of each row block, -1 past the end) and
    ``block_rows`` [max_blocks] (rows of the block that hold pairs). Pairs of a slot keep
    their order here; the Triton layout may place them in any order. Sizes are upper bounds
    known on the host, so nothing waits for the device.
    """
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    slots = slot_of_expert.long()[topk_ids.reshape(-1).long()]
    # Not torch.bincount: on CUDA it reads the largest value back to the host.
    counts = torch.zeros(num_slots, dtype=torch.long, device=device)
    counts.index_add_(0, slots, torch.ones_like(slots))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(slots, stable=True)
    sorted_slots = slots[order]
    first_of_slot = torch.cumsum(counts, 0) - counts
    dest = starts[sorted_slots] + torch.arange(num_pairs, device=device) - first_of_slot[sorted_slots]
    max_blocks = _max_blocks(num_pairs, num_slots, block_m)
    sorted_pair = torch.full((max_blocks * block_m,), -1, dtype=torch.int32, device=device)
    sorted_pair[dest] = order.to(torch.int32)
    block_start = torch.arange(max_blocks, device=device) * block_m
    block_slot = torch.searchsorted(ends, block_start, right=True)
    used = block_start < ends[-1]
    block_slot = torch.where(used, block_slot, -1).to(torch.int32)
    slot_start = starts[block_slot.clamp(min=0).long()]
    rows = counts[block_slot.clamp(min=0).long()] - (block_start - slot_start)
    block_rows = torch.where(used, rows.clamp(max=block_m), 0).to(torch.int32)
    return sorted_pair, block_slot, block_rows


def _max_blocks(num_pairs: int, num_slots: int, block_m: int) -> int:
    """Row blocks any routing can need: every slot may end in a partial block."""
    return (num_pairs + block_m - 1) // block_m + num_slots


def align_pairs_by_slot_triton(topk_ids, slot_of_expert, num_slots: int, block_m: int):
    """:func:`align_pairs_by_slot` on the GPU in three small kernels (one memset before),
    without a host sync. Pairs of one slot land in any order; the layout is otherwise the
    reference's. Rows past ``block_rows`` are left unwritten (the GEMMs mask them)."""
    import triton

    from vllm_dwdp_kernels.triton.split_moe import (count_pairs_kernel, place_pairs_kernel,
                                                    plan_blocks_kernel)

    device = topk_ids.device
    ids = topk_ids.reshape(-1)
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.to(torch.int32)
    ids = ids.contiguous()
    slot_of_expert = slot_of_expert.contiguous()
    P, S = ids.numel(), num_slots
    max_blocks = _max_blocks(P, S, block_m)
    counts = torch.zeros(S, dtype=torch.int32, device=device)
    cursor = torch.empty(S, dtype=torch.int32, device=device)
    ends = torch.empty(S, dtype=torch.int32, device=device)
    sorted_pair = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_slot = torch.empty(max_blocks, dtype=torch.int32, device=device)
    block_rows = torch.empty(max_blocks, dtype=torch.int32, device=device)
    bins = triton.next_power_of_2(S + 1)
    block = 1024
    count_pairs_kernel[(triton.cdiv(P, block),)](ids, slot_of_expert, counts, P, S,
                                                 BLOCK=block, BINS=bins, num_warps=4)
    plan_blocks_kernel[(1,)](counts, cursor, ends, S, BLOCK_M=block_m,
                             S_POW2=triton.next_power_of_2(S), num_warps=4)
    place_pairs_kernel[(triton.cdiv(max(P, max_blocks), block),)](
        ids, slot_of_expert, cursor, ends, counts, sorted_pair, block_slot, block_rows,
        P, S, max_blocks, BLOCK_M=block_m, BLOCK=block,
        SEARCH_STEPS=max(1, S.bit_length()), num_warps=4)
    return sorted_pair, block_slot, block_rows


def quantize_groups(x: torch.Tensor, group: int, ue8m0: bool = False):
    """:func:`quantize_groups_reference` as one Triton kernel (CUDA): (fp8 [T, H], float32
    scales [T, ceil(H / group)])."""
    import triton

    from vllm_dwdp_kernels.triton.split_moe import quantize_groups_kernel

    x = x.contiguous()
    T, H = x.shape
    q = torch.empty(T, H, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(T, triton.cdiv(H, group), dtype=torch.float32, device=x.device)
    block_m = 16
    if T:
        quantize_groups_kernel[(triton.cdiv(T, block_m), s.shape[1])](
            x, q, s, T, H, x.stride(0), q.stride(0), s.stride(0),
            BLOCK_M=block_m, GROUP=group, UE8M0=ue8m0, num_warps=4)
    return q, s


def fit_shared_memory(config: KernelConfig, act_bytes: int, weight_bytes: int,
                      limit: int) -> KernelConfig:
    """``config`` with fewer pipeline stages, then fewer rows, until the gate/up kernel's
    pipelined tiles (one activation tile and two weight tiles per stage) fit in ``limit``
    bytes of shared memory: the tiles chosen for bf16 do not fit in fp32."""
    def need(c):
        return c.num_stages * (c.block_m * c.block_k * act_bytes
                               + 2 * c.block_n * c.block_k * weight_bytes)

    while need(config) > limit and config.num_stages > 2:
        config = replace(config, num_stages=config.num_stages - 1)
    while need(config) > limit and config.block_m > 16:
        config = replace(config, block_m=config.block_m // 2)
    return config


_SMEM: dict = {}


def _shared_memory_limit(device: torch.device) -> int:
    """Shared memory one block may use on ``device`` (opt-in maximum), cached."""
    if device not in _SMEM:
        props = torch.cuda.get_device_properties(device)
        _SMEM[device] = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return _SMEM[device]


_TL_DTYPES = {}


def _tl_dtype(dtype: torch.dtype):
    if not _TL_DTYPES:
        import triton.language as tl

        _TL_DTYPES.update({torch.float32: tl.float32, torch.float16: tl.float16,
                           torch.bfloat16: tl.bfloat16})
    return _TL_DTYPES[dtype]


def _split_moe_triton(x, topk_weights, topk_ids, w13_local, w2_local, w13_recv, w2_recv,
                      slot_of_expert, scales: BlockScales | None = None,
                      config: KernelConfig | None = None):
    import triton

    from vllm_dwdp_kernels.triton.split_moe import down_kernel, gate_up_act_kernel

    _check(x, topk_weights, topk_ids, w13_local, w2_local, w13_recv, w2_recv, slot_of_expert)
    fp8 = _check_fp8(w13_local, w2_local, w13_recv, w2_recv, scales)
    if config is None:
        config = pick_config(x.shape[0], topk_ids.shape[1],
                             w13_local.shape[0] + w13_recv.shape[0], x.shape[1],
                             w2_local.shape[2], fp8)
    config = fit_shared_memory(config, x.element_size(), w13_local.element_size(),
                               _shared_memory_limit(x.device))
    block_m, block_n, block_k = config.block_m, config.block_n, config.block_k
    num_warps, num_stages = config.num_warps, config.num_stages
    gate_up_n = block_n
    if fp8:
        # One K tile is one activation quantisation group and one weight scale column; the
        # gate/up kernel's N tile is one group of the down GEMM's activations.
        block_k = gate_up_n = scales.block_k
        block_n = min(block_n, scales.block_n)
        if scales.block_n % block_n or scales.block_n % gate_up_n:
            raise ValueError(f"FP8 weight scale blocks of {scales.block_n}x{scales.block_k} "
                             f"need N tiles dividing {scales.block_n}; got {block_n} and "
                             f"{gate_up_n}")
    T, H = x.shape
    K = topk_ids.shape[1]
    inter_size = w2_local.shape[2]
    e_local = w13_local.shape[0]
    num_slots = e_local + w13_recv.shape[0]
    x = x.contiguous()
    for w in (w13_local, w2_local, w13_recv, w2_recv):
        if w.numel() and w.stride(-1) != 1:
            raise ValueError("expert weights must be contiguous in their last dimension")
    sorted_pair, block_slot, block_rows = align_pairs_by_slot_triton(
        topk_ids, slot_of_expert, num_slots, block_m)
    max_blocks = block_slot.numel()
    # Empty receive buffers still need a valid pointer.
    w13_r = w13_recv if w13_recv.numel() else w13_local
    w2_r = w2_recv if w2_recv.numel() else w2_local
    # One row stride serves both tensors: take it from a non-empty one (an empty tensor's
    # strides need not match its shape).
    w13_rows = (w13_local if w13_local.numel() else w13_r).stride(1)
    w2_rows = (w2_local if w2_local.numel() else w2_r).stride(1)
    for name, w, rows in (("w13_recv", w13_r, w13_rows), ("w2_recv", w2_r, w2_rows),
                          ("w13_local", w13_local, w13_rows), ("w2_local", w2_local, w2_rows)):
        if w.numel() and w.stride(1) != rows:
            raise ValueError(f"{name} has row stride {w.stride(1)}, its pair {rows}: local and "
                             f"received experts must share one layout")
    rows_total = max_blocks * block_m
    if fp8:
        s13_l, s2_l = scales.w13_local.contiguous(), scales.w2_local.contiguous()
        s13_r = scales.w13_recv.contiguous() if w13_recv.numel() else s13_l
        s2_r = scales.w2_recv.contiguous() if w2_recv.numel() else s2_l
        if not w13_local.numel():  # as above: strides from the non-empty operand
            s13_l, s2_l = s13_r, s2_r
        scale_n = scales.block_n
        a, a_s = quantize_groups(x, block_k, scales.ue8m0)
        inter = torch.empty(rows_total, inter_size, dtype=torch.float8_e4m3fn, device=x.device)
        inter_s = torch.empty(rows_total, triton.cdiv(inter_size, block_k), dtype=torch.float32,
                              device=x.device)
    else:  # unused by the kernels (FP8=False): any valid pointers
        s13_l = s2_l = s13_r = s2_r = topk_weights
        scale_n = block_n
        a, a_s = x, topk_weights
        inter = torch.empty(rows_total, inter_size, dtype=x.dtype, device=x.device)
        inter_s = topk_weights
    ue8m0 = bool(fp8 and scales.ue8m0)
    gate_up_act_kernel[(max_blocks, triton.cdiv(inter_size, gate_up_n))](
        a, a_s, w13_local, w13_r, inter, inter_s, sorted_pair, block_slot, block_rows,
        s13_l, s13_r,
        H, inter_size, K, e_local,
        a.stride(0), a_s.stride(0) if fp8 else 0, w13_local.stride(0), w13_r.stride(0),
        w13_rows, inter.stride(0), inter_s.stride(0) if fp8 else 0,
        s13_l.stride(0), s13_r.stride(0), s13_l.stride(-2) if fp8 else 0,
        BLOCK_M=block_m, BLOCK_N=gate_up_n, BLOCK_K=block_k,
        ACT_DTYPE=_tl_dtype(x.dtype), FP8=fp8, SCALE_N=scale_n, UE8M0=ue8m0,
        num_warps=num_warps, num_stages=num_stages,
    )
    # Each (token, k) product, times its routing weight, rounded to x's dtype as vLLM
    # rounds its per-pair outputs; then summed over k in float32.
    out_pairs = torch.empty(T * K, H, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).contiguous()
    down_kernel[(max_blocks, triton.cdiv(H, block_n))](
        inter, inter_s, w2_local, w2_r, out_pairs, weights, sorted_pair, block_slot,
        block_rows, s2_l, s2_r,
        H, inter_size, e_local,
        inter.stride(0), inter_s.stride(0) if fp8 else 0, w2_local.stride(0), w2_r.stride(0),
        w2_rows, out_pairs.stride(0),
        s2_l.stride(0), s2_r.stride(0), s2_l.stride(-2) if fp8 else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        FP8=fp8, SCALE_N=scale_n, num_warps=num_warps, num_stages=num_stages,
    )
    return out_pairs.view(T, K, H).sum(dim=1, dtype=torch.float32).to(x.dtype)

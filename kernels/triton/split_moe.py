"""Triton kernels of the split-weight MoE (launcher: ``kernels/split_moe.py``).

Rows are (token, k) pairs grouped by weight slot and padded per slot to BLOCK_M, so each
program reads one expert's weights: from the local tensor when ``slot < E_LOCAL``, else from
the receive buffer. Three small kernels lay the rows out on the device, without the host
waiting (``count_pairs_kernel``, ``plan_blocks_kernel``, ``place_pairs_kernel``); pairs of
one slot land in any order (row results do not depend on their position in a tile).

With ``FP8``, weights are float8_e4m3fn with one float32 scale per [SCALE_N x BLOCK_K] tile.
Activations are quantised once per token and group of BLOCK_K channels: the tokens before
the gate/up GEMM (``quantize_groups_kernel``), the SiLU-and-mul output in the gate/up
kernel's epilogue (its BLOCK_N columns are one group). The FP8 tensor cores multiply, the
scales are applied per K tile.
"""

import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)
FP8_EPS = tl.constexpr(1e-10)


@triton.jit
def quantize_rows(a, UE8M0: tl.constexpr):
    """Dynamic FP8 quantisation of a tile, one scale per row: (fp8 tile, float32 scales).

    ``UE8M0``: the scale is rounded up to a power of two, as vLLM quantises activations
    when DeepGEMM's E8M0 scale format is on (its default on Hopper and Blackwell)."""
    a = a.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(a), axis=1), FP8_EPS) / FP8_MAX  # divided, as vLLM
    if UE8M0:
        scale = tl.math.exp2(tl.ceil(tl.log2(scale)))
    q = tl.clamp(a / scale[:, None], -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
    return q, scale


@triton.jit
def quantize_groups_kernel(x_ptr, q_ptr, s_ptr, T, H, stride_x, stride_q, stride_s,
                           BLOCK_M: tl.constexpr, GROUP: tl.constexpr, UE8M0: tl.constexpr):
    """q[t, g*GROUP + j], s[t, g]: per-token, per-GROUP-channel FP8 quantisation of x."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP)
    mask = (rows < T)[:, None] & (cols < H)[None, :]
    a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask,
                other=0.0)
    q, s = quantize_rows(a, UE8M0)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_q + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows.to(tl.int64) * stride_s + g, s, mask=rows < T)


# ---- row layout: (token, k) pairs grouped by slot, each slot padded to BLOCK_M rows ------------
@triton.jit
def count_pairs_kernel(topk_ids_ptr, slot_of_expert_ptr, counts_ptr, P, S,
                       BLOCK: tl.constexpr, BINS: tl.constexpr):
    """counts[slot] += pairs routed to it (counts zeroed by the caller; BINS > S)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < P
    e = tl.load(topk_ids_ptr + offs, mask=m, other=0)
    slot = tl.load(slot_of_expert_ptr + e, mask=m, other=0)
    slot = tl.where(m, slot, S)  # past the end go to a bin nobody stores
    hist = tl.histogram(slot, BINS)
    bins = tl.arange(0, BINS)
    tl.atomic_add(counts_ptr + bins, hist, mask=(bins < S) & (hist > 0))


@triton.jit
def plan_blocks_kernel(counts_ptr, cursor_ptr, ends_ptr, S,
                       BLOCK_M: tl.constexpr, S_POW2: tl.constexpr):
    """One program: each slot's rows padded to BLOCK_M; ends = running sum of the padded
    rows, cursor = each slot's first row (where ``place_pairs_kernel`` starts filling)."""
    offs = tl.arange(0, S_POW2)
    m = offs < S
    c = tl.load(counts_ptr + offs, mask=m, other=0)
    padded = (c + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(cursor_ptr + offs, ends - padded, mask=m)
    tl.store(ends_ptr + offs, ends, mask=m)


@triton.jit
def place_pairs_kernel(topk_ids_ptr, slot_of_expert_ptr, cursor_ptr, ends_ptr, counts_ptr,
                       sorted_pair_ptr, block_slot_ptr, block_rows_ptr, P, S, MAX_BLOCKS,
                       BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """Program i places pairs [i*BLOCK, (i+1)*BLOCK) at their slot's next free row, and
    describes row blocks [i*BLOCK, (i+1)*BLOCK): the slot each reads (-1 past the last) and
    how many of its BLOCK_M rows hold pairs."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < P
    e = tl.load(topk_ids_ptr + offs, mask=m, other=0)
    slot = tl.load(slot_of_expert_ptr + e, mask=m, other=0)
    row = tl.atomic_add(cursor_ptr + slot, 1, mask=m)
    tl.store(sorted_pair_ptr + row, offs, mask=m)
    # Blocks: the slot is the first whose end lies past the block's first row.
    b = offs
    mb = b < MAX_BLOCKS
    first = b * BLOCK_M
    lo = tl.zeros((BLOCK,), dtype=tl.int32)
    hi = tl.zeros((BLOCK,), dtype=tl.int32) + S
    for _ in range(SEARCH_STEPS):
        open_ = lo < hi
        mid = (lo + hi) // 2
        end = tl.load(ends_ptr + mid, mask=open_ & mb, other=0)
        right = end <= first
        lo = tl.where(open_ & right, mid + 1, lo)
        hi = tl.where(open_ & (~right), mid, hi)
    used = lo < S
    s_ = tl.where(used, lo, 0)
    c = tl.load(counts_ptr + s_, mask=mb & used, other=0)
    end = tl.load(ends_ptr + s_, mask=mb & used, other=0)
    start = end - (c + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    rows = tl.minimum(c - (first - start), BLOCK_M)
    tl.store(block_slot_ptr + b, tl.where(used, lo, -1), mask=mb)
    tl.store(block_rows_ptr + b, tl.where(used, rows, 0), mask=mb)


# ---- the two GEMMs -------------------------------------------------------------------------
@triton.jit
def gate_up_act_kernel(
    x_ptr, xs_ptr, w_local_ptr, w_recv_ptr, inter_ptr, inter_s_ptr,
    sorted_pair_ptr, block_slot_ptr, block_rows_ptr, s_local_ptr, s_recv_ptr,
    H, I, TOP_K, E_LOCAL,
    stride_xt, stride_xs, stride_wle, stride_wre, stride_wn, stride_inter, stride_inter_s,
    stride_sle, stride_sre, stride_sn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACT_DTYPE: tl.constexpr, FP8: tl.constexpr,
    SCALE_N: tl.constexpr, UE8M0: tl.constexpr,
):
    """inter[row, n] = silu(x[tok] . W13[slot, n]) * (x[tok] . W13[slot, I + n]).

    FP8: x is already quantised (``xs``: its scale per token and K tile) and the output
    tile, rounded to ACT_DTYPE, is quantised for the down GEMM (``inter_s``: one scale per
    row and BLOCK_N columns)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(block_slot_ptr + pid_m)
    if slot < 0:
        return
    if slot < E_LOCAL:
        w_ptr = w_local_ptr + slot.to(tl.int64) * stride_wle
        s_ptr = s_local_ptr + slot.to(tl.int64) * stride_sle
    else:
        w_ptr = w_recv_ptr + (slot - E_LOCAL).to(tl.int64) * stride_wre
        s_ptr = s_recv_ptr + (slot - E_LOCAL).to(tl.int64) * stride_sre
    n_rows = tl.load(block_rows_ptr + pid_m)
    offs_m = tl.arange(0, BLOCK_M)
    valid = offs_m < n_rows
    rows = (pid_m * BLOCK_M + offs_m).to(tl.int64)
    pair = tl.load(sorted_pair_ptr + rows, mask=valid, other=0)
    tok = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < H
        a = tl.load(x_ptr + tok[:, None] * stride_xt + kk[None, :],
                    mask=valid[:, None] & mask_k[None, :], other=0.0)
        wg = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + kk[None, :],
                     mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        wu = tl.load(w_ptr + (offs_n[:, None] + I).to(tl.int64) * stride_wn + kk[None, :],
                     mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if FP8:
            kb = k0 // BLOCK_K
            a_s = tl.load(xs_ptr + tok * stride_xs + kb, mask=valid, other=0.0)
            sg = tl.load(s_ptr + (offs_n // SCALE_N) * stride_sn + kb, mask=mask_n, other=0.0)
            su = tl.load(s_ptr + ((offs_n + I) // SCALE_N) * stride_sn + kb, mask=mask_n,
                         other=0.0)
            acc_g += tl.dot(a, tl.trans(wg)) * a_s[:, None] * sg[None, :]
            acc_u += tl.dot(a, tl.trans(wu)) * a_s[:, None] * su[None, :]
        else:  # Triton's default dot precision (tf32 for fp32), as vLLM's fused MoE uses
            acc_g = tl.dot(a, tl.trans(wg), acc_g)
            acc_u = tl.dot(a, tl.trans(wu), acc_u)
    # Rounded as vLLM's GEMM outputs and SiLU-and-mul round (no-ops for fp32): gate and up
    # to the activation dtype, then silu(gate), then silu(gate) * up.
    acc_g = acc_g.to(ACT_DTYPE).to(tl.float32)
    acc_u = acc_u.to(ACT_DTYPE).to(tl.float32)
    silu = (acc_g / (1.0 + tl.exp(-acc_g))).to(ACT_DTYPE).to(tl.float32)
    act = (silu * acc_u).to(ACT_DTYPE)
    out_mask = valid[:, None] & mask_n[None, :]
    inter_at = inter_ptr + rows[:, None] * stride_inter + offs_n[None, :]
    if FP8:
        q, q_s = quantize_rows(act, UE8M0)
        tl.store(inter_at, q, mask=out_mask)
        tl.store(inter_s_ptr + rows * stride_inter_s + pid_n, q_s, mask=valid)
    else:
        tl.store(inter_at, act, mask=out_mask)


@triton.jit
def down_kernel(
    inter_ptr, inter_s_ptr, w_local_ptr, w_recv_ptr, out_ptr, weights_ptr,
    sorted_pair_ptr, block_slot_ptr, block_rows_ptr, s_local_ptr, s_recv_ptr,
    H, I, E_LOCAL,
    stride_inter, stride_inter_s, stride_wle, stride_wre, stride_wn, stride_out,
    stride_sle, stride_sre, stride_sn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FP8: tl.constexpr, SCALE_N: tl.constexpr,
):
    """out[pair, n] = topk_weight[pair] * (inter[row] . W2[slot, n]), in out's dtype.

    FP8: inter is quantised, ``inter_s`` its scale per row and K tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(block_slot_ptr + pid_m)
    if slot < 0:
        return
    if slot < E_LOCAL:
        w_ptr = w_local_ptr + slot.to(tl.int64) * stride_wle
        s_ptr = s_local_ptr + slot.to(tl.int64) * stride_sle
    else:
        w_ptr = w_recv_ptr + (slot - E_LOCAL).to(tl.int64) * stride_wre
        s_ptr = s_recv_ptr + (slot - E_LOCAL).to(tl.int64) * stride_sre
    n_rows = tl.load(block_rows_ptr + pid_m)
    offs_m = tl.arange(0, BLOCK_M)
    valid = offs_m < n_rows
    rows = (pid_m * BLOCK_M + offs_m).to(tl.int64)
    pair = tl.load(sorted_pair_ptr + rows, mask=valid, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < I
        a = tl.load(inter_ptr + rows[:, None] * stride_inter + kk[None, :],
                    mask=valid[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + kk[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if FP8:
            kb = k0 // BLOCK_K
            a_s = tl.load(inter_s_ptr + rows * stride_inter_s + kb, mask=valid, other=0.0)
            sw = tl.load(s_ptr + (offs_n // SCALE_N) * stride_sn + kb, mask=mask_n, other=0.0)
            acc += tl.dot(a, tl.trans(w)) * a_s[:, None] * sw[None, :]
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    g = tl.load(weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)
    acc = acc * g[:, None]
    tl.store(out_ptr + pair[:, None].to(tl.int64) * stride_out + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])

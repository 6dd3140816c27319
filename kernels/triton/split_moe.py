"""Triton kernels of the split-weight MoE (launcher: ``kernels/split_moe.py``).

Rows are (token, k) pairs sorted by weight slot and padded per slot to BLOCK_M, so each
program reads one expert's weights: from the local tensor when ``slot < E_LOCAL``, else from
the receive buffer.

With ``FP8``, weights are float8_e4m3fn with one float32 scale per [SCALE_N x BLOCK_K] tile,
and each [BLOCK_M x BLOCK_K] activation tile is quantised in registers, one scale per row
(``quantize_rows``): the FP8 tensor cores multiply, the scales are applied per K tile.
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
    scale = tl.maximum(tl.max(tl.abs(a), axis=1), FP8_EPS) * (1.0 / FP8_MAX)
    if UE8M0:
        scale = tl.math.exp2(tl.ceil(tl.log2(scale)))
    q = tl.clamp(a / scale[:, None], -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
    return q, scale


@triton.jit
def gate_up_act_kernel(
    x_ptr, w_local_ptr, w_recv_ptr, inter_ptr, sorted_pair_ptr, block_slot_ptr,
    s_local_ptr, s_recv_ptr,
    H, I, TOP_K, E_LOCAL,
    stride_xt, stride_wle, stride_wre, stride_wn, stride_inter,
    stride_sle, stride_sre, stride_sn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, FP8: tl.constexpr, SCALE_N: tl.constexpr,
    UE8M0: tl.constexpr,
):
    """inter[row, n] = silu(x[tok] . W13[slot, n]) * (x[tok] . W13[slot, I + n])."""
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
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ptr + rows)
    valid = pair >= 0
    tok = tl.where(valid, pair // TOP_K, 0).to(tl.int64)
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
            aq, a_s = quantize_rows(a, UE8M0)
            kb = k0 // BLOCK_K
            sg = tl.load(s_ptr + (offs_n // SCALE_N) * stride_sn + kb, mask=mask_n, other=0.0)
            su = tl.load(s_ptr + ((offs_n + I) // SCALE_N) * stride_sn + kb, mask=mask_n,
                         other=0.0)
            acc_g += tl.dot(aq, tl.trans(wg)) * a_s[:, None] * sg[None, :]
            acc_u += tl.dot(aq, tl.trans(wu)) * a_s[:, None] * su[None, :]
        else:
            acc_g = tl.dot(a, tl.trans(wg), acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, tl.trans(wu), acc_u, input_precision=PRECISION)
    # As vLLM does: gate and up are rounded to the activation dtype before the SiLU-and-mul
    # (a no-op for fp32; for FP8 experts it keeps the next quantisation step in step).
    acc_g = acc_g.to(inter_ptr.dtype.element_ty).to(tl.float32)
    acc_u = acc_u.to(inter_ptr.dtype.element_ty).to(tl.float32)
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(inter_ptr + rows[:, None].to(tl.int64) * stride_inter + offs_n[None, :],
             act.to(inter_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


@triton.jit
def down_kernel(
    inter_ptr, w_local_ptr, w_recv_ptr, out_ptr, weights_ptr, sorted_pair_ptr, block_slot_ptr,
    s_local_ptr, s_recv_ptr,
    H, I, E_LOCAL,
    stride_inter, stride_wle, stride_wre, stride_wn, stride_out,
    stride_sle, stride_sre, stride_sn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, FP8: tl.constexpr, SCALE_N: tl.constexpr,
    UE8M0: tl.constexpr,
):
    """out[pair, n] = topk_weight[pair] * (inter[row] . W2[slot, n])."""
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
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ptr + rows)
    valid = pair >= 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < I
        a = tl.load(inter_ptr + rows[:, None].to(tl.int64) * stride_inter + kk[None, :],
                    mask=valid[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + kk[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if FP8:
            aq, a_s = quantize_rows(a, UE8M0)
            sw = tl.load(s_ptr + (offs_n // SCALE_N) * stride_sn + k0 // BLOCK_K, mask=mask_n,
                         other=0.0)
            acc += tl.dot(aq, tl.trans(w)) * a_s[:, None] * sw[None, :]
        else:
            acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    g = tl.load(weights_ptr + tl.where(valid, pair, 0), mask=valid, other=0.0).to(tl.float32)
    acc = acc * g[:, None]
    safe_pair = tl.where(valid, pair, 0).to(tl.int64)
    tl.store(out_ptr + safe_pair[:, None] * stride_out + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])

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
"""

from __future__ import annotations

import torch


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


def split_moe_reference(x, topk_weights, topk_ids, w13_local, w2_local, w13_recv, w2_recv,
                        slot_of_expert) -> torch.Tensor:
    """Pure-torch split-weight MoE (float32 accumulation). Runs on any device."""
    _check(x, topk_weights, topk_ids, w13_local, w2_local, w13_recv, w2_recv, slot_of_expert)
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
        w13, w2 = ((w13_local[slot], w2_local[slot]) if slot < e_local
                   else (w13_recv[slot - e_local], w2_recv[slot - e_local]))
        toks = flat_tok[start:start + n]
        h = x[toks].float() @ w13.float().t()
        inter = h.shape[1] // 2
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        y = (act @ w2.float().t()) * flat_w[start:start + n, None]
        out.index_add_(0, toks, y)
        start += n
    return out.to(x.dtype)


def split_moe(x, topk_weights, topk_ids, w13_local, w2_local, w13_recv, w2_recv,
              slot_of_expert) -> torch.Tensor:
    """Split-weight MoE; the Triton kernel on CUDA, the reference elsewhere."""
    if x.is_cuda:
        return _split_moe_triton(x, topk_weights, topk_ids, w13_local, w2_local, w13_recv,
                                 w2_recv, slot_of_expert)
    return split_moe_reference(x, topk_weights, topk_ids, w13_local, w2_local, w13_recv, w2_recv,
                               slot_of_expert)


def align_pairs_by_slot(topk_ids, slot_of_expert, num_slots: int, block_m: int):
    """Sort (token, k) pairs by weight slot, padding each slot's run to ``block_m`` rows.

    Returns ``sorted_pair`` [max_blocks * block_m] (pair index t*K+k, or -1 for padding) and
    ``block_slot`` [max_blocks] (slot of each row block, -1 past the end). Sizes are upper
    bounds known on the host, so nothing waits for the device.
    """
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    slots = slot_of_expert.long()[topk_ids.reshape(-1).long()]
    counts = torch.bincount(slots, minlength=num_slots)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(slots, stable=True)
    sorted_slots = slots[order]
    first_of_slot = torch.cumsum(counts, 0) - counts
    dest = starts[sorted_slots] + torch.arange(num_pairs, device=device) - first_of_slot[sorted_slots]
    max_blocks = (num_pairs + block_m - 1) // block_m + num_slots
    sorted_pair = torch.full((max_blocks * block_m,), -1, dtype=torch.int32, device=device)
    sorted_pair[dest] = order.to(torch.int32)
    block_start = torch.arange(max_blocks, device=device) * block_m
    block_slot = torch.searchsorted(ends, block_start, right=True)
    block_slot = torch.where(block_start < ends[-1], block_slot, -1).to(torch.int32)
    return sorted_pair, block_slot


def _split_moe_triton(x, topk_weights, topk_ids, w13_local, w2_local, w13_recv, w2_recv,
                      slot_of_expert, block_m: int = 64, block_n: int = 128, block_k: int = 64):
    import triton

    from vllm_dwdp_kernels.triton.split_moe import down_kernel, gate_up_act_kernel

    _check(x, topk_weights, topk_ids, w13_local, w2_local, w13_recv, w2_recv, slot_of_expert)
    T, H = x.shape
    K = topk_ids.shape[1]
    inter_size = w2_local.shape[2]
    e_local = w13_local.shape[0]
    num_slots = e_local + w13_recv.shape[0]
    x = x.contiguous()
    for w in (w13_local, w2_local, w13_recv, w2_recv):
        if w.numel() and w.stride(-1) != 1:
            raise ValueError("expert weights must be contiguous in their last dimension")
    # fp32 inputs get exact fp32 products (not tf32), to match vLLM's fp32 path.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    sorted_pair, block_slot = align_pairs_by_slot(topk_ids, slot_of_expert, num_slots, block_m)
    max_blocks = block_slot.numel()
    inter = torch.empty(max_blocks * block_m, inter_size, dtype=x.dtype, device=x.device)
    # Empty receive buffers still need a valid pointer.
    w13_r = w13_recv if w13_recv.numel() else w13_local
    w2_r = w2_recv if w2_recv.numel() else w2_local
    gate_up_act_kernel[(max_blocks, triton.cdiv(inter_size, block_n))](
        x, w13_local, w13_r, inter, sorted_pair, block_slot,
        H, inter_size, K, e_local,
        x.stride(0), w13_local.stride(0), w13_r.stride(0), w13_local.stride(1), inter.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision,
        num_warps=8, num_stages=3,
    )
    out_pairs = torch.empty(T * K, H, dtype=torch.float32, device=x.device)
    weights = topk_weights.reshape(-1).contiguous()
    down_kernel[(max_blocks, triton.cdiv(H, block_n))](
        inter, w2_local, w2_r, out_pairs, weights, sorted_pair, block_slot,
        H, inter_size, e_local,
        inter.stride(0), w2_local.stride(0), w2_r.stride(0), w2_local.stride(1), out_pairs.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision,
        num_warps=8, num_stages=3,
    )
    return out_pairs.view(T, K, H).sum(dim=1).to(x.dtype)

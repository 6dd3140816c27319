"""Split-weight MoE: reference vs a dense per-token computation, Triton vs reference."""

from __future__ import annotations

import pytest
import torch

from vllm_dwdp_kernels.split_moe import (BlockScales, KernelConfig, align_pairs_by_slot,
                                          align_pairs_by_slot_triton, candidate_configs,
                                          pick_config, quantize_groups,
                                          quantize_blocks_reference,
                                          quantize_groups_reference, split_moe,
                                          split_moe_reference)


def make_case(T, H, I, E, K, e_local, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    x = rnd(T, H)
    w13 = rnd(E, 2 * I, H) * H ** -0.5
    w2 = rnd(E, H, I) * I ** -0.5
    # Any split of the experts between the local tensor and the receive buffer.
    perm = torch.randperm(E, generator=g)
    local_ids, recv_ids = perm[:e_local], perm[e_local:]
    slot_of_expert = torch.empty(E, dtype=torch.int32)
    slot_of_expert[local_ids] = torch.arange(e_local, dtype=torch.int32)
    slot_of_expert[recv_ids] = torch.arange(e_local, E, dtype=torch.int32)
    logits = torch.randn(T, E, generator=g)
    topk_w, topk_ids = torch.softmax(logits, -1).topk(K, dim=-1)
    return dict(
        x=x, topk_weights=topk_w.to(device), topk_ids=topk_ids.to(device=device, dtype=torch.int32),
        w13_local=w13[local_ids.to(device)].contiguous(), w2_local=w2[local_ids.to(device)].contiguous(),
        w13_recv=w13[recv_ids.to(device)].contiguous(), w2_recv=w2[recv_ids.to(device)].contiguous(),
        slot_of_expert=slot_of_expert.to(device),
    ), (w13, w2)


def dense_moe(x, topk_weights, topk_ids, w13, w2):
    """One token and one expert at a time, in float64, on the full (unsplit) weights."""
    x, w13, w2 = x.double().cpu(), w13.double().cpu(), w2.double().cpu()
    out = torch.zeros_like(x)
    inter = w2.shape[2]
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            h = w13[e] @ x[t]
            out[t] += float(topk_weights[t, k]) * (w2[e] @ (torch.nn.functional.silu(h[:inter]) * h[inter:]))
    return out


@pytest.mark.parametrize("T, H, I, E, K, e_local", [(1, 64, 32, 4, 2, 2), (37, 128, 64, 8, 2, 3),
                                                     (64, 96, 48, 6, 3, 6), (20, 64, 32, 5, 2, 0)])
def test_reference_matches_dense(T, H, I, E, K, e_local):
    case, (w13, w2) = make_case(T, H, I, E, K, e_local, torch.float32, "cpu")
    out = split_moe_reference(**case)
    ref = dense_moe(case["x"], case["topk_weights"], case["topk_ids"], w13, w2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_align_covers_every_pair_once():
    g = torch.Generator().manual_seed(1)
    topk_ids = torch.randint(0, 9, (50, 3), generator=g)
    slot_of_expert = torch.randperm(9, generator=g).to(torch.int32)
    sorted_pair, block_slot, block_rows = align_pairs_by_slot(topk_ids, slot_of_expert, 9,
                                                              block_m=8)
    pairs = sorted_pair[sorted_pair >= 0]
    assert sorted(pairs.tolist()) == list(range(150))
    rows = sorted_pair.view(-1, 8)
    for b in range(rows.shape[0]):
        members = rows[b][rows[b] >= 0]
        assert members.numel() == block_rows[b]  # valid rows come first, then padding
        assert (rows[b][:int(block_rows[b])] >= 0).all()
        if block_slot[b] < 0:
            assert members.numel() == 0
        for p in members.tolist():  # every pair in a block uses that block's slot
            assert slot_of_expert[topk_ids.reshape(-1)[p]] == block_slot[b]


def _pairs_per_slot(sorted_pair, block_slot, block_rows, block_m):
    out: dict[int, list[int]] = {}
    for b, (slot, n) in enumerate(zip(block_slot.tolist(), block_rows.tolist())):
        if slot >= 0:
            out.setdefault(slot, []).extend(sorted_pair[b * block_m:b * block_m + n].tolist())
    return {slot: sorted(p) for slot, p in out.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("T, K, S, block_m", [(1, 8, 128, 16), (50, 3, 9, 8), (300, 4, 16, 16),
                                              (7, 2, 5, 64), (4096, 8, 160, 64)])
def test_triton_align_is_the_reference_layout(T, K, S, block_m):
    """Same blocks, same slot per block and rows per block; within a slot the pairs may
    come in another order."""
    g = torch.Generator().manual_seed(T)
    topk_ids = torch.randint(0, S, (T, K), generator=g, dtype=torch.int32).cuda()
    slot_of_expert = torch.randperm(S, generator=g).to(torch.int32).cuda()
    ref = [t.cpu() for t in align_pairs_by_slot(topk_ids, slot_of_expert, S, block_m)]
    out = [t.cpu() for t in align_pairs_by_slot_triton(topk_ids, slot_of_expert, S, block_m)]
    assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])
    assert _pairs_per_slot(*out, block_m) == _pairs_per_slot(*ref, block_m)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_triton_split_moe_never_syncs_the_host(fp8):
    """The forward path must not wait for the device (DWDP and FlexTensor issue copies
    ahead of the compute): any implicit device-to-host sync raises here."""
    if fp8:
        case, _ = make_fp8_case(300, 512, 256, 16, 4, 5, "cuda", seed=2)
    else:
        case, _ = make_case(300, 512, 256, 16, 4, 5, torch.bfloat16, "cuda", seed=2)
    split_moe(**case)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        split_moe(**case)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("ue8m0", [False, True])
def test_triton_quantize_groups_is_the_reference(ue8m0):
    g = torch.Generator(device="cuda").manual_seed(3)
    a = (torch.randn(37, 300, generator=g, device="cuda") * 3).to(torch.bfloat16)
    q, s = quantize_groups(a, 128, ue8m0)
    q_ref, s_ref = quantize_groups_reference(a, 128, ue8m0)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.contiguous().view(torch.uint8))


def test_bad_shapes_raise_one_clear_error():
    case, _ = make_case(4, 64, 32, 4, 2, 2, torch.float32, "cpu")
    case["w2_recv"] = case["w2_recv"][:, :, :16]
    with pytest.raises(ValueError, match=r"w13_recv .* / w2_recv .* do not fit hidden size 64"):
        split_moe_reference(**case)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3),
                                        # tf32 products (as vLLM's fused MoE multiplies
                                        # fp32) against the exact fp32 reference
                                        (torch.float32, 5e-3)])
@pytest.mark.parametrize("T, H, I, E, K, e_local", [(1, 256, 128, 8, 2, 4), (300, 512, 256, 16, 4, 5),
                                                     (2048, 2048, 768, 32, 8, 16), (77, 384, 192, 8, 2, 8)])
def test_triton_matches_reference(T, H, I, E, K, e_local, dtype, tol):
    case, _ = make_case(T, H, I, E, K, e_local, dtype, "cuda", seed=T)
    out = split_moe(**case)
    ref = split_moe_reference(**case)
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < tol, f"relative error {err:.2e} >= {tol}"


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 71, 300])
def test_triton_fp32_rounds_as_vllms_fused_moe(T):
    """fp32 experts: stock vLLM's fused MoE multiplies in tf32 on CUDA, and so does ours, so
    the two agree to fp32 accumulation order (~1e-6), far closer than either is to exact fp32
    products (~3e-4). Engines depend on it: a tiny model's near-tied routing scores flip with
    tf32-sized differences (with exact products ours gave another token than stock)."""
    fused_moe = pytest.importorskip("vllm.model_executor.layers.fused_moe")
    case, (w13, w2) = make_case(T, 128, 64, 32, 2, 8, torch.float32, "cuda", seed=T)
    ours = split_moe(**case)
    stock = fused_moe.fused_experts(case["x"], w13, w2, case["topk_weights"], case["topk_ids"])
    exact = split_moe_reference(**case)
    vs_stock = ((ours - stock).norm() / stock.norm()).item()
    stock_vs_exact = ((stock - exact).norm() / exact.norm()).item()
    assert stock_vs_exact > 2e-5, f"vLLM's fp32 MoE no longer multiplies in tf32 ({stock_vs_exact:.1e})"
    assert vs_stock < 2e-5, f"ours vs vLLM {vs_stock:.2e} (vLLM vs exact fp32 {stock_vs_exact:.2e})"


# ---- block-scaled FP8 experts ---------------------------------------------------------------
def make_fp8_case(T, H, I, E, K, e_local, device, seed=0, block=(128, 128), ue8m0=False):
    """The bf16 case plus its block-FP8 version: (fp8 kwargs, bf16 kwargs)."""
    case, _ = make_case(T, H, I, E, K, e_local, torch.bfloat16, device, seed=seed)
    fp8, scales = dict(case), {}
    for name in ("w13_local", "w2_local", "w13_recv", "w2_recv"):
        fp8[name], scales[name] = quantize_blocks_reference(case[name], *block)
    fp8["scales"] = BlockScales(**scales, block_n=block[0], block_k=block[1], ue8m0=ue8m0)
    return fp8, case


def test_ue8m0_activation_scales_are_the_next_power_of_two():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(7, 300, generator=g) * torch.logspace(-3, 3, 7)[:, None]
    q, plain = quantize_groups_reference(a, 128)
    q2, pow2 = quantize_groups_reference(a, 128, ue8m0=True)
    assert torch.equal(torch.exp2(torch.log2(pow2).round()), pow2)  # powers of two
    assert (pow2 >= plain).all() and (pow2 < 2 * plain).all()       # the next one up
    back = q2.float().view(7, -1) * pow2.repeat_interleave(128, 1)[:, :300]
    assert ((back - a).norm() / a.norm()) < 0.1
    assert not torch.equal(q.float(), q2.float())


def test_block_quantization_round_trip():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 300, 200, generator=g)
    q, scale = quantize_blocks_reference(w, 128, 128)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 3, 2)
    # Every block's largest |value| maps to the top of the FP8 range.
    assert torch.allclose(scale[:, 0, 0], w[:, :128, :128].abs().amax(dim=(1, 2)) / 448)
    back = q.float() * scale.repeat_interleave(128, 1)[:, :300].repeat_interleave(128, 2)[:, :, :200]
    rel = (back - w).norm() / w.norm()
    assert 1e-3 < rel < 4e-2, rel  # FP8 (3 mantissa bits) is lossy, but only that lossy


@pytest.mark.parametrize("T, H, I, E, K, e_local", [(9, 256, 128, 4, 2, 2), (40, 384, 256, 6, 3, 1)])
def test_fp8_reference_close_to_bf16(T, H, I, E, K, e_local):
    fp8, bf16 = make_fp8_case(T, H, I, E, K, e_local, "cpu")
    out = split_moe_reference(**fp8).float()
    ref = split_moe_reference(**bf16).float()
    rel = (out - ref).norm() / ref.norm()
    assert 1e-3 < rel < 0.08, rel  # quantisation error shows, and stays small


def test_fp8_weights_without_scales_raise():
    fp8, _ = make_fp8_case(4, 128, 128, 4, 2, 2, "cpu")
    fp8.pop("scales")
    with pytest.raises(ValueError, match="FP8 expert weights need their block scales"):
        split_moe_reference(**fp8)


def test_fp8_scales_of_wrong_shape_raise():
    fp8, _ = make_fp8_case(4, 256, 128, 4, 2, 2, "cpu")
    s = fp8["scales"]
    fp8["scales"] = BlockScales(s.w13_local[:, :1], s.w2_local, s.w13_recv, s.w2_recv)
    with pytest.raises(ValueError, match=r"w13_local: .* scales of shape \(2, 2, 2\)"):
        split_moe_reference(**fp8)


@pytest.mark.gpu
@pytest.mark.parametrize("T, H, I, E, K, e_local", [(1, 256, 128, 8, 2, 4), (300, 512, 256, 16, 4, 5),
                                                     (2048, 2048, 768, 32, 8, 16), (77, 384, 256, 8, 2, 8),
                                                     (50, 200, 128, 6, 2, 0)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_triton_fp8_matches_reference(T, H, I, E, K, e_local, ue8m0):
    fp8, _ = make_fp8_case(T, H, I, E, K, e_local, "cuda", seed=T, ue8m0=ue8m0)
    out = split_moe(**fp8)
    ref = split_moe_reference(**fp8)
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < 2e-2, f"relative error {err:.2e}"


# ---- tile choice ----------------------------------------------------------------------------
@pytest.mark.parametrize("fp8", [False, True])
def test_pick_config_is_valid_and_shrinks_for_few_rows_per_expert(fp8):
    def cfg(tokens):
        return pick_config(tokens, 8, 128, 2048, 768, fp8)

    for tokens in (1, 8, 64, 512, 2048, 8192, 16384, 10 ** 6):
        c = cfg(tokens)
        assert c.block_m >= 16 and c.block_m & (c.block_m - 1) == 0
        assert c.block_n >= 16 and c.block_k >= 16 and c.num_warps in (1, 2, 4, 8)
        if fp8:  # one K tile = one scale column; N tiles must not straddle scale blocks
            assert c.block_k == 128 and 128 % c.block_n == 0
        else:
            assert c.block_k == 64
    assert cfg(1).block_m < cfg(16384).block_m
    rows = [cfg(t).block_m for t in (1, 64, 512, 2048)]
    assert rows == sorted(rows)  # never smaller tiles for more tokens
    # Large steps: the tiles measured fastest on the H100 (h100-2026-11-25-1152/moe_kernel_rate_sweep.json).
    assert cfg(16384) == (KernelConfig(64, 128, 128, 8, 3) if fp8
                          else KernelConfig(128, 128, 64, 8, 4))
    # Only rows per expert matter: twice the experts, twice the tokens, same tiles.
    assert pick_config(512, 8, 64, 1, 1, fp8) == pick_config(1024, 8, 128, 1, 1, fp8)


@pytest.mark.parametrize("fp8", [False, True])
def test_candidate_configs_are_distinct_and_valid(fp8):
    cands = candidate_configs(fp8)
    assert len(set(cands)) == len(cands) >= 4
    for tokens in (1, 8, 64, 512, 2048, 8192, 16384):  # the sweep times what pick_config picks
        assert pick_config(tokens, 8, 128, 2048, 768, fp8) in cands
    for c in cands:
        if fp8:
            assert c.block_k == 128 and 128 % c.block_n == 0


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_triton_every_candidate_config_matches_reference(fp8):
    if fp8:
        case, _ = make_fp8_case(200, 512, 256, 16, 4, 7, "cuda", seed=5)
    else:
        case, _ = make_case(200, 512, 256, 16, 4, 7, torch.bfloat16, "cuda", seed=5)
    ref = split_moe_reference(**case).float()
    for c in candidate_configs(fp8):
        out = split_moe(**case, config=c).float()
        err = (out - ref).norm() / ref.norm()
        assert err < 2e-2, f"{c}: relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("ue8m0", [False, True])
def test_activation_quantisation_is_vllms(ue8m0):
    """The reference quantises activations exactly as vLLM's per-token-group quantiser (which
    stock vLLM's block-FP8 MoE uses), in both scale formats: same FP8 bytes, same scales."""
    fp8_utils = pytest.importorskip("vllm.model_executor.layers.quantization.utils.fp8_utils")
    g = torch.Generator(device="cuda").manual_seed(11)
    a = (torch.randn(64, 512, generator=g, device="cuda") * 3).to(torch.bfloat16)
    q_vllm, s_vllm = fp8_utils.per_token_group_quant_fp8(a, 128, use_ue8m0=ue8m0)
    q_ref, s_ref = quantize_groups_reference(a, 128, ue8m0=ue8m0)
    s_vllm = s_vllm.float().view(64, -1)
    if ue8m0:  # powers of two: exactly the same scales and bytes
        assert torch.equal(s_vllm, s_ref)
        assert torch.equal(q_vllm.view(torch.uint8), q_ref.contiguous().view(torch.uint8))
        return
    # Float scales: vLLM's CUDA kernel divides max|a| by 448 with fast math (within 2 ulp of
    # the correctly rounded quotient ours computes), so a value sitting on an FP8 rounding
    # boundary may land one code away; nothing else may differ.
    torch.testing.assert_close(s_vllm, s_ref, rtol=2.5e-7, atol=0)
    codes = lambda q: q.contiguous().view(torch.int8).int()  # noqa: E731 - sign-magnitude
    diff = (codes(q_vllm) - codes(q_ref)).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3

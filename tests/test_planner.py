"""The DWDP planner: its byte counts agree with what the pull benchmark moved, and its
predictions move the right way with step size, load spread and replication."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_dwdp.cli import main as cli_main
from vllm_dwdp.planner import MoeShape, break_even_tokens, predict

ROOT = Path(__file__).resolve().parents[1]
QWEN3_30B = MoeShape.from_config(json.loads((ROOT / "examples/configs/qwen3_30b_a3b.json").read_text()))


def test_pulled_bytes_match_the_measured_benchmark():
    measured = json.loads((ROOT / "benchmarks/results/dwdp_pull_bandwidth_h200.json").read_text())
    p = predict(QWEN3_30B, 2, 1, link_gbs=measured["pull_gbs_alone"])
    pulled = p.t_pull_ms / 1e3 * measured["pull_gbs_alone"] * 1e9
    assert pulled == pytest.approx(measured["bytes_per_layer"], rel=1e-9)
    assert p.t_pull_ms == pytest.approx(measured["pull_ms_per_layer_alone"], rel=0.02)


def test_predictions_move_the_right_way():
    be = break_even_tokens(QWEN3_30B, 2)
    assert predict(QWEN3_30B, 2, be // 2).speedup_vs_dep < predict(QWEN3_30B, 2, be * 2).speedup_vs_dep
    big = be * 4
    assert predict(QWEN3_30B, 4, big, load_cv=0.4).speedup_vs_dep > \
        predict(QWEN3_30B, 4, big, load_cv=0.0).speedup_vs_dep
    assert break_even_tokens(QWEN3_30B, 2, replication=0.5) < be  # fewer bytes to hide
    assert predict(QWEN3_30B, 2, be * 2).t_pull_ms < predict(QWEN3_30B, 8, be * 2).t_pull_ms


def test_cli_prints_a_table(capsys):
    assert cli_main(["plan", "--model", str(ROOT / "examples/configs/qwen3_30b_a3b.json"),
                     "--gpus", "4", "--load-cv", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "break-even: DWDP hides its pulls from" in out and "speedup" in out


def test_non_moe_config_is_refused(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2}))
    with pytest.raises(ValueError, match="is it a MoE model"):
        MoeShape.from_config(json.loads(cfg.read_text()))


# ---- measured MoE kernel rates (benchmarks/moe_kernel_rate.py JSON) -------------------------
def _bench_module():
    """benchmarks/moe_kernel_rate.py, for its row format (pure Python at import: no torch)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("moe_kernel_rate",
                                                  ROOT / "benchmarks/moe_kernel_rate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rates_json(tmp_path, rates, shape=QWEN3_30B, dtype="bf16", extra_rows=()):
    """A results file as the benchmark writes it: rates {impl: {tokens: TFLOP/s}}."""
    bench = _bench_module()
    sh = dict(model="m", hidden=shape.hidden, inter=shape.moe_intermediate,
              experts=shape.experts, top_k=shape.top_k)
    rows = []
    for impl, points in rates.items():
        for tokens, tflops in points.items():
            row = bench.make_row(sh, dtype, tokens, impl, shape.experts, 1)
            ms = row["flops"] / (tflops * 1e12) * 1e3
            rows.append(bench.set_timing(row, dict(ms=ms)))
            assert rows[-1]["tflops"] == pytest.approx(tflops)
    path = tmp_path / "rates.json"
    path.write_text(json.dumps(dict(benchmark=bench.BENCHMARK, gpu="Test GPU",
                                    rows=rows + list(extra_rows))))
    return path


RATES = {"ours_split": {1024: 200.0, 16384: 400.0}, "ours_local": {1024: 250.0, 16384: 450.0},
         "vllm": {1024: 300.0, 16384: 500.0}}


def test_kernel_rates_replace_the_constant_for_the_expert_gemms(tmp_path):
    from vllm_dwdp.planner import DEFAULT_GEMM_TFLOPS, load_kernel_rates

    failed = dict(hidden=QWEN3_30B.hidden, inter=QWEN3_30B.moe_intermediate,
                  experts=QWEN3_30B.experts, top_k=QWEN3_30B.top_k, dtype="bf16", tokens=1024,
                  impl="ours_split", tflops=None, error="OutOfResources: shared memory")
    other_shape = dict(failed, hidden=4096, tflops=1.0, error=None)
    rates = load_kernel_rates(str(_rates_json(tmp_path, RATES, extra_rows=[failed, other_shape])),
                              QWEN3_30B, "bf16")
    assert rates.gpu == "Test GPU"
    assert rates.rates["ours_split"] == ((1024, 200.0), (16384, 400.0))  # bad rows skipped
    moe = QWEN3_30B.expert_flops_per_token()
    for tokens, ours, vllm in ((1000, 200.0, 300.0), (20000, 400.0, 500.0)):
        p = predict(QWEN3_30B, 2, tokens, kernel_rates=rates)
        base = predict(QWEN3_30B, 2, tokens)
        other_s = base.t_compute_ms / 1e3 - tokens * moe / (DEFAULT_GEMM_TFLOPS * 1e12)
        assert p.t_compute_ms == pytest.approx((other_s + tokens * moe / (ours * 1e12)) * 1e3)
        assert p.t_compute_dep_ms == pytest.approx((other_s + tokens * moe / (vllm * 1e12)) * 1e3)
        assert p.t_pull_ms == base.t_pull_ms and p.t_a2a_ms == base.t_a2a_ms
    # Nearest step size in log scale; an exact tie goes to the smaller step.
    assert rates.tflops("dwdp", 4096) == 200.0 and rates.tflops("dwdp", 5000) == 400.0
    assert rates.tflops("dep", 1) == 300.0 and rates.tflops("dep", 10 ** 6) == 500.0


def test_without_kernel_rates_nothing_changes():
    from vllm_dwdp.planner import DEFAULT_GEMM_TFLOPS

    for tokens in (1, 4096, 32768):
        p = predict(QWEN3_30B, 4, tokens, load_cv=0.2)
        want = tokens * QWEN3_30B.flops_per_token(8192 / 2) / (DEFAULT_GEMM_TFLOPS * 1e12) * 1e3
        assert p.t_compute_ms == pytest.approx(want, rel=1e-12)
        assert p.t_compute_dep_ms == p.t_compute_ms


def test_kernel_rates_fallbacks_and_dtype(tmp_path):
    from vllm_dwdp.planner import load_kernel_rates

    only_local = load_kernel_rates(str(_rates_json(tmp_path, {"ours_local": {64: 50.0}})),
                                   QWEN3_30B, "bf16")
    assert only_local.impl_for("dwdp") == only_local.impl_for("dep") == "ours_local"
    fp8 = load_kernel_rates(str(_rates_json(tmp_path, RATES, dtype="fp8")), QWEN3_30B, "fp8")
    assert fp8.dtype == "fp8" and fp8.tflops("dwdp", 1024) == 200.0
    with pytest.raises(ValueError, match=r"no measured rate of our kernel for H=2048 I=768 E=128 "
                                         r"K=8 bf16 \(it has: H=2048 I=768 E=128 K=8 fp8\)"):
        load_kernel_rates(str(tmp_path / "rates.json"), QWEN3_30B, "bf16")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"pull_gbs_alone": 389.0}))
    with pytest.raises(ValueError, match="not a JSON written by benchmarks/moe_kernel_rate.py"):
        load_kernel_rates(str(other), QWEN3_30B, "bf16")


def test_break_even_with_measured_rates_is_where_the_pull_hides(tmp_path):
    from vllm_dwdp.planner import load_kernel_rates

    rates = load_kernel_rates(str(_rates_json(tmp_path, RATES)), QWEN3_30B, "bf16")
    be = break_even_tokens(QWEN3_30B, 2, kernel_rates=rates)
    hides = lambda t: (lambda p: p.t_compute_ms >= p.t_pull_ms)(  # noqa: E731
        predict(QWEN3_30B, 2, t, kernel_rates=rates))
    assert hides(be) and not hides(be - 1)
    # Slower measured kernels than the 690 TFLOP/s constant: the pull hides sooner.
    assert be < break_even_tokens(QWEN3_30B, 2)


def test_cli_plan_with_kernel_rates(tmp_path, capsys):
    model = str(ROOT / "examples/configs/qwen3_30b_a3b.json")
    path = _rates_json(tmp_path, RATES)
    assert cli_main(["plan", "--model", model, "--gpus", "2", "--kernel-rates", str(path)]) == 0
    out = capsys.readouterr().out
    assert "expert GEMMs at measured bf16 kernel rates" in out
    assert "DWDP ours_split, DP+EP vllm" in out
    assert "ours TF/s" in out and "speedup" in out
    assert cli_main(["plan", "--model", model, "--gpus", "2"]) == 0
    assert "measured" not in capsys.readouterr().out
    # A file without rows for this shape (the 235B model): one clear message, no traceback.
    with pytest.raises(SystemExit, match=r"--kernel-rates: .* no measured rate of our kernel "
                                         r"for H=4096 I=1536"):
        cli_main(["plan", "--model", str(ROOT / "examples/configs/qwen3_235b_a22b.json"),
                  "--gpus", "2", "--kernel-rates", str(path)])

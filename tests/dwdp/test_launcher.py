"""`vllm-dwdp serve`: two DWDP engines behind vllm-router's OpenAI endpoint, against stock vLLM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from examples.ask import complete, wait_ready
from examples.tiny_moe import main as build_tiny_moe
from tests.harness import pool
from tests.harness.equality import run_engines
from tests.harness.results import record_result

PROMPTS = [[48, 106, 7, 2, 100, 110], [5, 6, 7, 8, 9, 10, 11, 12, 13]]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu_2)])
def test_openai_endpoint_serves_dwdp_ranks_equal_to_stock(tmp_path, device):
    model = str(tmp_path / "tiny-moe")
    build_tiny_moe(model)
    stock_spec = dict(model=model, prompts=PROMPTS, max_tokens=8, text=True, device=device,
                      env={"VLLM_PLUGINS": ""})
    if device == "cpu":  # stock vLLM starts now, beside the launcher's engines
        stock_run = pool.submit(stock_spec, name="stock")
    else:  # one GPU: the stock engine first, alone
        stock = run_engines({"stock": stock_spec})["stock"]
    port = 18000 + os.getpid() % 1000 * 12
    args = [sys.executable, "-m", "vllm_dwdp.cli", "serve", model, "--port", str(port),
            "--group", f"launch{port}", "--max-model-len", "256", "--enforce-eager"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")
    if device == "cpu":
        args += ["--num-ranks", "2"]
    else:
        args += ["--num-ranks", "2", "--gpu-memory-utilization", "0.3"]
    log = open(tmp_path / "launcher.log", "w")
    server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    rank_url = {rank: f"http://127.0.0.1:{port + 1 + rank}" for rank in (0, 1)}
    try:
        wait_ready(base, timeout=600)
        answers = {}
        for rank in (0, 1):  # each rank on its own port, as a client that wants one rank does
            for i, prompt in enumerate(PROMPTS):
                body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 8,
                                   "temperature": 0, "ignore_eos": True}).encode()
                req = urllib.request.Request(rank_url[rank] + "/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=300) as r:
                    assert r.headers["X-DWDP-Rank"] == str(rank)
                    answers[rank, i] = json.load(r)["choices"][0]["text"]
        # Through the router: the old pinning header is refused by the rank with a message.
        req = urllib.request.Request(base + "/v1/completions", data=body, headers={
            "Content-Type": "application/json", "X-DWDP-Rank": "1"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=60)
        refused_body = refused.value.read().decode()
        with urllib.request.urlopen(base + "/workers", timeout=10) as r:
            workers = json.load(r)["workers"]
        metrics = {}
        for rank in (0, 1):
            with urllib.request.urlopen(rank_url[rank] + "/metrics", timeout=30) as r:
                metrics[rank] = r.read().decode()
        unpinned = complete(base, model, "how fast is the expert pull")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            rc = server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            rc = "hung"
        log.close()
    launcher_log = (tmp_path / "launcher.log").read_text()
    if device == "cpu":
        stock = pool.result(stock_run)
    for (rank, i), text in answers.items():
        assert text == stock["outputs"][i]["text"], (
            f"rank {rank} prompt {i}: {text!r} != stock {stock['outputs'][i]['text']!r}")
    assert refused.value.code == 400 and "X-DWDP-Rank" in refused_body, refused_body
    assert sorted((w["url"], w["is_healthy"]) for w in workers) == \
        [(rank_url[0], True), (rank_url[1], True)]
    assert unpinned["choices"][0]["text"] and unpinned["served_by_rank"] in ("0", "1")
    assert "connected to peers" in launcher_log
    for rank in (0, 1):  # each rank's /metrics carries its worker's DWDP counters
        pulled = [line for line in metrics[rank].splitlines()
                  if line.startswith("vllm:dwdp_bytes_pulled_total{")]
        assert pulled and all(float(line.rsplit(" ", 1)[1]) > 0 for line in pulled), \
            metrics[rank][-2000:]
        assert f'dwdp_rank="{rank}"' in pulled[0]
    assert rc == 0, f"launcher did not stop cleanly ({rc}):\n{launcher_log[-3000:]}"
    record_result(f"dwdp_launcher_{device}", {
        "tokens_equal": True, "num_ranks": 2, "prompts": len(PROMPTS),
        "answers": {f"rank{r}_prompt{i}": t for (r, i), t in answers.items()},
    })

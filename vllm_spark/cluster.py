"""Ray head and workers over SSH, each bound to its cluster-network address; and teardown.

``up`` runs preflight, writes a fresh Ray auth token (0600) to every node, starts the head
(``ray start --head --node-ip-address <cluster address>``, dashboard on ``dashboard_host``,
127.0.0.1 by default) and then the workers, and waits until Ray sees every node alive.
``down`` stops the server and every process whose command line names this node's Ray temp
dir (so other Ray clusters on the same machine are left alone; ``ray stop`` would kill them).
"""

from __future__ import annotations

import json
import secrets
import shlex
import time

from vllm_spark import remote
from vllm_spark.inventory import Inventory, Node
from vllm_spark.preflight import PreflightFailed, Report, node_envs, run_preflight

RAY = ["-m", "ray.scripts.scripts"]

# Runs on a node: SIGTERM, then SIGKILL, every process whose command line or environment
# contains one of argv[1:] (Ray renames its workers' titles, but they inherit the environment).
# The needles arrive hex-encoded so that no command line (this one's shell) contains them.
KILL_MATCHING = r"""
import os, signal, sys, time
needles, me = [bytes.fromhex(a) for a in sys.argv[1:]], os.getpid()
def matching():
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(pid) == me:
                continue
            blob = open(f"/proc/{pid}/cmdline", "rb").read()
            blob += open(f"/proc/{pid}/environ", "rb").read()
            if any(n in blob for n in needles):
                out.append(int(pid))
        except OSError:
            pass
    return out
pids = matching()
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid in pids:
        try: os.kill(pid, sig)
        except OSError: pass
    deadline = time.time() + 8
    while time.time() < deadline and (pids := matching()):
        time.sleep(0.3)
print(len(pids))
"""

# Runs on the head: the alive Ray nodes as JSON [{"ip": ..., "resources": {...}}].
LIST_NODES = r"""
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps([{"ip": n["NodeManagerAddress"], "resources": n["Resources"]}
                  for n in ray.nodes() if n["Alive"]]))
"""


def ray_start_argv(inv: Inventory, node: Node, address: str, head_address: str) -> list[str]:
    argv = [node.python, *RAY, "start", "--node-ip-address", address,
            "--temp-dir", node.ray_temp_dir, "--num-gpus", str(node.num_gpus),
            "--disable-usage-stats"]
    if node is inv.head:
        argv += ["--head", "--port", str(inv.ray_port), "--dashboard-host", inv.dashboard_host,
                 "--dashboard-port", str(inv.dashboard_port)]
    else:
        argv += ["--address", f"{head_address}:{inv.ray_port}"]
    return argv


def gcs_address(inv: Inventory, report: Report) -> str:
    return f"{report.facts[inv.head.name]['address']}:{inv.ray_port}"


def list_nodes(inv: Inventory, report: Report, env: dict[str, str]) -> list[dict]:
    head = inv.head
    res = remote.run(head, [head.python, "-c", LIST_NODES, gcs_address(inv, report)], env=env,
                     timeout=60, check=False)
    if res.rc != 0:
        raise remote.NodeError(head.name, f"cannot reach Ray at {gcs_address(inv, report)}: "
                               f"{res.last_line()}", "is the cluster up? `vllm-spark up`")
    return json.loads(res.stdout.strip().splitlines()[-1])


def up(inv: Inventory, *, nccl_debug: bool = False, timeout: float = 120,
       log=print) -> Report:
    """Preflight, then start Ray on every node; returns the preflight report (facts)."""
    report = run_preflight(inv, model_check=inv.head.model is not None)
    for line in report.lines():
        log(line)
    if not report.ok:
        raise PreflightFailed(report)
    envs = node_envs(inv, report.facts, nccl_debug)
    token = secrets.token_hex(32)
    for node in inv.nodes:
        remote.write_file(node, node.token_path, token + "\n")
    head_address = report.facts[inv.head.name]["address"]
    for node in inv.nodes:
        address = report.facts[node.name]["address"]
        log(f"{node.name}: ray start on {address} ({report.facts[node.name]['interface']})")
        res = remote.run(node, ray_start_argv(inv, node, address, head_address), env=envs[node.name],
                         timeout=120, check=False)
        if res.rc != 0:
            down(inv, log=lambda _: None)
            raise remote.NodeError(node.name, f"ray start failed: {res.last_line()}",
                                   f"see {node.ray_temp_dir}/session_latest/logs on the node")
    deadline = time.time() + timeout
    while True:
        alive = list_nodes(inv, report, envs[inv.head.name])
        ips = {n["ip"] for n in alive}
        missing = [n.name for n in inv.nodes if report.facts[n.name]["address"] not in ips]
        if not missing:
            log(f"Ray cluster up: {len(alive)} nodes, GCS {gcs_address(inv, report)}, "
                f"dashboard {inv.dashboard_host}:{inv.dashboard_port}, token auth on")
            return report
        if time.time() > deadline:
            down(inv, log=lambda _: None)
            raise remote.NodeError(missing[0], f"Ray node did not join within {timeout:.0f} s",
                                   f"check the firewall lets {missing[0]} reach "
                                   f"{gcs_address(inv, report)} and the node's raylet log")
        time.sleep(1.0)


def stop_node(node: Node) -> int:
    """Stop this cluster's processes on ``node``; returns how many would not die."""
    script = "\n".join([
        f"if [ -f {shlex.quote(node.state_dir)}/serve.pid ]; then "
        f"kill -TERM -- -$(cat {shlex.quote(node.state_dir)}/serve.pid) 2>/dev/null; "
        f"rm -f {shlex.quote(node.state_dir)}/serve.pid; fi",
        f"{shlex.quote(node.python)} -c {shlex.quote(KILL_MATCHING)} "
        f"{(node.ray_temp_dir + '/').encode().hex()} "
        f"{('RAY_AUTH_TOKEN_PATH=' + node.token_path).encode().hex()}",
    ])
    res = remote.run_script(node, script, timeout=60, check=False)
    left = [ln for ln in res.stdout.split() if ln.isdigit()]
    return sum(int(x) for x in left)


def down(inv: Inventory, log=print) -> bool:
    """Stop the server and Ray on every node (workers first); True if all stopped."""
    ok = True
    for node in [*inv.workers, inv.head]:
        try:
            left = stop_node(node)
            log(f"{node.name}: stopped" + (f" ({left} processes would not die)" if left else ""))
            ok &= left == 0
        except remote.NodeError as e:
            log(str(e))
            ok = False
    return ok


def status(inv: Inventory, log=print) -> list[dict]:
    report = run_preflight(inv, ports=[], model_check=False)
    if inv.head.name not in report.facts:
        raise PreflightFailed(report)
    envs = node_envs(inv, report.facts) if report.ok else {
        inv.head.name: {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": inv.head.token_path}}
    alive = list_nodes(inv, report, envs[inv.head.name])
    by_ip = {n["ip"]: n for n in alive}
    for node in inv.nodes:
        addr = report.facts.get(node.name, {}).get("address")
        n = by_ip.get(addr)
        log(f"{node.name} {addr}: " + (f"alive, {n['resources'].get('GPU', 0):g} GPU, "
                                       f"{n['resources'].get('CPU', 0):g} CPU" if n else "NOT in Ray"))
    return alive

"""Ray head and workers over SSH, each bound to its cluster-network address; and teardown.

``up`` runs preflight, writes a fresh Ray auth token to every node (a 0600 file created
exclusively in the node's private state dir), starts the head (``ray start --head --block
--node-ip-address <cluster address>``, dashboard on ``dashboard_host``, 127.0.0.1 by
default; every Ray port pinned, see :func:`ray_ports`) and then the workers, each in its own
session whose pid is recorded, and waits until Ray sees every node alive. ``down`` stops
exactly those sessions (and the server's), by the recorded pid and start time: other Ray
clusters on the same machine are left alone (``ray stop`` would kill them).
"""

from __future__ import annotations

import json
import secrets
import time

from vllm_spark import netenv, remote
from vllm_spark.inventory import Inventory, Node
from vllm_spark.preflight import PreflightFailed, Report, node_envs, run_preflight

RAY = ["-m", "ray.scripts.scripts"]
RAY_STARTED = "Ray runtime started."
# Detached sessions vllm-spark starts on a node (state_dir/<name>.pid, .log).
SERVE, RAY_NODE = "serve", "ray"

# Runs on the head: the alive Ray nodes as JSON [{"ip": ..., "resources": {...}}].
LIST_NODES = r"""
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps([{"ip": n["NodeManagerAddress"], "resources": n["Resources"]}
                  for n in ray.nodes() if n["Alive"]]))
"""


def ray_ports(inv: Inventory) -> dict[str, int | tuple[int, int]]:
    """Every port a Ray node listens on, pinned next to ``ray_port`` so that a firewall can
    name them (Ray's gRPC servers listen on all interfaces; see ``vllm-spark firewall``)."""
    p = inv.ray_port
    return {"gcs": p, "node_manager": p + 1, "object_manager": p + 2, "metrics_export": p + 3,
            "dashboard_agent_grpc": p + 4, "dashboard_agent_listen": p + 5,
            "runtime_env_agent": p + 6, "ray_client_server": p + 7,
            "workers": (p + 100, p + 1099)}


def ray_start_argv(inv: Inventory, node: Node, address: str, head_address: str) -> list[str]:
    ports = ray_ports(inv)
    argv = [node.python, *RAY, "start", "--block", "--node-ip-address", address,
            "--temp-dir", node.ray_temp_dir, "--num-gpus", str(node.num_gpus),
            "--disable-usage-stats",
            "--node-manager-port", str(ports["node_manager"]),
            "--object-manager-port", str(ports["object_manager"]),
            "--metrics-export-port", str(ports["metrics_export"]),
            "--dashboard-agent-grpc-port", str(ports["dashboard_agent_grpc"]),
            "--dashboard-agent-listen-port", str(ports["dashboard_agent_listen"]),
            "--runtime-env-agent-port", str(ports["runtime_env_agent"]),
            "--min-worker-port", str(ports["workers"][0]),
            "--max-worker-port", str(ports["workers"][1])]
    if node is inv.head:
        argv += ["--head", "--port", str(inv.ray_port), "--dashboard-host", inv.dashboard_host,
                 "--dashboard-port", str(inv.dashboard_port),
                 "--ray-client-server-port", str(ports["ray_client_server"])]
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
        remote.write_secret(node, node.token_path, token + "\n")
    head_address = report.facts[inv.head.name]["address"]
    for node in inv.nodes:
        if remote.detached_state(node, RAY_NODE) != "DEAD":
            raise remote.NodeError(node.name, "Ray from an earlier `vllm-spark up` still runs",
                                   f"`vllm-spark down -i {inv.path or 'INVENTORY'}` first")
    try:
        for node in inv.nodes:
            address = report.facts[node.name]["address"]
            log(f"{node.name}: ray start on {address} ({report.facts[node.name]['interface']})")
            remote.start_detached(node, RAY_NODE,
                                  ray_start_argv(inv, node, address, head_address),
                                  envs[node.name])
            wait_started(node, RAY_NODE, RAY_STARTED, timeout=120)
    except remote.NodeError:
        down(inv, log=lambda _: None)
        raise
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


def wait_started(node: Node, name: str, needle: str, timeout: float) -> None:
    """Wait until the detached ``name`` logs ``needle``; NodeError (and teardown of what
    was started) if it exits first or takes longer than ``timeout``."""
    deadline = time.time() + timeout
    while (state := remote.detached_state(node, name, needle)) != "UP":
        if state == "DEAD" or time.time() > deadline:
            tail = remote.tail(node, name).replace("\n", " | ")[-600:]
            what = "exited" if state == "DEAD" else f"not started within {timeout:.0f} s"
            raise remote.NodeError(node.name, f"{name} {what}: {tail}",
                                   f"read {node.state_dir}/{name}.log on {node.name}")
        time.sleep(0.5)


def stop_node(node: Node) -> int:
    """Stop the server and Ray sessions vllm-spark recorded on ``node``; returns how many
    processes would not die."""
    remote.prepare_state_dir(node)
    return remote.stop_recorded(node, [SERVE, RAY_NODE, PROBE])


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
    report = run_preflight(inv, ports=[], model_check=False, tokens=True)
    for line in report.lines():
        if line.startswith("ERROR"):
            log(line)
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


PROBE = "ncclprobe"


def nccl_probe(inv: Inventory, *, mb: float = 256, iters: int = 20, timeout: float = 300,
               log=print) -> dict:
    """Run :mod:`vllm_spark.nccl_probe` on every node at once; returns rank 0's result with
    ``transport`` ('ib', 'socket', or 'gloo' on CPU nodes) and logs one verdict line."""
    report = run_preflight(inv, ports=[], model_check=False)
    if not report.ok:
        raise PreflightFailed(report)
    envs = node_envs(inv, report.facts)
    master = report.facts[inv.head.name]["address"]
    port = inv.master_port + 1
    for rank, node in enumerate(inv.nodes):
        env = {**envs[node.name], "NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET"}
        remote.start_detached(node, PROBE, [node.python, "-m", "vllm_spark.nccl_probe",
                                            str(rank), str(len(inv.nodes)), master, str(port),
                                            str(mb), str(iters)], env)
    deadline = time.time() + timeout
    pending = list(inv.nodes)
    while pending:
        pending = [n for n in pending if remote.detached_state(n, PROBE) != "DEAD"]
        if pending and time.time() > deadline:
            for n in inv.nodes:
                remote.stop_recorded(n, [PROBE], grace=2)
            raise remote.NodeError(pending[0].name, f"NCCL probe did not finish within "
                                   f"{timeout:.0f} s", f"read {pending[0].state_dir}/"
                                   f"{PROBE}.log; check the firewall lets the nodes reach "
                                   f"{master}:{port}")
        time.sleep(0.5)
    logs = {n.name: remote.run(n, ["cat", f"{n.state_dir}/{PROBE}.log"], check=False).stdout
            for n in inv.nodes}
    results = {}
    for name, text in logs.items():
        for line in text.splitlines():
            if line.startswith('{"probe": "allreduce"'):
                results[name] = json.loads(line)
    for n in inv.nodes:
        if n.name not in results:
            tail = logs[n.name].strip().splitlines()[-3:]
            raise remote.NodeError(n.name, f"NCCL probe failed: {' | '.join(tail)}",
                                   f"read {n.state_dir}/{PROBE}.log on {n.name}")
    head = results[inv.head.name]
    transport = ("gloo" if head["backend"] == "gloo" else
                 netenv.nccl_transport("\n".join(logs.values())) or "unknown")
    head["transport"] = transport
    size = f"{head['bytes'] / (1 << 20):.0f} MiB all-reduce x {iters}"
    bw = f"{head['busbw_GBps']:.2f} GB/s bus bandwidth"
    names = " <-> ".join(n.name for n in inv.nodes)
    if transport == "ib":
        log(f"NCCL probe {names}: RDMA (NET/IB), {bw} ({size})")
    elif transport == "socket":
        log(f"ERROR {inv.head.name}: NCCL probe {names} used sockets (NET/Socket), {bw} "
            f"({size}) -> fix: check the RDMA devices (/sys/class/infiniband, `ibdev2netdev`) "
            "and NCCL_IB_HCA on every node (`vllm-spark preflight`)")
    elif transport == "gloo":
        log(f"NCCL probe {names}: no CUDA, so Gloo over TCP (no NCCL on these nodes), {bw} "
            f"({size})")
    else:
        log(f"note  {inv.head.name}: NCCL probe {names}: {bw} ({size}), NCCL printed no "
            "transport line -> fix: check NCCL_DEBUG is not overridden in env")
    return head

"""Preflight: probe every node at once and report each problem as one line (node, what, fix).

Checked before anything starts: SSH reachability; the same Python / vLLM / Ray / vllm-dwdp
everywhere (and a Ray with token authentication); the cluster interface present, up, with an
address and the same MTU on all nodes; RDMA devices behind it (else a note that NCCL will use
sockets); the model present and identical (manifest of sizes and hashes of the config/index
files, optionally of every file); memory for the model's share; the head's ports free.
"""

from __future__ import annotations

import ipaddress
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vllm_spark import netenv, remote
from vllm_spark.inventory import Inventory, Node
from vllm_spark.probe import WEIGHT_SUFFIXES

GiB = 1 << 30
# Each node holds its share of the weights plus activations, KV cache and runtime.
MEMORY_HEADROOM = 1.10


@dataclass
class Problem:
    node: str
    what: str
    fix: str
    fatal: bool = True

    def line(self) -> str:
        return f"{'ERROR' if self.fatal else 'note '} {self.node}: {self.what} -> fix: {self.fix}"


@dataclass
class Report:
    facts: dict[str, dict] = field(default_factory=dict)  # node name -> probe output
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.fatal for p in self.problems)

    def lines(self) -> list[str]:
        return [p.line() for p in sorted(self.problems, key=lambda p: not p.fatal)]


class PreflightFailed(RuntimeError):
    def __init__(self, report: Report):
        self.report = report
        super().__init__("preflight failed:\n" + "\n".join(report.lines()))


def probe_node(node: Node, *, ports: list[int], full_hash: bool, model: str | None,
               timeout: float = 120) -> dict:
    args = {"interface": node.interface, "subnet": node.subnet, "address": node.address,
            "model": model, "full_hash": full_hash, "ports": ports}
    source = (Path(__file__).parent / "probe.py").read_text()
    res = remote.run(node, [node.python, "-", json.dumps(args)], stdin=source,
                     timeout=timeout, check=False)
    if res.rc != 0:
        if res.rc == 127 or "No such file" in res.stderr or "not found" in res.stderr:
            raise remote.NodeError(node.name, f"Python {node.python!r} not found",
                                   f"set hosts[{node.name}].python to the interpreter with "
                                   "vLLM and Ray (e.g. ~/venv/bin/python)")
        raise remote.NodeError(node.name, f"probe failed: {res.last_line()}",
                               f"run `{node.python} -V` on the node")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _weights_bytes(manifest: dict) -> int:
    return sum(e["size"] for rel, e in manifest.items() if rel.endswith(WEIGHT_SUFFIXES))


def check_versions(inv: Inventory, facts: dict[str, dict]) -> list[Problem]:
    out = []
    head = inv.head.name
    ref = facts.get(head)
    for node in inv.nodes:
        f = facts.get(node.name)
        if f is None:
            continue
        py = f"hosts[{node.name}].python"
        for pkg in ("vllm", "ray"):
            if not f["versions"][pkg]:
                out.append(Problem(node.name, f"{pkg} is not installed for {f['python_path']}",
                                   f"install it there (`{f['python_path']} -m pip install "
                                   f"{pkg}`) or point {py} at the right venv"))
        if ref is None or node.name == head:
            continue
        if f["python"].split(".")[:2] != ref["python"].split(".")[:2]:
            out.append(Problem(node.name, f"Python {f['python']} here, {ref['python']} on "
                               f"{head} (Ray needs the same Python on every node)",
                               f"use Python {ref['python']} on {node.name} ({py})"))
        elif f["python"] != ref["python"]:
            out.append(Problem(node.name, f"Python {f['python']} here, {ref['python']} on "
                               f"{head}", "same minor version, usually fine; align if Ray "
                               "complains", fatal=False))
        for pkg in ("vllm", "ray", "vllm-dwdp", "torch"):
            mine, theirs = f["versions"][pkg], ref["versions"][pkg]
            if mine and theirs and mine != theirs or (pkg == "vllm-dwdp" and mine != theirs):
                out.append(Problem(node.name, f"{pkg} {mine or 'missing'} here, "
                                   f"{theirs or 'missing'} on {head}",
                                   f"install {pkg}=={theirs} on {node.name}" if theirs else
                                   f"install the same {pkg} on {head} and {node.name}"))
    if ref and ref["versions"]["ray"]:
        from packaging.version import Version

        if Version(ref["versions"]["ray"]) < Version(netenv.MIN_RAY_FOR_TOKEN_AUTH):
            out.append(Problem(head, f"Ray {ref['versions']['ray']} has no token "
                               "authentication (RAY_AUTH_MODE=token)",
                               f"pip install 'ray[default]>={netenv.MIN_RAY_FOR_TOKEN_AUTH}' "
                               "on every node"))
    return out


def check_network(inv: Inventory, facts: dict[str, dict]) -> list[Problem]:
    out = []
    mtus = {}
    for node in inv.nodes:
        f = facts.get(node.name)
        if f is None:
            continue
        have = ", ".join(f"{n} ({'/'.join(i['ipv4']) or 'no IPv4'})"
                         for n, i in f["interfaces"].items() if n != "lo")
        iface = f["interface"]
        if iface is None:
            wanted = (f"interface {node.interface!r} does not exist" if node.interface else
                      f"no interface has an address in subnet {node.subnet}")
            out.append(Problem(node.name, wanted + f" (have: {have})",
                               f"set hosts[{node.name}].interface to the ConnectX-7 port "
                               "that carries the cluster network (see `ip -br addr`)"))
            continue
        info = f["interfaces"][iface]
        if info["operstate"] not in ("UP", "UNKNOWN") or "UP" not in info["flags"]:
            out.append(Problem(node.name, f"interface {iface} is {info['operstate']}",
                               f"`sudo ip link set {iface} up` and check the cable"))
        if not info["ipv4"]:
            out.append(Problem(node.name, f"interface {iface} has no IPv4 address",
                               f"give {iface} an address on the cluster subnet (netplan / "
                               f"`sudo ip addr add 192.168.100.X/24 dev {iface}`)"))
        elif node.address and not any(
                ipaddress.ip_address(node.address) in ipaddress.ip_interface(c).network
                for c in info["ipv4"]):
            out.append(Problem(node.name, f"address {node.address} is not on {iface}'s network "
                               f"({', '.join(info['ipv4'])})",
                               f"fix hosts[{node.name}].address or the interface"))
        if node.subnet and info["ipv4"] and not any(
                ipaddress.ip_interface(c).ip in ipaddress.ip_network(node.subnet, strict=False)
                for c in info["ipv4"]):
            out.append(Problem(node.name, f"{iface} has no address in {node.subnet}",
                               "make the interface and the subnet agree"))
        mtus[node.name] = info["mtu"]
        speed = info.get("speed_mbps")
        if speed and 0 < speed < 100_000:
            out.append(Problem(node.name, f"{iface} reports {speed} Mb/s: not a 200 GbE "
                               "ConnectX-7 port (10G or management NIC?)",
                               "use the ConnectX-7 port (ethtool shows 200000Mb/s)",
                               fatal=False))
        if not info["rdma"]:
            out.append(Problem(node.name, f"no RDMA device behind {iface} "
                               "(/sys/class/infiniband): NCCL will use sockets",
                               "for RDMA use the ConnectX-7 port with mlx5 drivers loaded "
                               "(`ibdev2netdev`)", fatal=False))
    if len(set(mtus.values())) > 1:
        ref = mtus.get(inv.head.name)
        for name, mtu in mtus.items():
            if mtu != ref:
                out.append(Problem(name, f"MTU {mtu} on the cluster interface, {ref} on "
                                   f"{inv.head.name}", f"set the same MTU everywhere (`sudo ip "
                                   f"link set {facts[name]['interface']} mtu {ref}`)"))
    # NCCL_SOCKET_IFNAME lists every node's cluster port; none may be another network here.
    names = {facts[n.name]["interface"] for n in inv.nodes
             if facts.get(n.name) and facts[n.name]["interface"]}
    for node in inv.nodes:
        f = facts.get(node.name)
        if f and f["interface"]:
            for other in names - {f["interface"]}:
                if other in f["interfaces"]:
                    out.append(Problem(node.name, f"{other} (another node's cluster port) is a "
                                       f"different interface here; NCCL_SOCKET_IFNAME would "
                                       f"match both", "give the cluster ports the same name "
                                       "on every node, or rename the clashing one"))
    return out


def check_model(inv: Inventory, facts: dict[str, dict]) -> list[Problem]:
    out = []
    head = inv.head
    ref = facts.get(head.name, {}).get("model") if head.name in facts else None
    if head.model is None:
        return [Problem(head.name, "no model in the inventory",
                        "add `model: /path/to/model` to cluster (or the host)")]
    if head.name in facts and ref is None:
        return [Problem(head.name, f"model directory {head.model} not found",
                        "download it there first (e.g. `huggingface-cli download MODEL "
                        f"--local-dir {head.model}`)")]
    if not ref:
        return out
    if "config.json" not in ref:
        out.append(Problem(head.name, f"{head.model} has no config.json",
                           "point `model` at the directory holding config.json"))
    for node in inv.workers:
        f = facts.get(node.name)
        if f is None:
            continue
        mine = f["model"]
        sync = f"`vllm-spark sync-model -i {inv.path or 'INVENTORY'}` (copies from " \
               f"{head.name} over the cluster network)"
        if mine is None:
            out.append(Problem(node.name, f"model directory {node.model} not found", sync))
            continue
        missing = sorted(set(ref) - set(mine))
        differ = sorted(k for k in set(ref) & set(mine) if ref[k] != mine[k])
        if missing or differ:
            what = (f"{len(missing)} file(s) missing (e.g. {missing[0]})" if missing else
                    f"{len(differ)} file(s) differ from {head.name} (e.g. {differ[0]})")
            out.append(Problem(node.name, f"model at {node.model}: {what}", sync))
    total = _weights_bytes(ref)
    if total:
        need = total / len(inv.nodes) * MEMORY_HEADROOM
        for node in inv.nodes:
            avail = facts.get(node.name, {}).get("mem_available")
            if avail is not None and avail < need:
                out.append(Problem(node.name, f"MemAvailable {avail / GiB:.1f} GiB < "
                                   f"{need / GiB:.1f} GiB needed (weights {total / GiB:.1f} GiB "
                                   f"/ {len(inv.nodes)} nodes + 10%)",
                                   "stop other jobs / drop the page cache (`sync; echo 3 | "
                                   "sudo tee /proc/sys/vm/drop_caches`) or add nodes"))
    return out


def check_ports(inv: Inventory, facts: dict[str, dict], ports: list[int]) -> list[Problem]:
    f = facts.get(inv.head.name)
    if not f:
        return []
    keys = {inv.ray_port: "ray_port", inv.dashboard_port: "dashboard_port",
            inv.serve_port: "serve_port"}
    return [Problem(inv.head.name, f"port {p} (cluster.{keys.get(p, 'port')}) is in use on "
                    f"{f['address']}", f"stop what holds it (`ss -ltnp | grep :{p}`) or set "
                    f"cluster.{keys.get(p, 'port')} to a free port")
            for p in ports if f["ports_free"].get(str(p)) is False]


def run_preflight(inv: Inventory, *, ports: list[int] | None = None, full_hash: bool = False,
                  model_check: bool = True) -> Report:
    """Probe all nodes concurrently and run every check; never raises for node problems."""
    report = Report()
    ports = [inv.ray_port, inv.dashboard_port, inv.serve_port] if ports is None else ports

    def one(node: Node):
        try:
            facts = probe_node(node, ports=ports if node is inv.head else [],
                               full_hash=full_hash, model=node.model if model_check else None)
            remote.prepare_state_dir(node)
            return node.name, facts, None
        except remote.NodeError as e:
            return node.name, None, Problem(e.node, e.what, e.fix)

    with ThreadPoolExecutor(max_workers=min(16, len(inv.nodes))) as pool:
        for name, facts, problem in pool.map(one, inv.nodes):
            if problem:
                report.problems.append(problem)
            else:
                report.facts[name] = facts
    report.problems += check_versions(inv, report.facts)
    report.problems += check_network(inv, report.facts)
    if model_check:
        report.problems += check_model(inv, report.facts)
    report.problems += check_ports(inv, report.facts, ports)
    return report


def node_envs(inv: Inventory, facts: dict[str, dict], nccl_debug: bool = False
              ) -> dict[str, dict[str, str]]:
    """The environment of each node, from its probe (see :mod:`vllm_spark.netenv`)."""
    ifaces = sorted({facts[n.name]["interface"] for n in inv.nodes})
    rdma = sorted({d for n in inv.nodes
                   for d in facts[n.name]["interfaces"][facts[n.name]["interface"]]["rdma"]})
    return {n.name: netenv.node_env(facts[n.name]["interface"], facts[n.name]["address"],
                                    ifaces, rdma, n.token_path, n.env, nccl_debug)
            for n in inv.nodes}

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
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vllm_spark import netenv, remote
from vllm_spark.inventory import Inventory, Node
from vllm_spark.probe import WEIGHT_SUFFIXES


def table_name(inv: Inventory) -> str:
    from vllm_spark.firewall import table_name as name

    return name(inv)

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
               timeout: float = 120, nft_table: str | None = None) -> dict:
    args = {"interface": node.interface, "subnet": node.subnet, "address": node.address,
            "model": model, "full_hash": full_hash, "ports": ports, "nft_table": nft_table,
            "env": node.env}
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


# --------------------------------------------------------------- what breaks Spark clusters

_TWIN = re.compile(r"en(?:P\d+)?(p\d+s\d+f\d+np\d+)")


def twins(ifaces: dict, name: str) -> list[str]:
    """The other netdevs of the same ConnectX-7 port: on a Spark each port appears twice,
    once per PCIe link (``enp1s0f1np1`` and ``enP2p1s0f1np1``), each with its RDMA device;
    NCCL reaches the port's full rate only over both."""
    m = _TWIN.fullmatch(name)
    if not m:
        return []
    return sorted(n for n in ifaces if n != name and (t := _TWIN.fullmatch(n))
                  and t.group(1) == m.group(1))


def cluster_rdma(f: dict) -> list[str]:
    """RDMA devices behind the node's cluster interface and its up twins."""
    names = [f["interface"], *[t for t in twins(f["interfaces"], f["interface"])
                               if _usable(f["interfaces"][t])]]
    return sorted({d for n in names for d in f["interfaces"][n]["rdma"]})


def _usable(info: dict) -> bool:
    return info["operstate"] in ("UP", "UNKNOWN") and "UP" in info["flags"] and bool(info["ipv4"])


def _hca_list(value: str) -> tuple[bool, set[str]]:
    """NCCL_IB_HCA parsed: (is an exclusion list '^...', device names without ports)."""
    exclude = value.startswith("^")
    value = value.lstrip("^=")
    return exclude, {item.split(":")[0] for item in value.split(",") if item}


def check_nccl(inv: Inventory, facts: dict[str, dict]) -> list[Problem]:
    """The NCCL library each node's processes load, and its version: the same everywhere."""
    out = []
    seen = {n.name: facts[n.name].get("nccl") for n in inv.nodes if n.name in facts}
    if not any(seen.values()):
        return out  # no NCCL anywhere (CPU nodes)
    ref_name = inv.head.name if seen.get(inv.head.name) else next(k for k, v in seen.items() if v)
    ref = seen[ref_name]
    for name, lib in seen.items():
        if lib is None:
            out.append(Problem(name, f"no libnccl found (NCCL {ref['version']} from "
                               f"{ref['source']} on {ref_name})",
                               f"install the same NCCL on {name} (`pip install "
                               f"nvidia-nccl-cu12=={ref['version']}`)"))
        elif name != ref_name and lib["version"] != ref["version"]:
            out.append(Problem(name, f"NCCL {lib['version'] or 'of unknown version'} "
                               f"({lib['source']}: {lib['path']}) here, {ref['version']} "
                               f"({ref['source']}: {ref['path']}) on {ref_name}: ranks "
                               "hang or fail on mismatched NCCL",
                               f"load the same NCCL on every node (`pip install "
                               f"nvidia-nccl-cu12=={ref['version']}` on {name}, or point "
                               "env VLLM_NCCL_SO_PATH / LD_LIBRARY_PATH at the same "
                               "libnccl everywhere)"))
    return out


def check_roce(inv: Inventory, facts: dict[str, dict]) -> list[Problem]:
    """Twin interfaces of the ConnectX-7 port up, NCCL_IB_HCA covering them, and the RoCE
    v2 GID index NCCL will use pointing at the node's IPv4 address."""
    out = []
    gid_choice: dict[str, int] = {}
    for node in inv.nodes:
        f = facts.get(node.name)
        if not f or not f["interface"] or not f["interfaces"][f["interface"]]["rdma"]:
            continue
        iface = f["interface"]
        for twin in twins(f["interfaces"], iface):
            info = f["interfaces"][twin]
            if info["rdma"] and not _usable(info):
                state = "down" if "UP" not in info["flags"] else "without an IPv4 address"
                out.append(Problem(node.name, f"{twin}, the twin of {iface} on the same "
                                   f"ConnectX-7 port, is {state}: NCCL gets half the port's "
                                   "bandwidth", f"bring {twin} up with an address on the "
                                   "cluster subnet (`sudo ip link set " + twin + " up`; "
                                   "netplan), as for " + iface))
        wanted = cluster_rdma(f)
        hca = node.env.get("NCCL_IB_HCA")
        if hca:
            exclude, listed = _hca_list(hca)
            missing = sorted(listed & set(wanted)) if exclude else sorted(set(wanted) - listed)
            if missing:
                verb = "excludes" if exclude else "leaves out"
                out.append(Problem(node.name, f"NCCL_IB_HCA={hca} {verb} "
                                   f"{', '.join(missing)} (behind {iface} or its "
                                   "twin)", f"set NCCL_IB_HCA={','.join(wanted)} or remove it "
                                   "from env (vllm-spark sets it from the port's devices)"))
        addrs = {c.split("/")[0] for n in [iface, *twins(f["interfaces"], iface)]
                 for c in f["interfaces"][n]["ipv4"]}
        for dev in wanted:
            gids = f.get("gids", {}).get(dev, [])
            good = [g for g in gids if (g["type"] or "").lower() == "roce v2"
                    and _gid_ipv4(g["gid"]) in addrs]
            env_index = node.env.get("NCCL_IB_GID_INDEX")
            if env_index is not None:
                g = next((g for g in gids if str(g["index"]) == env_index), None)
                if g is None or g not in good:
                    have = (f"{g['type']} {g['gid']}" if g else "empty")
                    fix = (f"NCCL_IB_GID_INDEX={good[0]['index']} (RoCE v2, "
                           f"{_gid_ipv4(good[0]['gid'])})" if good else
                           f"give {iface} its IPv4 address (RoCE v2 GIDs follow it)")
                    out.append(Problem(node.name, f"NCCL_IB_GID_INDEX={env_index} on {dev} is "
                                       f"{have}, not RoCE v2 with this node's IPv4 address",
                                       fix))
            elif not good:
                where = ", ".join(sorted(addrs)) or "an IPv4 address"
                out.append(Problem(node.name, f"{dev} has no RoCE v2 GID for {where}: "
                                   "NCCL cannot use RDMA over it", f"check `ip addr` on {iface} "
                                   f"and the GID table (/sys/class/infiniband/{dev}/ports/1/"
                                   "gids); RoCE v2 must be enabled (`cma_roce_mode`)"))
            elif dev in f["interfaces"][iface]["rdma"]:
                gid_choice.setdefault(node.name, good[0]["index"])
    if len(set(gid_choice.values())) > 1 and not any(
            "NCCL_IB_GID_INDEX" in n.env for n in inv.nodes):
        ref = gid_choice.get(inv.head.name, next(iter(gid_choice.values())))
        for name, index in gid_choice.items():
            if index != ref:
                out.append(Problem(name, f"the RoCE v2 GID of the cluster address is index "
                                   f"{index} here, {ref} on {inv.head.name}: vLLM's Ray "
                                   "executor gives every worker the head's NCCL_* variables",
                                   f"set env NCCL_IB_GID_INDEX={index} on {name} and use "
                                   "--mode native, or make the GID tables agree (same "
                                   "address order on every node)", fatal=False))
    return out


def _gid_ipv4(gid: str) -> str | None:
    """The IPv4 address of an IPv4-mapped GID (::ffff:a.b.c.d), else None."""
    try:
        addr = ipaddress.IPv6Address(gid)
    except ValueError:
        return None
    return str(addr.ipv4_mapped) if addr.ipv4_mapped else None


def check_memory(inv: Inventory, facts: dict[str, dict], weights_share: int | None = None
                 ) -> list[Problem]:
    """Unified-memory nodes (GB10): Ray's memory monitor off, and free memory (not page
    cache) for this node's share of the weights."""
    out = []
    for node in inv.nodes:
        f = facts.get(node.name)
        if not f or not f.get("unified_memory"):
            continue
        refresh = node.env.get("RAY_memory_monitor_refresh_ms")
        if refresh is not None and refresh != "0":
            out.append(Problem(node.name, f"RAY_memory_monitor_refresh_ms={refresh} keeps Ray's "
                               "memory monitor on a unified-memory node: GPU memory counts as "
                               "host memory and Ray kills vLLM's workers",
                               "remove it from env (vllm-spark sets 0 on unified-memory "
                               "nodes)"))
        mi = f.get("meminfo") or {}
        if weights_share and "MemFree" in mi:
            need = weights_share * MEMORY_HEADROOM
            if mi["MemFree"] < need:
                out.append(Problem(node.name, f"MemFree {mi['MemFree'] / GiB:.1f} GiB < "
                                   f"{need / GiB:.1f} GiB for this node's weights + 10%, with "
                                   f"{mi.get('Cached', 0) / GiB:.1f} GiB in the page cache: on "
                                   "unified memory the weights' pages and the GPU copy "
                                   "compete and loading runs out of memory",
                                   "drop the page cache before serving (`sync; echo 3 | sudo "
                                   "tee /proc/sys/vm/drop_caches`) and stop other jobs"))
    return out


def check_auth(inv: Inventory, facts: dict[str, dict], tokens: dict[str, str | None] | None
               = None) -> list[Problem]:
    """Ray token auth: no RAY_AUTH_TOKEN in a login environment (it overrides the cluster's
    token file), stale default tokens (Ray 2.59+ writes ~/.ray/auth_token and turns token
    auth on whenever it exists), and the same cluster token on every node (``tokens``:
    node -> digest of its token file, when a cluster should be running)."""
    from packaging.version import Version

    out = []
    for node in inv.nodes:
        f = facts.get(node.name)
        if not f:
            continue
        auth = f.get("ray_auth") or {}
        if "RAY_AUTH_TOKEN" in auth.get("env", {}) and "RAY_AUTH_TOKEN" not in node.env:
            out.append(Problem(node.name, "RAY_AUTH_TOKEN is set in the login environment: Ray "
                               "prefers it to the cluster's token file, so this node "
                               "presents another token", "remove it from ~/.bashrc / "
                               "~/.profile / /etc/environment on " + node.name))
        default = auth.get("default_token")
        ray = f["versions"].get("ray")
        if default and ray and Version(ray) >= Version("2.59"):
            when = time.strftime("%Y-%m-%d", time.localtime(default["mtime"]))
            out.append(Problem(node.name, f"stale Ray token {default['path']} (written {when}): "
                               f"Ray {ray} turns token auth on with it for any `ray` command "
                               "or ray.init() without RAY_AUTH_MODE, and plain `ray status` "
                               "sends it to this cluster and is refused",
                               f"remove it (`rm {default['path']}`) unless another Ray "
                               "cluster uses it; `vllm-spark status` uses the cluster's own",
                               fatal=False))
    if tokens is not None:
        ref = tokens.get(inv.head.name)
        for node in inv.nodes:
            mine = tokens.get(node.name, "absent")
            if node.name not in facts or mine == ref:
                continue
            what = ("has no Ray auth token" if mine is None else
                    "has no Ray auth token" if mine == "absent" else
                    f"has a different Ray auth token than {inv.head.name}")
            out.append(Problem(node.name, f"{what} ({node.token_path}; left by an earlier "
                               "`up`?): its raylet cannot talk to the head",
                               f"`vllm-spark down -i {inv.path or 'INVENTORY'}` then `up`"))
    return out


def check_firewall(inv: Inventory, facts: dict[str, dict]) -> list[Problem]:
    """Ray's ports listen on every interface: say so where our nftables table is not loaded."""
    from vllm_spark.firewall import protected_ports

    out: list[Problem] = []
    for node in inv.nodes:
        f = facts.get(node.name)
        if f and f.get("firewall") is not True and f["interface"]:
            out.append(Problem(node.name, f"Ray's ports ({', '.join(protected_ports(inv))}) "
                               f"listen on every interface, not only {f['interface']} (Ray "
                               "cannot bind them to one address)",
                               f"`vllm-spark firewall -i {inv.path or 'INVENTORY'} --apply` "
                               "(accepts them only from the cluster subnet), or firewall "
                               "them yourself", fatal=False))
    return out


def run_preflight(inv: Inventory, *, ports: list[int] | None = None, full_hash: bool = False,
                  model_check: bool = True, tokens: bool = False) -> Report:
    """Probe all nodes concurrently and run every check; never raises for node problems.
    ``tokens``: a Ray cluster should be running, so every node's token must match."""
    report = Report()
    ports = [inv.ray_port, inv.dashboard_port, inv.serve_port] if ports is None else ports

    def one(node: Node):
        try:
            facts = probe_node(node, ports=ports if node is inv.head else [],
                               full_hash=full_hash, model=node.model if model_check else None,
                               nft_table=table_name(inv))
            remote.prepare_state_dir(node)
            if tokens:
                facts["cluster_token"] = remote.secret_digest(node, node.token_path)
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
    report.problems += check_firewall(inv, report.facts)
    report.problems += check_nccl(inv, report.facts)
    report.problems += check_roce(inv, report.facts)
    head_model = report.facts.get(inv.head.name, {}).get("model") if model_check else None
    share = _weights_bytes(head_model) // len(inv.nodes) if head_model else None
    report.problems += check_memory(inv, report.facts, share)
    report.problems += check_auth(inv, report.facts, {
        n: f.get("cluster_token") for n, f in report.facts.items()} if tokens else None)
    return report


def node_envs(inv: Inventory, facts: dict[str, dict], nccl_debug: bool = False
              ) -> dict[str, dict[str, str]]:
    """The environment of each node, from its probe (see :mod:`vllm_spark.netenv`)."""
    ifaces = sorted({facts[n.name]["interface"] for n in inv.nodes})
    rdma = sorted({d for n in inv.nodes for d in cluster_rdma(facts[n.name])})
    return {n.name: netenv.node_env(facts[n.name]["interface"], facts[n.name]["address"],
                                    ifaces, rdma, n.token_path, n.env, nccl_debug,
                                    unified_memory=bool(facts[n.name].get("unified_memory")))
            for n in inv.nodes}

"""The inventory: which hosts form the cluster and how to reach them.

A small YAML, TOML or JSON file. Keys under ``cluster`` are defaults; each host may override
any of them. The first host is the Ray head (where ``vllm serve`` runs)::

    cluster:
      name: sparks
      interface: enp1s0f1np1        # the ConnectX-7 port (or `subnet: 192.168.100.0/24`)
      model: /models/Qwen3-235B-A22B-FP8
      python: /home/me/venv/bin/python
    hosts:
      - name: spark1
        ssh: me@spark1.local        # management address: SSH only
      - name: spark2
        ssh: me@spark2.local
        model: /data/Qwen3-235B-A22B-FP8   # per-node override

``ssh: local`` runs that node's commands on this machine without SSH (single-host tests and
benchmarks). Unknown keys are refused with the key, the host and the allowed keys.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

# Keys a host may set (and the cluster section may default).
NODE_KEYS = {
    "ssh": "SSH destination (user@host, host, or `local`)",
    "ssh_options": "extra ssh client options, e.g. ['-i', '~/.ssh/spark', '-p', '2222']",
    "interface": "name of the cluster-network interface (the ConnectX-7 port)",
    "subnet": "cluster-network subnet; the interface holding an address in it is used",
    "address": "cluster-network address of the node (default: the interface's IPv4 address)",
    "python": "Python interpreter on the node that has vLLM and Ray",
    "model": "model directory on the node",
    "state_dir": "directory on the node for Ray's temp dir, logs and the auth token",
    "env": "extra environment variables for Ray and vLLM on the node",
    "num_gpus": "GPUs (or, on CPU-only nodes, worker slots) this node offers to Ray",
}
CLUSTER_KEYS = {
    "name": "cluster name (used in state paths)",
    "ray_port": "Ray GCS port on the head",
    "dashboard_port": "Ray dashboard / job API port on the head",
    "dashboard_host": "address the dashboard binds to (default 127.0.0.1; never all "
                      "interfaces unless you write 0.0.0.0 here)",
    "serve_port": "port of the OpenAI API server on the head",
    "serve_host": "address the API server binds to (default: the head's cluster address)",
    **NODE_KEYS,
}


class InventoryError(ValueError):
    """The inventory file is unreadable or holds a bad value (message names the key)."""


@dataclass
class Node:
    name: str
    ssh: str
    ssh_options: list[str] = field(default_factory=list)
    interface: str | None = None
    subnet: str | None = None
    address: str | None = None
    python: str = "python3"
    model: str | None = None
    state_dir: str = ""
    env: dict[str, str] = field(default_factory=dict)
    num_gpus: int = 1

    @property
    def is_local(self) -> bool:
        return self.ssh == "local"

    @property
    def ray_temp_dir(self) -> str:
        return f"{self.state_dir}/ray"

    @property
    def token_path(self) -> str:
        return f"{self.state_dir}/auth_token"

    def where(self) -> str:
        """How the node is reached, for messages."""
        return "this machine" if self.is_local else self.ssh


@dataclass
class Inventory:
    name: str
    nodes: list[Node]
    ray_port: int = 6379
    dashboard_port: int = 8265
    dashboard_host: str = "127.0.0.1"
    serve_port: int = 8000
    serve_host: str | None = None
    path: str | None = None

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> list[Node]:
        return self.nodes[1:]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise InventoryError(f"no host named {name!r}; hosts: {[n.name for n in self.nodes]}")


def _read(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return json.loads(text)
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        return tomllib.loads(text)
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise InventoryError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), "
                                 "or write the inventory as .toml or .json") from e
        return yaml.safe_load(text) or {}
    raise InventoryError(f"{path}: inventory must end in .yaml, .yml, .toml or .json")


def _check_keys(section: dict, allowed: dict, where: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise InventoryError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _typed(value, kind, key: str, where: str):
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InventoryError(f"{where}.{key} must be an integer, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise InventoryError(f"{where}.{key} must be a non-empty string, got {value!r}")
        return value
    if kind == "list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InventoryError(f"{where}.{key} must be a list of strings, got {value!r}")
        return list(value)
    if kind == "env":
        if not isinstance(value, dict):
            raise InventoryError(f"{where}.{key} must be a mapping NAME: value, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    raise AssertionError(kind)


_NODE_TYPES = {"ssh_options": "list", "env": "env", "num_gpus": int}


def parse_inventory(data: dict, path: str | None = None) -> Inventory:
    """Build an :class:`Inventory` from the parsed file; every error names the key."""
    src = path or "inventory"
    if not isinstance(data, dict):
        raise InventoryError(f"{src}: top level must be a mapping with 'cluster' and 'hosts'")
    _check_keys(data, {"cluster": "", "hosts": ""}, src)
    cluster = data.get("cluster") or {}
    _check_keys(cluster, CLUSTER_KEYS, f"{src}: cluster")
    hosts = data.get("hosts")
    if not isinstance(hosts, list) or len(hosts) < 1:
        raise InventoryError(f"{src}: 'hosts' must be a list of at least one host")

    name = _typed(cluster.get("name", "spark"), "str", "name", "cluster")
    nodes: list[Node] = []
    for i, host in enumerate(hosts):
        if not isinstance(host, dict):
            raise InventoryError(f"{src}: hosts[{i}] must be a mapping, got {host!r}")
        _check_keys(host, {"name": "", **NODE_KEYS}, f"{src}: hosts[{i}]")
        hname = _typed(host.get("name", f"node{i}"), "str", "name", f"hosts[{i}]")
        values: dict = {}
        for key in NODE_KEYS:
            if key in host:
                raw, where = host[key], f"hosts[{hname}]"
            elif key in cluster:
                raw, where = cluster[key], "cluster"
            else:
                continue
            if key == "env" and "env" in cluster and "env" in host:
                raw = {**cluster["env"], **host["env"]}
            values[key] = _typed(raw, _NODE_TYPES.get(key, "str"), key, where)
        if "ssh" not in values:
            raise InventoryError(f"{src}: hosts[{hname}] needs 'ssh' (user@host, or 'local')")
        if not values.get("interface") and not values.get("subnet"):
            raise InventoryError(f"{src}: hosts[{hname}] needs 'interface' or 'subnet' "
                                 "(the cluster network, e.g. the ConnectX-7 port)")
        if values.get("subnet"):
            try:
                ipaddress.ip_network(values["subnet"], strict=False)
            except ValueError as e:
                raise InventoryError(f"hosts[{hname}].subnet: {e}") from None
        values.setdefault("state_dir", f"/tmp/vllm-spark/{name}-{hname}")
        nodes.append(Node(name=hname, **values))

    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise InventoryError(f"{src}: host names must be unique, got {names}")
    inv = Inventory(name=name, nodes=nodes, path=path)
    for key in ("ray_port", "dashboard_port", "serve_port"):
        if key in cluster:
            setattr(inv, key, _typed(cluster[key], int, key, "cluster"))
    for key in ("dashboard_host", "serve_host"):
        if key in cluster:
            setattr(inv, key, _typed(cluster[key], "str", key, "cluster"))
    return inv


def load_inventory(path: str | Path) -> Inventory:
    path = Path(path)
    if not path.is_file():
        raise InventoryError(f"inventory {path} not found")
    return parse_inventory(_read(path), str(path))


def inventory_to_dict(inv: Inventory) -> dict:
    """The inverse of :func:`parse_inventory` (every host spelled out)."""
    cluster = {"name": inv.name, "ray_port": inv.ray_port, "dashboard_port": inv.dashboard_port,
               "dashboard_host": inv.dashboard_host, "serve_port": inv.serve_port}
    if inv.serve_host:
        cluster["serve_host"] = inv.serve_host
    hosts = []
    for n in inv.nodes:
        h = {"name": n.name}
        for f in fields(Node):
            v = getattr(n, f.name)
            if f.name != "name" and v not in (None, [], {}):
                h[f.name] = v
        hosts.append(h)
    return {"cluster": cluster, "hosts": hosts}

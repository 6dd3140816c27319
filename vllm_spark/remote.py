"""Run commands on a node: the system ``ssh`` client (BatchMode, ConnectTimeout), or locally.

Commands are argv lists; they are quoted once here and run by ``bash -c`` on the node, with
the node's environment prepended, so the same code path serves SSH and ``ssh: local``.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass

from vllm_spark.inventory import Node

CONNECT_TIMEOUT_S = 5
SSH_BASE = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]


class NodeError(RuntimeError):
    """One line: the node, what is wrong, and the fix."""

    def __init__(self, node: str, what: str, fix: str):
        self.node, self.what, self.fix = node, what, fix
        super().__init__(f"{node}: {what} -> fix: {fix}")


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    def last_line(self) -> str:
        lines = [ln for ln in (self.stderr or self.stdout).strip().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else f"exit status {self.rc}"


def shell_line(argv: list[str], env: dict[str, str] | None = None) -> str:
    """``NAME=value ... argv`` quoted for bash."""
    pre = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    cmd = " ".join(shlex.quote(a) for a in argv)
    return f"export {pre}; {cmd}" if pre else cmd


def ssh_argv(node: Node, script: str) -> list[str]:
    """The local argv that runs ``script`` (a bash line) on ``node``."""
    if node.is_local:
        return ["bash", "-c", script]
    return [*SSH_BASE, *node.ssh_options, node.ssh, "--", "bash", "-c", shlex.quote(script)]


def run(node: Node, argv: list[str], *, env: dict[str, str] | None = None,
        stdin: str | None = None, timeout: float = 60, check: bool = True) -> Result:
    """Run ``argv`` on ``node``; raise :class:`NodeError` when SSH itself fails (rc 255) or,
    with ``check``, when the command fails."""
    return run_script(node, shell_line(argv, env), stdin=stdin, timeout=timeout, check=check)


def run_script(node: Node, script: str, *, stdin: str | None = None, timeout: float = 60,
               check: bool = True) -> Result:
    try:
        p = subprocess.run(ssh_argv(node, script), input=stdin, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NodeError(node.name, f"command did not finish within {timeout:.0f} s on "
                        f"{node.where()}: {script[:120]}",
                        "check the node is responsive (load, disk) and retry") from None
    res = Result(p.returncode, p.stdout, p.stderr)
    if p.returncode == 255 and not node.is_local:
        raise NodeError(node.name, f"unreachable over SSH ({node.ssh}): {res.last_line()}",
                        f"check `ssh {' '.join(node.ssh_options)} {node.ssh} true` works without "
                        "a password (key in authorized_keys, host up, address right)")
    if check and p.returncode != 0:
        raise NodeError(node.name, f"`{script[:160]}` failed: {res.last_line()}",
                        "see the message above; run the command on the node by hand")
    return res


def write_file(node: Node, path: str, content: str, mode: str = "600") -> None:
    """Write ``content`` to ``path`` on the node (through stdin: never on a command line)."""
    q = shlex.quote(path)
    run_script(node, f"umask 077; mkdir -p $(dirname {q}); cat > {q}; chmod {mode} {q}",
               stdin=content)


def popen(node: Node, script: str, **kwargs) -> subprocess.Popen:
    """Start ``script`` on the node and stream its output (``logs --follow``)."""
    return subprocess.Popen(ssh_argv(node, script), **kwargs)

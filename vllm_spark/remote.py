"""Run commands on a node: the system ``ssh`` client (BatchMode, ConnectTimeout), or locally.

Commands are argv lists; they are quoted once here and run by ``bash -c`` on the node, with
the node's environment prepended, so the same code path serves SSH and ``ssh: local``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vllm_spark.inventory import Node

STATEDIR_SOURCE = (Path(__file__).parent / "statedir.py").read_text()

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
    # `--` ends ssh's options: the destination (validated by the inventory) is never one.
    return [*SSH_BASE, *node.ssh_options, "--", node.ssh, "bash", "-c", shlex.quote(script)]


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


def _statedir(node: Node, args: list[str], stdin: str | None = None) -> dict:
    """Run :mod:`vllm_spark.statedir` on the node; its one JSON line, or NodeError."""
    res = run(node, [node.python, "-c", STATEDIR_SOURCE, *args], stdin=stdin, check=False)
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise NodeError(node.name, f"cannot prepare the state dir: {res.last_line()}",
                        f"check hosts[{node.name}].python ({node.python}) runs there") from None
    if "error" in out:
        raise NodeError(node.name, out["error"], out["fix"])
    return out


def prepare_state_dir(node: Node) -> str:
    """Create or check the node's private state dir (once); sets ``node.state_dir``."""
    if not node.state_ready:
        node.state_dir = _statedir(node, ["ensure", node.state_dir, node.state_name])["path"]
        node.state_ready = True
    return node.state_dir


def write_secret(node: Node, path: str, content: str) -> None:
    """A new 0600 file at ``path`` on the node, created exclusively without following
    symlinks; the content goes through stdin, never on a command line."""
    _statedir(node, ["write", path], stdin=content)


# Runs on a node: stop the sessions recorded in the pid files argv[1:] ("PID STARTTIME",
# written by start_detached). Every process of such a session (its session id is the
# leader's pid) born at or after the leader is sent SIGTERM, then SIGKILL after a grace
# period; a pid reused by an unrelated, newer session leader is left alone. Prints how many
# processes would not die.
STOP_RECORDED = r"""
import os, signal, sys, time
def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # [0] state, [1] ppid, [3] session, [19] start
sessions = []
for path in sys.argv[2:]:
    try:
        with open(path) as f:
            pid, start = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        continue
    try:
        now = int(stat(pid)[19])
    except OSError:
        now = None
    sessions.append((pid, start, now if now is not None and now != start else float("inf")))
me = os.getpid()
seen = {}  # pid -> start time of every process found in a session or below one
def members():
    procs = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            st = stat(p)
        except OSError:
            continue
        if int(p) != me and st[0] not in "ZX":
            procs[int(p)] = (int(st[1]), int(st[3]), int(st[19]))  # ppid, session, start
    for p, (_, sid, born) in procs.items():
        if any(sid == pid and start <= born < until for pid, start, until in sessions):
            seen[p] = born
    # children that left the session (Ray workers, job drivers start sessions of their own)
    grew = True
    while grew:
        grew = False
        for p, (ppid, _, born) in procs.items():
            if p not in seen and ppid in seen and procs.get(ppid, (0, 0, -1))[2] == seen[ppid]:
                seen[p] = born
                grew = True
    # once their parent is gone they are orphans, still ours: match them by start time
    return [p for p, born in seen.items() if p in procs and procs[p][2] == born]
grace = float(sys.argv[1])
for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
    for p in members():
        try:
            os.kill(p, sig)
        except OSError:
            pass
    deadline = time.time() + wait
    while members() and time.time() < deadline:
        time.sleep(0.2)
left = members()
if not left:
    for path in sys.argv[2:]:
        try:
            os.unlink(path)
        except OSError:
            pass
print(len(left))
"""


def start_detached(node: Node, name: str, argv: list[str], env: dict[str, str], *,
                   env_files: dict[str, str] | None = None) -> None:
    """Start ``argv`` on the node in a new session (``setsid``), output to
    ``<state_dir>/<name>.log``; its pid and start time go to ``<state_dir>/<name>.pid`` so
    :func:`stop_recorded` stops exactly this session. ``env_files`` maps variables to
    secret files read on the node at start (the secret never appears on a command line)."""
    sd = shlex.quote(node.state_dir)
    pre = "".join(f'export {k}="$(cat -- {shlex.quote(p)})"; '
                  for k, p in (env_files or {}).items())
    inner = pre + shell_line(["exec", *argv], env)
    # (`cd` on its own: `cd && cmd &` would background a subshell holding SSH's output)
    run_script(node, f"umask 077; cd {sd} || exit 1; setsid nohup bash -c {shlex.quote(inner)} "
               f"> {sd}/{name}.log 2>&1 < /dev/null & pid=$!; "
               f"echo \"$pid $(sed 's/.*) //' /proc/$pid/stat | cut -d' ' -f20)\" "
               f"> {sd}/{name}.pid")


def detached_state(node: Node, name: str, needle: str | None = None) -> str:
    """'UP' (running, and ``needle`` is in its log), 'WAIT' (running) or 'DEAD'."""
    sd = shlex.quote(node.state_dir)
    up = f"grep -qF -- {shlex.quote(needle)} {sd}/{name}.log && echo UP || " if needle else ""
    res = run_script(node, f"pid=$(cut -d' ' -f1 {sd}/{name}.pid 2>/dev/null); "
                     f"if [ -n \"$pid\" ] && kill -0 \"$pid\" 2>/dev/null; then {up}echo WAIT; "
                     "else echo DEAD; fi", check=False)
    return res.stdout.strip() or "DEAD"


def stop_recorded(node: Node, names: list[str], grace: float = 15) -> int:
    """Stop the sessions started as ``names`` on the node; returns how many would not die."""
    pidfiles = [f"{node.state_dir}/{n}.pid" for n in names]
    res = run(node, [node.python, "-c", STOP_RECORDED, str(grace), *pidfiles],
              timeout=grace + 60, check=False)
    counts = [ln for ln in res.stdout.split() if ln.isdigit()]
    if res.rc != 0 or not counts:
        raise NodeError(node.name, f"teardown script failed: {res.last_line()}",
                        f"check hosts[{node.name}].python runs there")
    return int(counts[-1])


def tail(node: Node, name: str, lines: int = 5) -> str:
    return run(node, ["tail", "-n", str(lines), f"{node.state_dir}/{name}.log"],
               check=False).stdout.strip()


def secret_digest(node: Node, path: str) -> str | None:
    """A short hash of the secret file on the node (None if absent), to compare nodes."""
    return _statedir(node, ["digest", path])["digest"]


def popen(node: Node, script: str, **kwargs) -> subprocess.Popen:
    """Start ``script`` on the node and stream its output (``logs --follow``)."""
    return subprocess.Popen(ssh_argv(node, script), **kwargs)

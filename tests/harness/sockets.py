"""Which processes listen on TCP, read from /proc (no tools): for the no-network-exposure tests."""

from __future__ import annotations

import os

LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 as /proc writes them


def listening_tcp_inodes() -> dict[str, str]:
    """inode -> local address (hex, as /proc/net/tcp writes it) of every listening socket."""
    inodes = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    inodes[fields[9]] = fields[1].split(":")[0]
    return inodes


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            continue
    return out


def tcp_listeners_of(pid: int, children: bool = True) -> list[tuple[int, str]]:
    """(pid, local address) of every listening TCP socket held by ``pid`` (and its children)."""
    listening, held = listening_tcp_inodes(), []
    for p in process_tree(pid) if children else [pid]:
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except (FileNotFoundError, PermissionError):
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listening:
                held.append((p, listening[target[8:-1]]))
    return held

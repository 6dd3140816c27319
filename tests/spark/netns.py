"""Several "nodes" on one Linux machine: a network namespace each, joined by a bridge, each
running Debian's OpenSSH server with a throwaway key, so vllm-spark reaches them exactly as it
reaches real hosts (``ssh root@10.x.y.z``).

    root ns: bridge <br> 10.213.N.254/24
      ns <prefix>-0: veth "cx7" 10.213.N.1/24, lo, sshd on :22
      ns <prefix>-1: veth "cx7" 10.213.N.2/24, ...

Every step checks its command; a failure raises with the command and its output (the tests
fail loudly: a namespace or sshd that cannot be set up is a broken CI machine, not a skip).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
IFACE = "cx7"  # the cluster interface's name inside every namespace


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({p.returncode}): "
                           f"{(p.stderr or p.stdout).strip()}")
    return p


@dataclass
class NetnsNodes:
    workdir: Path
    count: int
    prefix: str = field(default_factory=lambda: f"vs{os.getpid() % 100000}")
    subnet_octet: int = field(default_factory=lambda: 100 + os.getpid() % 150)
    sshd: list[subprocess.Popen] = field(default_factory=list)
    created_ns: list[str] = field(default_factory=list)
    bridge_created: bool = False

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"[:15]

    def ns(self, i: int) -> str:
        return f"{self.prefix}-{i}"

    def address(self, i: int) -> str:
        return f"10.213.{self.subnet_octet}.{i + 1}"

    @property
    def subnet(self) -> str:
        return f"10.213.{self.subnet_octet}.0/24"

    @property
    def key(self) -> Path:
        return self.workdir / "id_ed25519"

    @property
    def ssh_options(self) -> list[str]:
        return ["-i", str(self.key), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]

    def start(self) -> "NetnsNodes":
        for tool in ("ip", SSHD, "ssh", "ssh-keygen"):
            if not shutil.which(tool):
                raise RuntimeError(f"{tool} not found: run scripts/ci-system-deps.sh "
                                   "(openssh-server, iproute2)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.workdir / "host_key"))
        (self.workdir / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        os.chmod(self.workdir / "authorized_keys", 0o600)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory

        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.bridge_created = True
        sh("ip", "addr", "add", f"10.213.{self.subnet_octet}.254/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i in range(self.count):
            self._add_node(i)
        for i in range(self.count):
            self._wait_ssh(i)
        return self

    def _add_node(self, i: int) -> None:
        ns, host_end = self.ns(i), f"{self.prefix}h{i}"[:15]
        sh("ip", "netns", "add", ns)
        self.created_ns.append(ns)
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", IFACE, "netns", ns)
        sh("ip", "link", "set", host_end, "master", self.bridge)
        sh("ip", "link", "set", host_end, "up")
        sh("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", IFACE)
        sh("ip", "-n", ns, "link", "set", IFACE, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        config = self.workdir / f"sshd_{i}.conf"
        config.write_text("\n".join([
            f"ListenAddress {self.address(i)}", "Port 22",
            f"HostKey {self.workdir / 'host_key'}",
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
            f"PidFile {self.workdir / f'sshd_{i}.pid'}", "PermitUserEnvironment no",
            "MaxStartups 100", "MaxSessions 100", "",
        ]))
        log = open(self.workdir / f"sshd_{i}.log", "w")
        self.sshd.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, SSHD, "-D", "-e", "-f", str(config)],
            stdout=log, stderr=subprocess.STDOUT))

    def _wait_ssh(self, i: int, timeout: float = 20) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.sshd[i].poll() is not None:
                raise RuntimeError(f"sshd in {self.ns(i)} exited: "
                                   f"{(self.workdir / f'sshd_{i}.log').read_text()[-500:]}")
            try:
                socket.create_connection((self.address(i), 22), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"sshd in {self.ns(i)} not reachable on {self.address(i)}:22")

    def stop(self) -> None:
        for p in self.sshd:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        for ns in self.created_ns:
            sh("ip", "netns", "del", ns, check=False)
        if self.bridge_created:
            sh("ip", "link", "del", self.bridge, check=False)

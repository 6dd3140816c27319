"""Engine runs of one pytest session: a few at a time, and each distinct spec only once.

An engine process spends most of its life in one thread (three processes, each importing
vLLM, then one torch thread), so on a 2-core CI machine two engines side by side take about
as long as one. And a spec run twice gives the same greedy outputs twice (same checkpoint
files, prompts, config; seed 0): the stock-vLLM reference that several test files compare
against, or the one-rank FP8 reference, runs once per session and its result is shared.

Only CPU specs come here: engines sharing one GPU would each size their memory against the
other's, so GPU tests keep running theirs one after another.

* :func:`submit` starts a spec (or finds it already started) and returns its future;
* :func:`run` waits for several and returns their results by name, as
  :func:`tests.harness.equality.run_engines` does;
* :func:`prefetch` starts, in test order, the specs of every selected test of a module, so
  a module's engines run two at a time while its tests check them one by one.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

from tests.harness.equality import RUN_ENGINE, kill_engine, start_engine, wait_engine

# Engines side by side: the CI machine has 2 cores; VLLM_DWDP_TEST_ENGINES overrides.
SLOTS = max(1, int(os.environ.get("VLLM_DWDP_TEST_ENGINES", min(2, os.cpu_count() or 1))))

_lock = threading.Lock()
_futures: dict[str, cf.Future] = {}
_live: set = set()
_executor: cf.ThreadPoolExecutor | None = None
_workdir: Path | None = None


def _key(spec: dict, runner: str) -> str:
    spec = {k: v for k, v in spec.items() if not (k == "device" and v == "cpu")}
    return json.dumps([runner, spec], sort_keys=True)


def _run(name: str, spec: dict, runner: str, timeout: float) -> dict:
    proc, out_path, log_path = start_engine(spec, _workdir, name, module=runner)
    with _lock:
        _live.add(proc)
    try:
        result = wait_engine(proc, out_path, log_path, timeout)
    finally:
        with _lock:
            _live.discard(proc)
    result["log_path"] = str(log_path)
    return result


def submit(spec: dict, runner: str = RUN_ENGINE, timeout: float = 600,
           name: str = "engine") -> cf.Future:
    """The future of ``spec``'s result (a dict with ``log_path``); started if new."""
    assert spec.get("device", "cpu") == "cpu", "GPU engines run one after another"
    global _executor, _workdir
    key = _key(spec, runner)
    with _lock:
        if key not in _futures:
            if _executor is None:
                _executor = cf.ThreadPoolExecutor(SLOTS, thread_name_prefix="engine")
                _workdir = Path(tempfile.mkdtemp(prefix="vllm-dwdp-engines-"))
            _futures[key] = _executor.submit(_run, f"{len(_futures):03d}-{name}", spec,
                                             runner, timeout)
        return _futures[key]


def result(future: cf.Future) -> dict:
    """A copy of the future's result: tests may change what they are given."""
    return copy.deepcopy(future.result())


def run(specs: dict[str, dict], runner: str | Callable[[dict], str] = RUN_ENGINE,
        timeout: float = 600) -> dict[str, dict]:
    """Every spec's result by name; one RuntimeError naming every spec whose engine failed.
    ``runner``: the module that runs a spec, or a function of the spec that names it."""
    futures = {name: submit(spec, runner(spec) if callable(runner) else runner, timeout, name)
               for name, spec in specs.items()}
    results, errors = {}, []
    for name, future in futures.items():
        try:
            results[name] = result(future)
        except RuntimeError as e:
            errors.append(f"[{name}] {e}")
    if errors:
        raise RuntimeError("\n".join(errors))
    return results


def prefetch(request, plans: dict[str, Callable[..., dict[str, dict]]],
             runner: str | Callable[[dict], str] = RUN_ENGINE, timeout: float = 600,
             **fixtures) -> list[cf.Future]:
    """Submit, in test order, the specs of every selected test of ``request.module`` that
    ``plans`` names (test function name -> ``plan(**fixtures, **test_params)`` -> specs).
    The test then asks for the same specs and finds them started or done."""
    futures = []
    for item in request.session.items:
        if getattr(item, "module", None) is not request.module:
            continue
        plan = plans.get(getattr(item, "originalname", item.name))
        if plan is None:
            continue
        params = item.callspec.params if hasattr(item, "callspec") else {}
        for name, spec in plan(**fixtures, **params).items():
            futures.append(submit(spec, runner(spec) if callable(runner) else runner,
                                  timeout, name))
    return futures


def wait(futures: list[cf.Future]) -> None:
    """Let ``futures`` finish (their failures are the tests' to report)."""
    cf.wait(futures)


def stop() -> None:
    """End of the session: no new engine starts, running ones are killed."""
    with _lock:
        if _executor is not None:
            _executor.shutdown(wait=False, cancel_futures=True)
        for proc in list(_live):
            kill_engine(proc)

"""DWDP with real separate vLLM engines on CPU, through composite expert memory.

Each rank is its own `vllm.LLM` in its own process, storing one run of every MoE layer's
experts in memfd pages and mapping its peers' pages (passed over Unix sockets) beside them, so
vLLM's own CPU MoE kernel computes over full ``[E, ...]`` tensors. Stock vLLM runs the same
checkpoint in another process (once per session: tests/harness/pool.py shares it with the other
files that compare against it). Greedy tokens must be equal and logprobs close.
"""

from __future__ import annotations

import itertools
import os
import time

import pytest

from tests.harness import pool
from tests.harness.equality import (PROMPTS, assert_outputs_equal, kill_engine,
                                    run_engines, start_engine, stock_spec, wait_engine)
from tests.harness.sockets import LOOPBACK, tcp_listeners_of

_groups = itertools.count()


def new_group() -> str:
    return f"test{os.getpid()}-{next(_groups)}"


def dwdp_spec(model, rank, world_size, group, **dwdp):
    # collective_rpc with a function (the stats reader) needs vLLM's pickle fallback.
    return dict(model=model, prompts=PROMPTS, max_tokens=8, logprobs=5,
                env={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"},
                additional_config={"dwdp": {"enabled": True, "world_size": world_size,
                                            "rank": rank, "group": group, **dwdp}})


def stay_until_all_done(tmp_path, rank: int, world_size: int) -> dict:
    """A rank's expert memory must outlive its peers' use of it: each rank, once done,
    waits for the others (a rank that exits is a dead peer, see the last test)."""
    return {"done_file": str(tmp_path / f"done{rank}"),
            "wait_for": [str(tmp_path / f"done{p}") for p in range(world_size) if p != rank]}


def shm_entries() -> set[str]:
    """What this package could have left in /dev/shm (other programs' entries come and go)."""
    return {n for n in os.listdir("/dev/shm") if "dwdp" in n or "vllm-moe" in n}


@pytest.mark.equality
@pytest.mark.parametrize("kind, world_size, dwdp", [
    ("qwen3_moe", 2, {}),
    # 8 experts over 3 ranks (3 + 3 + 2): every rank's run shares edge pages with a neighbour.
    ("qwen3_moe", 3, {}),
    # Qwen2-MoE has a shared expert; here the owners are uneven (4 + 2 of 6 experts).
    ("qwen2_moe", 2, {"expert_owners": [0, 0, 0, 0, 1, 1]}),
])
def test_ranks_match_stock(moe_checkpoint, kind, world_size, dwdp, tmp_path):
    model = moe_checkpoint(kind)
    group = new_group()
    shm_before = shm_entries()
    stock = pool.submit(stock_spec(model), name="stock")  # beside the ranks, if not run yet
    results = run_engines({
        f"rank{r}": dict(dwdp_spec(model, r, world_size, group, **dwdp), dwdp_stats=True,
                         **stay_until_all_done(tmp_path, r, world_size))
        for r in range(world_size)})
    results["stock"] = pool.result(stock)
    for r in range(world_size):
        rank = f"rank{r}"
        assert_outputs_equal(results["stock"], results[rank], names=("stock", rank))
        stats = results[rank]["dwdp_stats_after"]
        assert stats and all(s["bytes_pulled"] > 0 for s in stats)  # experts really moved
        log = open(results[rank]["log_path"]).read()
        assert "connected to peers" in log
    assert shm_entries() <= shm_before  # memfd pages: nothing named in /dev/shm


def test_idle_rank_runs_no_forward(moe_checkpoint, tmp_path):
    """Rank 0 serves requests while rank 1 has none: rank 1 runs no forward pass at all (no
    dummy batches, no per-step collective), yet rank 0's pulls from rank 1's memory work."""
    model = moe_checkpoint("qwen3_moe")
    group = new_group()
    done = str(tmp_path / "rank0-done")
    results = run_engines({
        "rank0": dict(dwdp_spec(model, 0, 2, group), dwdp_stats=True, done_file=done),
        "rank1": dict(dwdp_spec(model, 1, 2, group), prompts=[], dwdp_stats=True,
                      wait_for=[done]),
    })
    busy_before = results["rank0"]["dwdp_stats_before"][0]["forwards"]
    busy_after = results["rank0"]["dwdp_stats_after"][0]["forwards"]
    idle_before = results["rank1"]["dwdp_stats_before"][0]["forwards"]
    idle_after = results["rank1"]["dwdp_stats_after"][0]["forwards"]
    assert busy_after > busy_before  # rank 0 stepped through its requests
    assert idle_after == idle_before  # rank 1 never stepped while rank 0 worked


def _wait_connected(started, logs):
    deadline = time.monotonic() + 300
    while not all("connected to peers" in logs[r].read_text() for r in logs):
        assert time.monotonic() < deadline, "DWDP ranks did not connect"
        for r, (proc, _, log) in started.items():
            assert proc.poll() is None, f"rank {r} exited early:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def test_dead_peer_stops_the_other_rank_with_a_clear_error(moe_checkpoint, tmp_path):
    """Rank 1 is SIGKILLed while rank 0 is in the middle of a long request: rank 0 stops
    within 5 s, naming rank 1; nothing is left in /dev/shm or the rendezvous directory; and
    while the group ran, no process of it listened on TCP beyond loopback. (vLLM's own
    world-size-1 gloo group listens on 127.0.0.1, stock engines alike; DWDP's rendezvous
    listens on no TCP port at all: tests/dwdp/test_rendezvous.py.)"""
    model = moe_checkpoint("qwen3_moe")
    group = new_group()
    rendezvous = tmp_path / "rendezvous"
    shm_before = shm_entries()
    workdir = tmp_path / "engines"
    specs = {r: dict(dwdp_spec(model, r, 2, group, rendezvous_dir=str(rendezvous)),
                     env={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
                          "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                     engine_kwargs={"distributed_executor_backend": "uni"},
                     prompts=[[1, 2, 3]] if r == 1 else [list(range(1, 9))],
                     max_tokens=1 if r == 1 else 200, max_model_len=256,
                     linger_s=240 if r == 1 else 0, loop_s=240 if r == 0 else 0)
             for r in (0, 1)}
    started = {r: start_engine(spec, workdir, f"rank{r}") for r, spec in specs.items()}
    try:
        logs = {r: started[r][2] for r in started}
        _wait_connected(started, logs)
        listeners = {r: tcp_listeners_of(started[r][0].pid) for r in started}
        while "generating" not in logs[0].read_text():  # rank 0 is inside its request loop
            time.sleep(0.2)
        time.sleep(1.0)
        killed_at = time.monotonic()
        kill_engine(started[1][0])
        with pytest.raises(RuntimeError) as e:
            wait_engine(*started[0], timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        for proc, _, _ in started.values():
            kill_engine(proc)
    beyond_loopback = {r: [x for x in held if x[1] not in LOOPBACK] for r, held in listeners.items()}
    assert beyond_loopback == {0: [], 1: []}, f"TCP listeners beyond loopback: {beyond_loopback}"
    assert elapsed < 5, f"rank 0 took {elapsed:.1f} s to stop after its peer died"
    text = logs[0].read_text()
    assert "DWDP rank 1 (pid" in text and "exited" in text, text[-3000:]
    assert "restart all DWDP ranks together" in str(e.value) + text
    assert shm_entries() <= shm_before
    assert not list((rendezvous / group).iterdir())


def test_ranks_of_different_models_stop_before_loading_weights(moe_checkpoint, tmp_path):
    """Rank 0 serves Qwen3-MoE, rank 1 Qwen2-MoE: start-up stops with the difference named,
    before either rank loads a weight."""
    group = new_group()
    workdir = tmp_path / "engines"
    started = [start_engine(dwdp_spec(moe_checkpoint(kind), r, 2, group, peer_timeout_s=20),
                            workdir, f"rank{r}")
               for r, kind in enumerate(("qwen3_moe", "qwen2_moe"))]
    try:
        for s in started:
            with pytest.raises(RuntimeError):
                wait_engine(*s, timeout=300)
    finally:
        for proc, _, _ in started:
            kill_engine(proc)
    logs = [log.read_text() for _, _, log in started]
    named = [text for text in logs
             if "must run the same model, dtype, quantization and vLLM" in text]
    assert named, logs[0][-3000:] + logs[1][-3000:]
    assert "serves architectures = ['Qwen" in named[0]
    assert not any("Loading weights took" in text for text in logs)

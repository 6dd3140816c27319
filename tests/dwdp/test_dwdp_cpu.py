"""DWDP with real separate vLLM engines on CPU (shared-memory transport).

Each rank is its own `vllm.LLM` in its own process, storing part of every MoE layer's
experts and pulling the rest from its peer's memory; stock vLLM runs the same checkpoint in
a third process (once per session: tests/harness/pool.py shares it with the other files that
compare against it). Greedy tokens must be equal and logprobs close.
"""

from __future__ import annotations

import glob
import itertools
import os
import time

import pytest

from tests.harness import pool
from tests.harness.equality import (PROMPTS, assert_outputs_equal, kill_engine, one_rank_spec,
                                    run_engines, start_engine, stock_spec, wait_engine)

_ports = itertools.count(29700 + (os.getpid() % 500) * 4)


def dwdp_spec(model, rank, world_size, port, **dwdp):
    # collective_rpc with a function (the stats reader) needs vLLM's pickle fallback.
    return dict(model=model, prompts=PROMPTS, max_tokens=8, logprobs=5,
                env={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"},
                additional_config={"dwdp": {"enabled": True, "world_size": world_size,
                                            "rank": rank, "master_port": port, **dwdp}})


def stay_until_both_done(tmp_path, rank: int) -> dict:
    """A rank's expert memory must outlive its peers' use of it: each rank, once done,
    waits for the other (a rank that exits is a dead peer, see the last test)."""
    return {"done_file": str(tmp_path / f"done{rank}"),
            "wait_for": str(tmp_path / f"done{1 - rank}")}


@pytest.mark.equality
@pytest.mark.parametrize("kind, dwdp", [
    ("qwen3_moe", {}),
    # Qwen2-MoE has a shared expert; here the owners are uneven (4 + 2 of 6 experts) and one
    # of rank 0's remote experts is replicated locally.
    ("qwen2_moe", {"expert_owners": [0, 1, 0, 0, 1, 0], "replication": 0.5}),
])
def test_two_ranks_match_stock(moe_checkpoint, kind, dwdp, tmp_path):
    model = moe_checkpoint(kind)
    port = next(_ports)
    stock = pool.submit(stock_spec(model), name="stock")  # beside the ranks, if not run yet
    results = run_engines({
        f"rank{r}": dict(dwdp_spec(model, r, 2, port, **dwdp), dwdp_stats=True,
                         **stay_until_both_done(tmp_path, r)) for r in (0, 1)})
    results["stock"] = pool.result(stock)
    for rank in ("rank0", "rank1"):
        assert_outputs_equal(results["stock"], results[rank], names=("stock", rank))
        stats = results[rank]["dwdp_stats_after"]
        assert stats and all(s["bytes_pulled"] > 0 for s in stats)  # experts really moved
        log = open(results[rank]["log_path"]).read()
        assert "connected to peers" in log
    # Slab files are unlinked once mapped: nothing is left in /dev/shm.
    assert not glob.glob(f"/dev/shm/vllm-dwdp-{port}-*")


def test_idle_rank_runs_no_forward(moe_checkpoint, tmp_path):
    """Rank 0 serves requests while rank 1 has none: rank 1 runs no forward pass at all (no
    dummy batches, no per-step collective), yet rank 0's pulls from rank 1's memory work."""
    model = moe_checkpoint("qwen3_moe")
    port = next(_ports)
    done = str(tmp_path / "rank0-done")
    results = run_engines({
        "rank0": dict(dwdp_spec(model, 0, 2, port), dwdp_stats=True, done_file=done),
        "rank1": dict(dwdp_spec(model, 1, 2, port), prompts=[], dwdp_stats=True,
                      wait_for=done),
    })
    busy_before = results["rank0"]["dwdp_stats_before"][0]["forwards"]
    busy_after = results["rank0"]["dwdp_stats_after"][0]["forwards"]
    idle_before = results["rank1"]["dwdp_stats_before"][0]["forwards"]
    idle_after = results["rank1"]["dwdp_stats_after"][0]["forwards"]
    assert busy_after > busy_before  # rank 0 stepped through its requests
    assert idle_after == idle_before  # rank 1 never stepped while rank 0 worked


def test_dead_peer_stops_the_other_rank_with_a_clear_error(moe_checkpoint, tmp_path):
    model = moe_checkpoint("qwen3_moe")
    port = next(_ports)
    workdir = tmp_path / "engines"
    specs = {r: dict(dwdp_spec(model, r, 2, port, peer_timeout_s=10.0), prompts=[[1, 2, 3]],
                     max_tokens=1, linger_s=240) for r in (0, 1)}
    started = {r: start_engine(spec, workdir, f"rank{r}") for r, spec in specs.items()}
    try:
        logs = {r: started[r][2] for r in started}
        deadline = time.monotonic() + 300
        while not all("connected to peers" in logs[r].read_text() for r in logs):
            assert time.monotonic() < deadline, "DWDP ranks did not connect"
            for r, (proc, _, log) in started.items():
                assert proc.poll() is None, f"rank {r} exited early:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        killed_at = time.monotonic()
        kill_engine(started[1][0])
        with pytest.raises(RuntimeError) as e:
            wait_engine(*started[0], timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        for proc, _, _ in started.values():
            kill_engine(proc)
    assert elapsed < 30, f"rank 0 took {elapsed:.0f} s to stop after its peer died"
    assert "DWDP rank(s) [1] sent no heartbeat for 5 s" in logs[0].read_text()
    assert "restart all DWDP ranks together" in str(e.value) + logs[0].read_text()


@pytest.mark.equality
def test_fp8_experts_split_over_ranks_match_one_rank(moe_checkpoint, tmp_path):
    """Block-FP8 experts (weights and their block scales) pulled from a peer give the same
    tokens as one engine holding every expert. (Stock vLLM has no FP8 MoE kernel on CPU; on
    GPU, tests/dwdp/test_dwdp_gpu.py compares FP8 DWDP with stock vLLM itself.)"""
    model = moe_checkpoint("qwen3_moe_fp8")
    port = next(_ports)
    owners = [0, 1, 1, 0, 1, 0, 0, 1]
    one_rank = pool.submit(one_rank_spec(model), name="one_rank")
    results = run_engines({
        f"rank{r}": dict(dwdp_spec(model, r, 2, port, expert_owners=owners),
                         dtype="bfloat16", dwdp_stats=True, **stay_until_both_done(tmp_path, r))
        for r in (0, 1)})
    results["one_rank"] = pool.result(one_rank)
    for rank in ("rank0", "rank1"):
        assert_outputs_equal(results["one_rank"], results[rank], names=("one_rank", rank),
                             logprob_atol=2e-2)
        stats = results[rank]["dwdp_stats_after"]
        # 4 remote experts a layer: fp8 weights (2*256*128 + 128*256 bytes) and their scales.
        per_layer = 4 * (2 * 256 * 128 + 128 * 256 + 4 * (2 * 2 * 1 + 1 * 2))
        assert all(s["bytes_pulled"] % per_layer == 0 and s["bytes_pulled"] > 0 for s in stats)

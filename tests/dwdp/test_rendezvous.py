"""The DWDP rendezvous with real processes: Unix sockets, JSON manifests, memfd descriptors
passed with SCM_RIGHTS, the composite ranges built from them, and peer-death detection."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import stat
import time

import pytest
import torch

from tests.harness.sockets import tcp_listeners_of
from vllm_dwdp.expert_pages import (ReceiveSlot, build_layer, compose_layer, fill_static,
                                    map_export, pull_copies)
from vllm_dwdp.placement import owner_spans
from vllm_dwdp.rendezvous import PeerFailure, PeerGroup, private_dir
from vllm_moe_core.composite_memory import HostMemory

E = 7           # experts: 3 ranks own 3 + 2 + 2
SHAPES = {"w13": (E, 96, 40), "w2": (E, 40, 48), "scale": (E, 3)}  # scale: replicated


def full_layer() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _rank(rank: int, world: int, group: str, base: str, out: mp.Queue, linger: float) -> None:
    try:
        memory = HostMemory()
        spans = owner_spans(E, world)
        first, last = spans[rank]
        full = full_layer()
        pages = build_layer("layer0", {k: v[first:last].contiguous() for k, v in full.items()},
                            E, first, last, memory)
        compose_layer(pages, ReceiveSlot(memory, 0), memory, torch.device("cpu"))
        g = PeerGroup(group, rank, world, timeout_s=30, base_dir=base)
        g.publish({"tensors": pages.manifest(memory.page)}, pages.fds())
        pages.close_fds(memory)
        peers = {r: map_export(memory, fds, m["tensors"]) for r, (m, fds) in g.gather().items()}
        fill_static(pages, spans, peers)
        for dst, src in pull_copies(pages, spans, peers):
            dst.copy_(src)
        equal = all(torch.equal(pages.views[k], full[k]) for k in full)
        died = []
        g.on_failure = lambda why: died.append((time.monotonic(), why))
        g.start_watching()
        served = g.wait_served(30)
        out.put(("ready", rank, equal and served, os.getpid(), sorted(os.listdir(g.dir)),
                 tcp_listeners_of(os.getpid(), children=False)))
        deadline = time.monotonic() + linger
        while time.monotonic() < deadline and not died:
            time.sleep(0.01)
        out.put(("done", rank, died[0] if died else None))
    except Exception as e:  # noqa: BLE001 - reported to the test
        out.put(("error", rank, repr(e)))


def _start(world, group, base, linger):
    """Start ``world`` rank processes; each reports on a queue of its own (a rank SIGKILLed
    while its queue's feeder thread holds the queue's lock would block every other writer)."""
    ctx = mp.get_context("spawn")
    queues = [ctx.Queue() for _ in range(world)]
    procs = [ctx.Process(target=_rank, args=(r, world, group, base, queues[r], linger))
             for r in range(world)]
    for p in procs:
        p.start()
    return queues, procs


def test_three_ranks_compose_every_expert_from_their_peers(tmp_path):
    """Every rank ends up with the full [E, ...] tensors, bit for bit, and the rendezvous
    directory is empty once all have connected (nobody listens any more)."""
    queues, procs = _start(3, "g3", str(tmp_path), linger=0)
    msgs = [q.get(timeout=120) for q in queues for _ in range(2)]
    for p in procs:
        p.join(30)
    ready = [m for m in msgs if m[0] == "ready"]
    assert len(ready) == 3, msgs
    assert all(m[2] for m in ready), "a rank's composite tensors differ from the full layer"
    assert all(m[5] == [] for m in ready), [m[5] for m in ready]  # no TCP listener at all
    assert not os.listdir(tmp_path / "g3")
    assert stat.S_IMODE(os.stat(tmp_path / "g3").st_mode) == 0o700


def test_a_killed_rank_is_reported_by_number_at_once(tmp_path):
    queues, procs = _start(2, "gk", str(tmp_path), linger=60)
    ready = {}
    for q in queues:
        m = q.get(timeout=120)
        assert m[0] == "ready", m
        ready[m[1]] = m
    killed = time.monotonic()
    os.kill(ready[1][3], signal.SIGKILL)
    m = queues[0].get(timeout=30)
    assert m[0] == "done" and m[1] == 0 and m[2] is not None, m
    when, why = m[2]
    assert when - killed < 2.0  # the watcher sees the closed socket or pidfd at once
    assert f"DWDP rank 1 (pid {ready[1][3]}) exited" in why
    assert "restart all DWDP ranks together" in why
    for p in procs:
        p.join(30)


def test_a_missing_rank_times_out_naming_it(tmp_path):
    g = PeerGroup("gm", 0, 2, timeout_s=1, base_dir=str(tmp_path))
    g.publish({}, [])
    with pytest.raises(PeerFailure, match=r"DWDP rank 1 of group 'gm' did not come up within 1 s"):
        g.gather()
    g.close()
    assert not os.listdir(tmp_path / "gm")


def test_the_same_rank_twice_is_refused(tmp_path):
    g = PeerGroup("gd", 0, 2, timeout_s=5, base_dir=str(tmp_path))
    try:
        with pytest.raises(PeerFailure, match="rank 0 of group 'gd' is already running"):
            PeerGroup("gd", 0, 2, timeout_s=5, base_dir=str(tmp_path))
    finally:
        g.close()


def test_rendezvous_directory_must_be_private(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    with pytest.raises(PeerFailure, match="has mode 755: others may enter it"):
        private_dir(str(open_dir))
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(PeerFailure, match="is not a directory"):
        private_dir(str(link))
    with pytest.raises(PeerFailure, match="dwdp.group must be"):
        PeerGroup("../etc", 0, 2, timeout_s=1, base_dir=str(tmp_path))


def test_ranks_serving_different_models_are_told_before_loading(tmp_path):
    """The identity check runs before any weight loads: both ranks learn what differs."""
    import threading

    mine = {"hf_config_sha256": "aaaa", "dtype": "torch.bfloat16", "vllm": "0.32.0"}
    theirs = dict(mine, hf_config_sha256="bbbb")
    errors = {}

    def rank(r, identity):
        g = PeerGroup("gi", r, 2, timeout_s=20, base_dir=str(tmp_path))
        try:
            g.check_identities(identity)
        except PeerFailure as e:
            errors[r] = str(e)
        finally:
            time.sleep(0.5)  # let the other rank read this one's identity
            g.close()

    threads = [threading.Thread(target=rank, args=(0, mine)),
               threading.Thread(target=rank, args=(1, theirs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(errors) == {0, 1}
    assert "DWDP rank 1 serves hf_config_sha256 = 'bbbb' where rank 0 serves 'aaaa'" in errors[0]
    assert "must run the same model" in errors[1]

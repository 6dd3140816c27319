"""Shared fixtures and hardware markers.

Markers: ``gpu`` needs one CUDA device, ``gpu_2`` two. On machines with fewer CUDA devices
they are skipped, with the reason, unless GPU tests were asked for (``-m`` naming ``gpu``, or
``VLLM_DWDP_REQUIRE_GPU=1``, which ``scripts/gpu-check.sh`` sets): then a missing or broken
CUDA fails them, with what torch reported. The tests themselves never fake a device.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.harness.checkpoints import BUILDERS


def _cuda_devices() -> tuple[int, str]:
    """(CUDA devices usable here, why not all of them are when that is known)."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - reported as the reason, never swallowed
        return 0, f"torch does not import: {e!r}"
    try:
        if not torch.cuda.is_available():
            return 0, f"torch {torch.__version__} sees no CUDA device"
        return torch.cuda.device_count(), ""
    except Exception as e:  # noqa: BLE001 - a broken driver or runtime
        return 0, f"CUDA is broken: {e!r}"


def gpu_tests_requested(config) -> bool:
    """GPU tests were asked for: ``-m`` names a gpu marker, or VLLM_DWDP_REQUIRE_GPU=1."""
    if os.environ.get("VLLM_DWDP_REQUIRE_GPU", "") not in ("", "0"):
        return True
    expr = config.getoption("markexpr", "") or ""
    return bool(re.search(r"(?<!not )\bgpu(_2)?\b", expr))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs one CUDA GPU")
    config.addinivalue_line("markers", "gpu_2: needs two CUDA GPUs")
    config.addinivalue_line("markers", "multinode: brings up several network-namespace nodes")


def pytest_collection_modifyitems(config, items):
    required = gpu_tests_requested(config)
    have, why = None, ""
    for item in items:
        need = 2 if "gpu_2" in item.keywords else 1 if "gpu" in item.keywords else 0
        if not need:
            continue
        if have is None:
            have, why = _cuda_devices()
        if need <= have:
            continue
        reason = f"needs {need} CUDA GPU(s), found {have}" + (f" ({why})" if why else "")
        if required:
            item.stash[_GPU_MISSING] = reason
        else:
            item.add_marker(pytest.mark.skip(reason=reason))


_GPU_MISSING = pytest.StashKey[str]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """GPU tests were asked for but the GPUs are not there: fail, saying why."""
    reason = item.stash.get(_GPU_MISSING, None)
    if reason is not None:
        pytest.fail(f"GPU tests were asked for, but this test {reason}", pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    from tests.harness import pool

    pool.stop()  # an engine still running (an interrupted run) does not outlive the session


@pytest.fixture(scope="session")
def moe_checkpoint(tmp_path_factory):
    """``moe_checkpoint("qwen3_moe")`` -> path of a small random checkpoint (built once)."""
    root = tmp_path_factory.mktemp("checkpoints")

    def get(kind: str, **kwargs) -> str:
        name = kind + "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))
        return str(BUILDERS[kind](root / name, **kwargs))

    return get

"""Shared fixtures and hardware markers.

Markers: ``gpu`` needs one CUDA device, ``gpu_2`` two. They are skipped, with the reason,
on machines that have fewer CUDA devices: the tests themselves never fake a device.
"""

from __future__ import annotations

import pytest

from tests.harness.checkpoints import BUILDERS


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs one CUDA GPU")
    config.addinivalue_line("markers", "gpu_2: needs two CUDA GPUs")
    config.addinivalue_line("markers", "multinode: brings up several network-namespace nodes")


def pytest_collection_modifyitems(config, items):
    have = _cuda_devices()
    for item in items:
        need = 2 if "gpu_2" in item.keywords else 1 if "gpu" in item.keywords else 0
        if need > have:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPU(s), found {have}"))


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

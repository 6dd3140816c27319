"""Which vLLM is installed, and whether these plugins support it.

One cached lookup, with an override for source builds whose version string is not a
release (``VLLM_DWDP_VLLM_VERSION=0.32.0``).
"""

from __future__ import annotations

import functools
import os

from packaging.version import InvalidVersion, Version

SUPPORTED_MIN = Version("0.26.0")
SUPPORTED_MAX_EXCLUSIVE = Version("0.34.0")
SUPPORTED_RANGE = "0.26 through 0.33"


class UnsupportedVllmVersion(RuntimeError):
    pass


@functools.cache
def vllm_version() -> Version:
    raw = os.environ.get("VLLM_DWDP_VLLM_VERSION")
    if raw is None:
        import vllm

        raw = vllm.__version__
    try:
        return Version(raw)
    except InvalidVersion:
        raise UnsupportedVllmVersion(
            f"Cannot parse the installed vLLM version {raw!r}. If this is a source build, "
            f"set VLLM_DWDP_VLLM_VERSION to the release it is based on (e.g. 0.32.0)."
        ) from None


def vllm_at_least(version: str) -> bool:
    return vllm_version().release >= Version(version).release


def is_supported() -> bool:
    v = Version(vllm_version().base_version)
    return SUPPORTED_MIN <= v < SUPPORTED_MAX_EXCLUSIVE


def check_supported(plugin: str) -> None:
    """Raise with the supported range when the installed vLLM is outside it."""
    if not is_supported():
        raise UnsupportedVllmVersion(
            f"{plugin} supports vLLM {SUPPORTED_RANGE}, but vLLM {vllm_version()} is installed. "
            f"Install a supported vLLM (e.g. pip install 'vllm>=0.26,<0.34'), or turn {plugin} "
            f"off by removing it from --additional-config."
        )

"""Run engines for the FlexTensor tests: the shared harness's runner, plus FlexTensor's plan
and counters read through ``llm.collective_rpc`` after generating.

``python -m tests.flextensor.engines SPEC.json OUT.json``; :func:`run_flextensor_engines` runs
specs each in its own process: CUDA ones side by side, CPU ones through the session's
engine pool (:mod:`tests.harness.pool`: two at a time, a spec already
run in this session not run again).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

import pytest

from tests.harness import pool
from tests.harness.equality import run_engines

RUNNER = "tests.flextensor.engines"


def runner_for(spec: dict) -> str:
    """This module for FlexTensor engines (their counters) and compiled plugin engines; the
    shared harness's runner for the rest, so a stock reference is the same run everywhere."""
    flex = spec.get("additional_config", {}).get("flextensor", {}).get("enabled")
    return RUNNER if flex or spec.get("compile_on_cpu") else pool.RUN_ENGINE


def module_engines(plans: dict[str, Callable[..., dict[str, dict]]]):
    """A module-scoped ``engines`` fixture: starts the engines of every selected test of the
    module that ``plans`` names (test name -> ``plan(moe_checkpoint=..., **params)`` -> specs),
    two at a time, in test order, and waits for them all before the next module."""
    @pytest.fixture(scope="module")
    def engines(request, moe_checkpoint):
        futures = pool.prefetch(request, plans, runner_for, 900, moe_checkpoint=moe_checkpoint)
        yield
        pool.wait(futures)

    return engines


def run_flextensor_engines(specs: dict[str, dict], timeout: float = 900) -> dict[str, dict]:
    """Each spec in its own process; results by name (with ``log_path``). CUDA specs side by
    side (each sizes its KV cache from ``kv_cache_memory_bytes``, not from the GPU's free
    memory), CPU specs through the session's engine pool."""
    if all(spec.get("device", "cpu") == "cpu" for spec in specs.values()):
        return pool.run(specs, runner_for, timeout)
    return run_engines(specs, timeout, runner=runner_for)


def expert_homes_vs_checkpoint(worker, model_dir: str) -> dict:
    """Worker-side: for every offloaded MoE layer, how far the experts' host homes are from
    the checkpoint's tensors, and how far each GPU cache slot is from its expert's home
    (both must be exactly 0: weights go from the checkpoint to their home unchanged)."""
    import glob

    import torch
    from safetensors.torch import load_file

    from vllm_flextensor.moe_layer import FlexTensorRuntime

    ckpt = {}
    for f in sorted(glob.glob(f"{model_dir}/*.safetensors")):
        ckpt.update(load_file(f))

    def same(a, b) -> bool:
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.dtype == torch.float8_e4m3fn:
            return torch.equal(a.view(torch.uint8), b.to(a.dtype).view(torch.uint8))
        return torch.equal(a, b.to(a.dtype))

    report = {}
    runtime = FlexTensorRuntime.get()
    for layer in runtime.layers if runtime else []:
        prefix = layer.layer_name
        bad_home, bad_cache = [], []
        for e in range(layer.local_num_experts):
            want = {}
            for suffix in ("weight", "weight_scale_inv"):
                g = ckpt.get(f"{prefix}.{e}.gate_proj.{suffix}")
                if g is None:
                    continue
                want[f"w13_{suffix}"] = torch.cat([g, ckpt[f"{prefix}.{e}.up_proj.{suffix}"]])
                want[f"w2_{suffix}"] = ckpt[f"{prefix}.{e}.down_proj.{suffix}"]
            if not want or any(not same(layer.flextensor_host[n][e], t) for n, t in want.items()):
                bad_home.append(e)
        for slot, e in enumerate(layer.flextensor_policy.expert_in):
            if any(not same(layer.flextensor_cache[n][slot], layer.flextensor_host[n][e])
                   for n in layer.flextensor_cache):
                bad_cache.append((slot, e))
        report[prefix] = {"experts_not_as_in_checkpoint": bad_home,
                          "cache_slots_not_as_home": bad_cache}
    return report


def main() -> None:
    from tests.harness import run_engine

    spec_path, out_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("compile_on_cpu"):
        # Plugin engines on CPU normally run eagerly; this one compiles, as CUDA engines do,
        # so CI runs the compiled path (the routed-experts op torch.compile must not trace).
        import vllm_moe_core.vllm_compat

        vllm_moe_core.vllm_compat.run_without_cuda_graphs = lambda *args, **kwargs: None
    stats = {}
    if spec.get("additional_config", {}).get("flextensor", {}).get("enabled"):
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # rpc with a function
        from vllm import LLM

        from vllm_flextensor import worker_stats

        generate = LLM.generate

        def generate_then_read_stats(self, *args, **kwargs):
            out = generate(self, *args, **kwargs)
            stats["after"] = self.collective_rpc(worker_stats)[0]
            stats["homes"] = self.collective_rpc(expert_homes_vs_checkpoint,
                                                 args=(spec["model"],))[0]
            return out

        LLM.generate = generate_then_read_stats
    result = run_engine.run(spec)
    result["flextensor_stats"] = stats.get("after")
    result["flextensor_homes"] = stats.get("homes")
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()

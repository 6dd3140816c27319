"""The equality harness: the same checkpoint through stock vLLM and vLLM with the plugins
loaded and enabled, each engine in its own process, through vLLM's real checkpoint loader.
On CPU the stock engine of a checkpoint runs once a session (tests/harness/pool.py): the
DWDP and FlexTensor tests compare against the same run, and the offloading FlexTensor engine
here is the one tests/flextensor/test_flextensor_cpu.py checks (the same spec runs once).

What each plugin engine exercises:

- FlexTensor with a GPU budget that holds 1-2 of each layer's experts: the rest live in host
  memory and are streamed every step (the counters must show it);
- DWDP with one rank: DWDP's layer, expert slab and split-weight kernel replace vLLM's
  routed experts, with every expert local, so nothing is pulled. Pulling from peers is
  tests/dwdp/test_dwdp_cpu.py::test_two_ranks_match_stock (and the GPU tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.flextensor.engines import run_flextensor_engines, runner_for
from tests.flextensor.test_flextensor_cpu import flex_spec, offloaded_specs, weights_of
from tests.harness import pool
from tests.harness.equality import PROMPTS, assert_outputs_equal, run_engines, stock_spec
from tests.harness.results import record_result
from vllm_flextensor.planner import budget_for_cache_slots

pytestmark = pytest.mark.equality

# The CPU offload of test_flextensor_cpu.py::test_offloaded_experts_match_stock, per checkpoint
# (cache slots, pre-staging), so its engine is shared.
OFFLOADED = {"qwen3_moe": (2, True), "qwen2_moe": (1, False)}


def _spec(model: str, device: str, **extra) -> dict:
    return dict(model=model, prompts=PROMPTS, max_tokens=8, logprobs=5, device=device, **extra)


def _dwdp_one_rank_spec(model: str, device: str) -> dict:
    # collective_rpc with a function (the stats reader) needs vLLM's pickle fallback.
    return _spec(model, device, additional_config={"dwdp": {"enabled": True}}, dwdp_stats=True,
                 env={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"})


def _flextensor_offload_spec(moe_checkpoint, kind: str, device: str) -> dict:
    if device == "cpu":
        slots, prestage = OFFLOADED[kind]
        return offloaded_specs(moe_checkpoint, kind, slots, prestage)["flextensor"]
    model = moe_checkpoint(kind)
    experts = json.loads((Path(model) / "config.json").read_text())["num_experts"]
    # A quarter of the experts cached (on CUDA the worker measures the non-expert bytes, so
    # the cache may come out a slot smaller), the rest streamed.
    spec = flex_spec(model, budget_for_cache_slots(weights_of(model), experts // 4))
    return dict(spec, device=device, engine_kwargs={"kv_cache_memory_bytes": 1 << 28})


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe"])
def test_offloading_flextensor_and_one_rank_dwdp_match_stock(moe_checkpoint, kind, device):
    """Stock vLLM; vLLM with FlexTensor offloading most experts; vLLM with DWDP's layer and
    kernel on one rank (one engine runs one plugin): the plugin engines give stock's greedy
    tokens, and the plugins are loaded only where expected."""
    model = moe_checkpoint(kind)
    plugins = {"dwdp": _dwdp_one_rank_spec(model, device),
               "flextensor": _flextensor_offload_spec(moe_checkpoint, kind, device)}
    if device == "cpu":  # side by side, the stock run shared with the other CPU tests
        reference = pool.submit(stock_spec(model), name="stock")
        results = {**run_flextensor_engines(plugins), "stock": pool.result(reference)}
    else:
        results = run_engines({"stock": _spec(model, device, env={"VLLM_PLUGINS": ""}),
                               **plugins}, concurrent=False, runner=runner_for)
    logs = {name: open(r["log_path"]).read() for name, r in results.items()}
    # The plugins were really loaded and enabled where asked, and not in the stock engine.
    for name, enabled_line in (("dwdp", "DWDP enabled"), ("flextensor", "FlexTensor enabled")):
        assert "vllm-dwdp plugin 'dwdp' loaded" in logs[name]
        assert "vllm-dwdp plugin 'flextensor' loaded" in logs[name]
        assert enabled_line in logs[name]
    assert "DWDP enabled" not in logs["flextensor"] and "FlexTensor enabled" not in logs["dwdp"]
    assert "vllm-dwdp plugin" not in logs["stock"]

    # FlexTensor offloaded: most experts' homes in host memory, streamed while generating.
    stats = results["flextensor"]["flextensor_stats"]
    plan, totals = stats["plan"], stats["totals"]
    assert plan["cache_slots"] <= plan["experts_per_layer"] // 2  # most experts offloaded
    assert totals["bytes_streamed"] > 0 and totals["experts_streamed"] > 0
    # DWDP's layer ran every forward pass, on one rank with every expert local.
    dwdp = results["dwdp"]["dwdp_stats_after"]
    assert dwdp and all(s["forwards"] > 0 and s["bytes_pulled"] == 0 for s in dwdp)

    record = {"model": kind, "flextensor_plan": {k: plan[k] for k in
                                                 ("cache_slots", "experts_per_layer")},
              "flextensor_bytes_streamed": totals["bytes_streamed"]}
    for name in ("dwdp", "flextensor"):
        worst = assert_outputs_equal(results["stock"], results[name], names=("stock", name))
        assert all(len(o["token_ids"]) == 8 for o in results[name]["outputs"])
        record[name] = {
            "tokens_equal": True, "max_logprob_abs_diff": worst,
            "plugin_log_lines": [l for l in logs[name].splitlines()
                                 if "vllm-dwdp" in l or "DWDP" in l or "FlexTensor" in l][:6],
        }
    record_result(f"equality_stock_{kind}_{device}", record)

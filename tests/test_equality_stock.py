"""The equality harness: the same checkpoint through stock vLLM and vLLM with the plugins
loaded and enabled, each engine in its own process, through vLLM's real checkpoint loader."""

from __future__ import annotations

import pytest

from tests.harness.equality import assert_outputs_equal, run_engines
from tests.harness.results import record_result

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [42, 17, 99], list(range(100, 140))]


def _spec(model: str, device: str, **extra) -> dict:
    return dict(model=model, prompts=PROMPTS, max_tokens=8, logprobs=5, device=device, **extra)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe"])
def test_plugins_enabled_match_stock(moe_checkpoint, kind, device):
    model = moe_checkpoint(kind)
    plugins_on = {"dwdp": {"enabled": True}, "flextensor": {"enabled": True}}
    results = run_engines({
        "stock": _spec(model, device, env={"VLLM_PLUGINS": ""}),
        "plugin": _spec(model, device, additional_config=plugins_on),
    }, concurrent=device == "cpu")
    # The plugins were really loaded in the plugin engine, and not in the stock one.
    plugin_log = open(results["plugin"]["log_path"]).read()
    stock_log = open(results["stock"]["log_path"]).read()
    assert "vllm-dwdp plugin 'dwdp' loaded" in plugin_log
    assert "DWDP enabled" in plugin_log
    assert "vllm-dwdp plugin" not in stock_log
    worst = assert_outputs_equal(results["stock"], results["plugin"])
    assert all(len(o["token_ids"]) == 8 for o in results["plugin"]["outputs"])
    record_result(f"equality_stock_{kind}_{device}", {
        "tokens_equal": True, "max_logprob_abs_diff": worst, "model": kind,
        "plugin_log_lines": [l for l in plugin_log.splitlines() if "vllm-dwdp" in l or "DWDP" in l][:6],
    })

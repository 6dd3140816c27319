"""The equality harness: the same checkpoint through stock vLLM and vLLM with the plugins
loaded and enabled, each engine in its own process, through vLLM's real checkpoint loader.
On CPU the stock engine of a checkpoint runs once a session (tests/harness/pool.py): the
DWDP and FlexTensor tests compare against the same run."""

from __future__ import annotations

import pytest

from tests.harness import pool
from tests.harness.equality import PROMPTS, assert_outputs_equal, run_engines, stock_spec
from tests.harness.results import record_result


def _spec(model: str, device: str, **extra) -> dict:
    return dict(model=model, prompts=PROMPTS, max_tokens=8, logprobs=5, device=device, **extra)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe"])
def test_plugins_enabled_match_stock(moe_checkpoint, kind, device):
    """Stock vLLM, vLLM with DWDP on and vLLM with FlexTensor on (one engine runs one of
    them), all with both plugins installed except the stock one."""
    model = moe_checkpoint(kind)
    plugins = {
        "dwdp": _spec(model, device, additional_config={"dwdp": {"enabled": True}}),
        "flextensor": _spec(model, device, additional_config={"flextensor": {"enabled": True}}),
    }
    if device == "cpu":  # side by side, the stock run shared with the other CPU tests
        reference = pool.submit(stock_spec(model), name="stock")
        results = {**run_engines(plugins), "stock": pool.result(reference)}
    else:
        results = run_engines({"stock": _spec(model, device, env={"VLLM_PLUGINS": ""}),
                               **plugins}, concurrent=False)
    logs = {name: open(r["log_path"]).read() for name, r in results.items()}
    # The plugins were really loaded and enabled where asked, and not in the stock engine.
    for name, enabled_line in (("dwdp", "DWDP enabled"), ("flextensor", "FlexTensor enabled")):
        assert "vllm-dwdp plugin 'dwdp' loaded" in logs[name]
        assert "vllm-dwdp plugin 'flextensor' loaded" in logs[name]
        assert enabled_line in logs[name]
    assert "DWDP enabled" not in logs["flextensor"] and "FlexTensor enabled" not in logs["dwdp"]
    assert "vllm-dwdp plugin" not in logs["stock"]
    record = {"model": kind}
    for name in ("dwdp", "flextensor"):
        worst = assert_outputs_equal(results["stock"], results[name])
        assert all(len(o["token_ids"]) == 8 for o in results[name]["outputs"])
        record[name] = {
            "tokens_equal": True, "max_logprob_abs_diff": worst,
            "plugin_log_lines": [l for l in logs[name].splitlines()
                                 if "vllm-dwdp" in l or "DWDP" in l or "FlexTensor" in l][:6],
        }
    record_result(f"equality_stock_{kind}_{device}", record)

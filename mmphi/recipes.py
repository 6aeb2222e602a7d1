"""The recipes: one YAML file per size and stage under `recipes/` (`tiny`: `make demo`; `real`: the GPU runs of
scripts/recipes/; `smoke`: seconds on a CPU), each value with its reason. A stage reads one with `--config FILE`
(TRL's `TrlParser`); flags after it override the file's values.
"""

from __future__ import annotations

import os

import yaml

RECIPES_DIR = os.environ.get(
    "MMPHI_RECIPES", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
SIZES = ("tiny", "real", "smoke")
STAGES = ("pretrain", "clip", "projector", "instruct")


def recipe_path(size: str, stage: str) -> str:
    """`recipes/<size>/<stage>.yaml`, or a clear error naming what exists."""
    if size not in SIZES or stage not in STAGES:
        raise ValueError(f"no recipe {size}/{stage}: sizes are {', '.join(SIZES)}; stages {', '.join(STAGES)}")
    path = os.path.join(RECIPES_DIR, size, f"{stage}.yaml")
    if not os.path.isfile(path):
        known = sorted(name.removesuffix(".yaml") for name in os.listdir(os.path.dirname(path))) \
            if os.path.isdir(os.path.dirname(path)) else []
        raise FileNotFoundError(f"{path}: no {size} recipe for {stage} (there: {', '.join(known) or 'none'}; "
                                "the recipes live in the repository's recipes/ folder, or set MMPHI_RECIPES)")
    return path


def read_recipe(size: str, stage: str) -> dict:
    """A recipe's values, as the stage parser sees them."""
    with open(recipe_path(size, stage), encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def recipe_args(size: str, stage: str) -> list[str]:
    """The command-line flags that apply a recipe: `["--config", path]`."""
    return ["--config", recipe_path(size, stage)]

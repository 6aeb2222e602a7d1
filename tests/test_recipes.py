"""recipes/ and scripts/recipes/: every recipe file is one the stage parser accepts, with a reason on every value;
the launchers check their data paths (a missing one is a clear error naming it and the variable that sets it), print
the `accelerate launch` command they would run (one GPU, or N GPUs) with the recipe file, and the SMOKE=1 variants
run the three stages end to end on the CPU."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess

import pytest

from mmphi.recipes import SIZES, STAGES, read_recipe, recipe_path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO_ROOT, "scripts", "recipes")
RECIPE_FILES = [(size, stage) for size in SIZES for stage in STAGES
                if os.path.isfile(os.path.join(REPO_ROOT, "recipes", size, f"{stage}.yaml"))]


def recipe(name: str, env: dict | None = None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    unset = ("SMOKE", "DRY_RUN", "NUM_GPUS", "ACCELERATE_CONFIG", "MAX_STEPS", "MICRO_BATCH", "GRAD_ACCUM")
    full_env = {k: v for k, v in os.environ.items() if k not in unset}
    full_env.update(HF_HUB_OFFLINE="1", **(env or {}))
    result = subprocess.run(["bash", os.path.join(RECIPES, name), *args], cwd=REPO_ROOT, env=full_env,
                            capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def printed_commands(output: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in output.splitlines() if line.startswith("+ ")]


@pytest.fixture
def real_layout(tmp_path):
    """Empty stand-ins at the real data paths: enough for the recipes' checks in a dry run."""
    coco, llava, redpajama = tmp_path / "coco", tmp_path / "llava", tmp_path / "redpajama"
    for folder in (coco / "annotations", coco / "train2017", coco / "val2017", llava, redpajama,
                   tmp_path / "tokenizer", tmp_path / "projector"):
        folder.mkdir(parents=True)
    for file in (coco / "annotations" / "captions_train2017.json", coco / "annotations" / "captions_val2017.json",
                 llava / "llava_instruct_150k.json", redpajama / "c4_sample.jsonl",
                 redpajama / "cc_2023-06_sample.jsonl", tmp_path / "projector" / "config.json"):
        file.write_text("")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    return {"COCO_DIR": str(coco), "LLAVA_JSON": str(llava / "llava_instruct_150k.json"),
            "REDPAJAMA_DIR": str(redpajama), "TOKENIZER": str(tmp_path / "tokenizer"),
            "BASE_MODEL": str(tmp_path / "base"), "PROJECTOR_MODEL": str(tmp_path / "projector"), "DRY_RUN": "1"}


@pytest.mark.parametrize("name, variable, missing", [
    ("pretrain.sh", "REDPAJAMA_DIR", "RedPajama folder not found"),
    ("projector.sh", "COCO_DIR", "COCO training captions not found"),
    ("instruct.sh", "LLAVA_JSON", "LLaVA-Instruct-150K conversations not found"),
])
def test_missing_data_is_a_clear_error_naming_the_path(tmp_path, name, variable, missing):
    path = str(tmp_path / "nowhere")
    result = recipe(name, {variable: path, "DRY_RUN": "1"}, check=False)
    assert result.returncode == 2
    assert missing in result.stderr and path in result.stderr and f"set {variable}=" in result.stderr


def test_pretrain_empty_folder_and_missing_tokenizer_are_explained(real_layout, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = recipe("pretrain.sh", {**real_layout, "REDPAJAMA_DIR": str(empty)}, check=False)
    assert result.returncode == 2 and f"no c4*.jsonl* or cc*.jsonl* files in {empty}" in result.stderr
    result = recipe("pretrain.sh", {**real_layout, "TOKENIZER": "microsoft/phi-2"}, check=False)
    assert result.returncode == 2 and "not a local folder and HF_HUB_OFFLINE=1" in result.stderr


STAGE_MODULES = {f"scripts/{stage}.py": f"mmphi.stages.{stage}" for stage in STAGES}


def stage_module_accepts(script: str, args: list[str]) -> None:
    """Parse the recipe's flags with the stage's own parser (HfArgumentParser): an unknown or misspelt flag fails
    here, not hours into a GPU job."""
    import importlib

    module = importlib.import_module(STAGE_MODULES[script])
    parsed = module.parse_args(args)
    assert parsed
    return parsed


@pytest.mark.parametrize("name, script, expected", [
    ("pretrain.sh", "scripts/pretrain.py", {"config_name": "phi-2", "block_size": 2048,
                                            "per_device_train_batch_size": 4}),
    ("projector.sh", "scripts/projector.py", {"cache_vision_features": True, "learning_rate": 1e-3}),
    ("instruct.sh", "scripts/instruct.py", {"load_in_4bit": True, "lora_r": 64, "max_length": 2048,
                                            "per_device_train_batch_size": 4, "merge": True}),
])
def test_real_recipe_prints_a_one_gpu_launch_with_flags_the_stage_accepts(real_layout, name, script, expected):
    result = recipe(name, real_layout)
    assert "dry run: nothing is started" in result.stdout
    command = printed_commands(result.stdout)[-1]
    launch = ["accelerate", "launch", "--config_file", "scripts/configs/single_gpu.yaml", script]
    assert command[: len(launch)] == launch
    stage_args = command[len(launch):]
    assert stage_args[:2] == ["--config", f"recipes/real/{os.path.basename(script)[:-3]}.yaml"]
    model_args, data_args, training_args = stage_module_accepts(script, stage_args)
    for key, value in expected.items():
        parsed = [getattr(args, key) for args in (model_args, data_args, training_args) if hasattr(args, key)]
        assert parsed == [value], key


def test_size_variables_override_the_recipe_file(real_layout):
    result = recipe("pretrain.sh", {**real_layout, "MICRO_BATCH": "2", "GRAD_ACCUM": "8", "MAX_STEPS": "10"})
    stage_args = printed_commands(result.stdout)[-1][5:]
    _, _, training_args = stage_module_accepts("scripts/pretrain.py", stage_args)
    assert (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps,
            training_args.max_steps) == (2, 8, 10)


@pytest.mark.parametrize("size, stage", RECIPE_FILES)
def test_every_recipe_value_parses_and_has_its_reason(size, stage):
    """Each recipe file is read by its stage's own parser (an unknown or misspelt key fails here, not hours into a
    GPU job), and every value line carries a one-line reason."""
    values = read_recipe(size, stage)
    assert values
    with open(recipe_path(size, stage), encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip() and not line.lstrip().startswith("#")]
    assert all("#" in line for line in lines), [line for line in lines if "#" not in line]
    needed = {"pretrain": ["--train_files", "x.jsonl"], "clip": ["--data_path", "x.json"]}.get(
        stage, ["--model_name_or_path", "x", "--data_path", "x.json"])
    parsed = stage_module_accepts(f"scripts/{stage}.py", ["--config", recipe_path(size, stage), *needed])
    for key, value in values.items():  # report_to becomes a list
        assert any(getattr(args, key, None) in (value, [value]) for args in parsed), key


def test_multi_gpu_variant_and_sharded_config(real_layout):
    result = recipe("pretrain.sh", {**real_layout, "NUM_GPUS": "8"})
    command = printed_commands(result.stdout)[-1]
    assert command[:6] == ["accelerate", "launch", "--config_file", "scripts/configs/multi_gpu.yaml",
                           "--num_processes", "8"]
    assert "8 GPUs" in result.stdout
    result = recipe("pretrain.sh", {**real_layout, "NUM_GPUS": "8",
                                           "ACCELERATE_CONFIG": "scripts/configs/fsdp.yaml"}, "--optim",
                    "adamw_torch_fused")
    command = printed_commands(result.stdout)[-1]
    assert command[3] == "scripts/configs/fsdp.yaml" and command[-2:] == ["--optim", "adamw_torch_fused"]


def test_projector_launcher_builds_the_base_model_when_missing(real_layout, tmp_path):
    env = {**real_layout, "BASE_MODEL": str(tmp_path / "absent"), "VISION_MODEL": str(tmp_path / "tokenizer"),
           "TEXT_MODEL": str(tmp_path / "tokenizer")}
    commands = printed_commands(recipe("projector.sh", env).stdout)
    assert commands[0][1:3] == ["scripts/build_model.py", "--vision_model"]
    assert commands[0][-2:] == ["--output_dir", str(tmp_path / "absent")]


def final_losses(output_dir) -> list[float]:
    with open(os.path.join(output_dir, "trainer_state.json")) as handle:
        return [entry["loss"] for entry in json.load(handle)["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_smoke_recipes_run_the_three_stages_on_cpu(tmp_path):
    env = {"SMOKE": "1", "OUTPUT_ROOT": str(tmp_path)}
    for name in ("pretrain.sh", "projector.sh", "instruct.sh"):
        output = recipe(name, env).stdout
        assert "SMOKE: tiny, CPU" in output
    assert os.path.isfile(tmp_path / "pretrain" / "model.safetensors")
    assert os.path.isfile(tmp_path / "projector" / "config.json")  # a complete MM-Phi folder ...
    assert os.path.isfile(tmp_path / "instruct" / "adapter_model.safetensors")  # ... that instruct started from
    with open(tmp_path / "instruct" / "adapter_config.json") as handle:
        assert json.load(handle)["base_model_name_or_path"] == str(tmp_path / "projector")
    assert os.path.isfile(tmp_path / "instruct" / "merged" / "model.safetensors")
    for stage in ("pretrain", "projector", "instruct"):
        losses = final_losses(tmp_path / stage)
        assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)

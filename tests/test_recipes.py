"""scripts/recipes/: the real-size recipes check their data paths (a missing one is a clear error naming it and the
variable that sets it), print the `accelerate launch` command they would run (one GPU, or N GPUs), and every flag
they pass is one the stage script accepts; the SMOKE=1 variants run the three stages end to end on the CPU."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO_ROOT, "scripts", "recipes")


def recipe(name: str, env: dict | None = None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("SMOKE", "DRY_RUN", "NUM_GPUS", "ACCELERATE_CONFIG")}
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
                   tmp_path / "tokenizer", tmp_path / "stage1"):
        folder.mkdir(parents=True)
    for file in (coco / "annotations" / "captions_train2017.json", coco / "annotations" / "captions_val2017.json",
                 llava / "llava_instruct_150k.json", redpajama / "c4_sample.jsonl",
                 redpajama / "cc_2023-06_sample.jsonl", tmp_path / "stage1" / "config.json"):
        file.write_text("")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    return {"COCO_DIR": str(coco), "LLAVA_JSON": str(llava / "llava_instruct_150k.json"),
            "REDPAJAMA_DIR": str(redpajama), "TOKENIZER": str(tmp_path / "tokenizer"),
            "BASE_MODEL": str(tmp_path / "base"), "STAGE1_MODEL": str(tmp_path / "stage1"), "DRY_RUN": "1"}


@pytest.mark.parametrize("name, variable, missing", [
    ("stage0_pretrain.sh", "REDPAJAMA_DIR", "RedPajama folder not found"),
    ("stage1_projector.sh", "COCO_DIR", "COCO training captions not found"),
    ("stage2_instruct.sh", "LLAVA_JSON", "LLaVA-Instruct-150K conversations not found"),
])
def test_missing_data_is_a_clear_error_naming_the_path(tmp_path, name, variable, missing):
    path = str(tmp_path / "nowhere")
    result = recipe(name, {variable: path, "DRY_RUN": "1"}, check=False)
    assert result.returncode == 2
    assert missing in result.stderr and path in result.stderr and f"set {variable}=" in result.stderr


def test_stage0_empty_folder_and_missing_tokenizer_are_explained(real_layout, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = recipe("stage0_pretrain.sh", {**real_layout, "REDPAJAMA_DIR": str(empty)}, check=False)
    assert result.returncode == 2 and f"no c4*.jsonl* or cc*.jsonl* files in {empty}" in result.stderr
    result = recipe("stage0_pretrain.sh", {**real_layout, "TOKENIZER": "microsoft/phi-2"}, check=False)
    assert result.returncode == 2 and "not a local folder and HF_HUB_OFFLINE=1" in result.stderr


STAGE_MODULES = {"scripts/pretrain_phi2.py": "mmphi.stages.pretrain", "scripts/train_projector.py":
                 "mmphi.stages.projector", "scripts/finetune_instruct.py": "mmphi.stages.instruct"}


def stage_module_accepts(script: str, args: list[str]) -> None:
    """Parse the recipe's flags with the stage's own parser (HfArgumentParser): an unknown or misspelt flag fails
    here, not hours into a GPU job."""
    import importlib

    module = importlib.import_module(STAGE_MODULES[script])
    parsed = module.parse_args(args)
    assert parsed


@pytest.mark.parametrize("name, script, expected", [
    ("stage0_pretrain.sh", "scripts/pretrain_phi2.py",
     ["--config_name", "phi-2", "--block_size", "2048", "--per_device_train_batch_size", "4"]),
    ("stage1_projector.sh", "scripts/train_projector.py", ["--cache_vision_features"]),
    ("stage2_instruct.sh", "scripts/finetune_instruct.py",
     ["--quantization", "4bit", "--lora_r", "64", "--max_length", "2048", "--per_device_train_batch_size", "4"]),
])
def test_real_recipe_prints_a_one_gpu_launch_with_flags_the_stage_accepts(real_layout, name, script, expected):
    result = recipe(name, real_layout)
    assert "dry run: nothing is started" in result.stdout
    command = printed_commands(result.stdout)[-1]
    launch = ["accelerate", "launch", "--config_file", "scripts/configs/single_gpu.yaml", script]
    assert command[: len(launch)] == launch
    stage_args = command[len(launch):]
    for flag, value in zip(expected[::2], expected[1::2], strict=False):
        assert stage_args[stage_args.index(flag) + 1] == value
    assert all(flag in stage_args for flag in expected if flag.startswith("--"))
    stage_module_accepts(script, stage_args)


def test_multi_gpu_variant_and_sharded_config(real_layout):
    result = recipe("stage0_pretrain.sh", {**real_layout, "NUM_GPUS": "8"})
    command = printed_commands(result.stdout)[-1]
    assert command[:6] == ["accelerate", "launch", "--config_file", "scripts/configs/multi_gpu.yaml",
                           "--num_processes", "8"]
    assert "8 GPUs" in result.stdout
    result = recipe("stage0_pretrain.sh", {**real_layout, "NUM_GPUS": "8",
                                           "ACCELERATE_CONFIG": "scripts/configs/fsdp.yaml"}, "--optim",
                    "adamw_torch_fused")
    command = printed_commands(result.stdout)[-1]
    assert command[3] == "scripts/configs/fsdp.yaml" and command[-2:] == ["--optim", "adamw_torch_fused"]


def test_stage1_builds_the_base_model_when_missing(real_layout, tmp_path):
    env = {**real_layout, "BASE_MODEL": str(tmp_path / "absent"), "VISION_MODEL": str(tmp_path / "tokenizer"),
           "TEXT_MODEL": str(tmp_path / "tokenizer")}
    commands = printed_commands(recipe("stage1_projector.sh", env).stdout)
    assert commands[0][1:3] == ["scripts/build_model.py", "--vision_model"]
    assert commands[0][-2:] == ["--output_dir", str(tmp_path / "absent")]


def final_losses(output_dir) -> list[float]:
    with open(os.path.join(output_dir, "trainer_state.json")) as handle:
        return [entry["loss"] for entry in json.load(handle)["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_smoke_recipes_run_the_three_stages_on_cpu(tmp_path):
    env = {"SMOKE": "1", "OUTPUT_ROOT": str(tmp_path)}
    for name in ("stage0_pretrain.sh", "stage1_projector.sh", "stage2_instruct.sh"):
        output = recipe(name, env).stdout
        assert "SMOKE: tiny, CPU" in output
    assert os.path.isfile(tmp_path / "stage0" / "model.safetensors")
    assert os.path.isfile(tmp_path / "stage1" / "config.json")  # a complete MM-Phi folder ...
    assert os.path.isfile(tmp_path / "stage2" / "adapter_model.safetensors")  # ... that stage 2 started from
    with open(tmp_path / "stage2" / "adapter_config.json") as handle:
        assert json.load(handle)["base_model_name_or_path"] == str(tmp_path / "stage1")
    assert os.path.isfile(tmp_path / "stage2" / "merged" / "model.safetensors")
    for stage in ("stage0", "stage1", "stage2"):
        losses = final_losses(tmp_path / stage)
        assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)

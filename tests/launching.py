"""Launching a stage on two CPU processes and comparing it with one: what the DDP and FSDP tests share (not a test
module itself)."""

from __future__ import annotations

import importlib
import json
import os
import random
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from mmphi import TINY_TOKENIZER

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO_ROOT, "scripts")
CPU_CONFIG = os.path.join(SCRIPTS, "configs", "cpu_multiprocess.yaml")
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
TOKENIZER = TINY_TOKENIZER
LOSS_TOLERANCE = 1e-4  # relative; the runs differ only in float summation order
# Adam divides by the gradient's running RMS, so an element whose gradient is near zero can turn float-order noise
# into an update of up to one learning rate per step. So: nearly every element within a small fraction of one step's
# update, and none beyond what its steps could move it (one 4-bit QLoRA run had 1 element of 164,096 at 0.36 lr).
WEIGHT_TOLERANCE_IN_LR = 0.1
MAX_OUTLIER_FRACTION = 1e-4
COMMON_TRAINER_FLAGS = ["--use_cpu", "true", "--seed", "7", "--logging_steps", "1", "--eval_strategy", "no",
                        "--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none",
                        "--gradient_accumulation_steps", "2", "--warmup_steps", "1"]


def launch_two_processes(script: str, args: list[str], log_path, config: str = CPU_CONFIG) -> None:
    """`accelerate launch` with a CPU config (data parallel by default; tests/test_fsdp.py: FSDP2): torchrun starts
    two processes that join a gloo group."""
    command = [ACCELERATE, "launch", "--config_file", config, "--num_processes", "2",
               os.path.join(SCRIPTS, script), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    with open(log_path, "w") as handle:
        handle.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command[:6])} ... failed ({result.returncode}):\n{result.stderr[-4000:]}")


def log_history(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "trainer_state.json")) as handle:
        return [entry for entry in json.load(handle)["log_history"] if "loss" in entry]


def assert_same_training(single_dir, multi_dir, weight_prefixes: tuple[str, ...], learning_rate: float,
                         weights_file: str = "model.safetensors") -> None:
    single, multi = log_history(single_dir), log_history(multi_dir)
    assert [e["step"] for e in single] == [e["step"] for e in multi] and len(single) >= 3
    for a, b in zip(single, multi, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_TOLERANCE), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (a, b)
        assert b["epoch"] == pytest.approx(a["epoch"])  # same number of samples consumed
    weights_a = load_file(os.path.join(single_dir, weights_file))
    weights_b = load_file(os.path.join(multi_dir, weights_file))
    trained = [name for name in weights_a if name.startswith(weight_prefixes)]
    assert trained
    tolerance, steps = WEIGHT_TOLERANCE_IN_LR * learning_rate, single[-1]["step"]
    outliers = total = 0
    for name in trained:
        difference = (weights_b[name] - weights_a[name]).abs()
        assert difference.max().item() <= steps * learning_rate, f"{name}: moved apart by more than {steps} steps"
        outliers, total = outliers + int((difference > tolerance).sum()), total + difference.numel()
    assert outliers <= MAX_OUTLIER_FRACTION * total, f"{outliers} of {total} weights differ by > {tolerance:.2e}"


def reset_bitsandbytes_overrides() -> None:
    """bitsandbytes keeps optimizer overrides in a process-wide singleton, keyed by parameter position: the Trainer's
    "32-bit states for embeddings" from an earlier in-process run would apply to whatever sits at that position in
    the next run's optimizer. A fresh process starts clean; so must the in-process run."""
    import bitsandbytes as bnb

    bnb.optim.GlobalOptimManager.get_instance().initialize()


STAGE_MODULES = {"pretrain.py": "mmphi.stages.pretrain", "projector.py": "mmphi.stages.projector",
                 "instruct.py": "mmphi.stages.instruct"}


def run_both(tmp_path, script: str, args: list[str], batch_size: int, per_run=lambda run_dir: [],
             config: str = CPU_CONFIG) -> tuple:
    """The same global batch two ways: 1 process x (2 * batch_size), run here (the stage's own `main`), and
    2 processes x batch_size through `accelerate launch --config_file <config>`."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    stage = importlib.import_module(STAGE_MODULES[script])
    reset_bitsandbytes_overrides()
    stage.main([*args, *per_run(single), "--output_dir", str(single), "--per_device_train_batch_size",
                str(2 * batch_size)])
    launch_two_processes(script, [*args, *per_run(multi), "--output_dir", str(multi), "--per_device_train_batch_size",
                                  str(batch_size)], tmp_path / "multi.log", config)
    return single, multi


def write_corpus(path, n_docs: int = 120) -> str:

    words = ["the", "ship", "sailed", "north", "across", "cold", "water", "while", "captain", "watched", "sky",
             "and", "crew", "sang", "of", "home", "congress", "shall", "make", "laws", "for", "people", "nation"]
    rng = random.Random(0)
    with open(path, "w") as handle:
        for _ in range(n_docs):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "."
            handle.write(json.dumps({"text": text}) + "\n")
    return str(path)

"""Multi-process correctness: `accelerate launch` with two CPU processes (gloo, scripts/configs/cpu_multiprocess.yaml)
trains each stage on the tiny default for a few steps, and with the same global batch (2 processes x B vs 1 process
x 2B) its losses and its trained weights match a single-process run.

Why they can match exactly: accelerate gives every process the same seeded permutation and deals its batches out
round-robin, so a global batch holds the same samples either way; the Trainer divides each process's summed loss by
the token count of the whole global batch (`average_tokens_across_devices`), so uneven label counts per process
(projector, instruct) still give the global per-token mean; DDP averages the gradients. What is left is float
summation order.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mmphi import TINY_TOKENIZER

pytestmark = pytest.mark.slow

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


# --------------------------------------------------------------------------------------------------------- pretrain

def write_corpus(path, n_docs: int = 120) -> str:
    import random

    words = ["the", "ship", "sailed", "north", "across", "cold", "water", "while", "captain", "watched", "sky",
             "and", "crew", "sang", "of", "home", "congress", "shall", "make", "laws", "for", "people", "nation"]
    rng = random.Random(0)
    with open(path, "w") as handle:
        for _ in range(n_docs):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "."
            handle.write(json.dumps({"text": text}) + "\n")
    return str(path)


def test_pretrain_two_processes_match_one(tmp_path):
    corpus = write_corpus(tmp_path / "cc.jsonl")
    args = ["--config_name", "tiny", "--config_overrides",
            "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4",
            "--tokenizer_name", TOKENIZER, "--train_files", corpus, "--data_cache_dir", str(tmp_path / "cache"),
            "--block_size", "32", "--learning_rate", "3e-3", "--max_steps", "4", *COMMON_TRAINER_FLAGS]
    single, multi = run_both(tmp_path, "pretrain.py", args, batch_size=4)
    assert_same_training(single, multi, weight_prefixes=("model.", "lm_head."), learning_rate=3e-3)
    tokens = [e["num_input_tokens_seen"] for e in log_history(multi)]
    assert tokens == [e["num_input_tokens_seen"] for e in log_history(single)]
    assert tokens[0] == 2 * 4 * 2 * 32  # processes x micro-batch x accumulation x block: both processes trained


# ------------------------------------------------------------------------------------------- projector and instruct

@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """Synthetic COCO/LLaVA-format data and the tiny random-init MM-Phi folder."""
    root = tmp_path_factory.mktemp("multimodal")
    data, model = root / "data", root / "mmphi-tiny"
    for script, args in (("make_synthetic_data.py", ["--output_dir", str(data), "--num_images", "40"]),
                         ("build_model.py", ["--preset", "tiny", "--output_dir", str(model)])):
        subprocess.run([sys.executable, os.path.join(SCRIPTS, script), *args], check=True, cwd=REPO_ROOT,
                       capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return {"data": data, "model": str(model)}


def test_projector_two_processes_match_one(tmp_path, multimodal):
    """The real recipe's shape: frozen tower with its features cached (each process computes its share of the shards,
    the same shards as one process computes), projector trained."""
    data = multimodal["data"]
    args = ["--model_name_or_path", multimodal["model"], "--data_path", str(data / "captions_train.json"),
            "--image_folder", str(data / "images"), "--cache_vision_features", "--feature_cache_batch_size", "4",
            "--val_fraction", "0.1", "--learning_rate", "2e-3", "--max_steps", "3", *COMMON_TRAINER_FLAGS]

    def cache_args(run_dir):  # a cache per run, in shards of 8 images: two processes share the work
        return ["--feature_cache_dir", str(run_dir) + "-features", "--feature_cache_shard_size", "8"]

    single, multi = run_both(tmp_path, "projector.py", args, batch_size=2, per_run=cache_args)
    assert_same_training(single, multi, weight_prefixes=("model.multi_modal_projector.",), learning_rate=2e-3)
    log = (tmp_path / "multi.log").read_text()
    # INFO from the main process only, not once per rank
    assert log.count("INFO mmphi.stages.projector: training ") == 1
    single_cache, multi_cache = (json.loads((tmp_path / f"{run}-features" / "index.json").read_text())
                                 for run in ("single", "multi"))
    assert single_cache["rows"] == multi_cache["rows"] and single_cache["fingerprint"] == multi_cache["fingerprint"]
    shards = sorted({shard for shard, _ in single_cache["rows"].values()})
    assert len(shards) > 1  # both processes computed a share
    for shard in shards:
        torch.testing.assert_close(load_file(tmp_path / "multi-features" / shard)["features"],
                                   load_file(tmp_path / "single-features" / shard)["features"])


def test_instruct_qlora_two_processes_match_one(tmp_path, multimodal):
    """4-bit language model + LoRA + trainable projector through TRL's SFTTrainer. Two settings differ from the stage
    defaults, on purpose: LoRA dropout draws from each process's own random stream (one stream over 2B samples vs two
    over B each), so no seed makes dropout masks agree: it is off here. The stage default group_by_length stays on:
    its order depends on the seed and the global batch only."""
    data = multimodal["data"]
    args = ["--model_name_or_path", multimodal["model"], "--data_path", str(data / "llava_instruct_train.json"),
            "--image_folder", str(data / "images"), "--val_fraction", "0", "--lora_r", "8", "--lora_dropout", "0",
            "--learning_rate", "1e-3", "--max_steps", "3",
            *COMMON_TRAINER_FLAGS]
    single, multi = run_both(tmp_path, "instruct.py", args, batch_size=2)
    assert_same_training(single, multi, weight_prefixes=("base_model.model.",), learning_rate=1e-3,
                         weights_file="adapter_model.safetensors")

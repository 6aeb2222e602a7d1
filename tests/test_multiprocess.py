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

import json

import pytest
import torch
from launching import (
    COMMON_TRAINER_FLAGS,
    TOKENIZER,
    assert_same_training,
    log_history,
    run_both,
    write_corpus,
)
from safetensors.torch import load_file

# --------------------------------------------------------------------------------------------------------- pretrain

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

@pytest.mark.slow  # the cached-feature shards: covered by the FSDP projector run too
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

"""FSDP2 for real, on CPU: `accelerate launch --config_file scripts/configs/cpu_fsdp.yaml` (two processes, gloo, the
fsdp_config of fsdp.yaml and fsdp_multimodal.yaml) shards the model (`FSDPOnCPUMixin`), writes sharded checkpoints
that a resume reads back, and ends in a folder that loads with the Auto classes: the full weights, our config and
code files, nothing of torch's FSDP wrapper class. The launch helpers and the data are tests/test_multiprocess.py's.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from launching import (
    COMMON_TRAINER_FLAGS,
    SCRIPTS,
    TOKENIZER,
    assert_same_training,
    launch_two_processes,
    log_history,
    run_both,
    write_corpus,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoProcessor

from modeling_mmphi import AUTO_MAP

FSDP_CONFIG = os.path.join(SCRIPTS, "configs", "cpu_fsdp.yaml")
MMPHI_AUTO_MAP = AUTO_MAP  # ours, never the FSDP wrapper's class
MMPHI_CODE = ("configuration_mmphi.py", "modeling_mmphi.py", "processing_mmphi.py", "speech_mmphi.py")


def assert_sharded_checkpoint(checkpoint) -> None:
    """FSDP really sharded: each process wrote its shard of the model and optimizer (torch.distributed.checkpoint),
    and no full model (what a data-parallel checkpoint holds)."""
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(checkpoint, part, "*.distcp"))) == [
            "__0_0.distcp", "__1_0.distcp"], part
    assert not os.path.exists(os.path.join(checkpoint, "model.safetensors"))


def assert_no_fsdp_wrapper(folder) -> dict:
    """The final folder is the model's own: no `_fsdp_*.py` copied from torch, the architecture our class's name."""
    assert not glob.glob(os.path.join(folder, "_fsdp*")), os.listdir(folder)
    with open(os.path.join(folder, "config.json")) as handle:
        config = json.load(handle)
    assert not any("FSDP" in name for name in config["architectures"])
    return config


@pytest.mark.slow  # three runs: one in-process, two launches
def test_pretrain_fsdp_matches_one_process_and_resumes_from_its_sharded_checkpoint(tmp_path):
    corpus = write_corpus(tmp_path / "cc.jsonl")
    args = ["--config_name", "tiny", "--config_overrides",
            "hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=4",
            "--tokenizer_name", TOKENIZER, "--train_files", corpus, "--data_cache_dir", str(tmp_path / "cache"),
            "--block_size", "32", "--learning_rate", "3e-3", "--max_steps", "4", "--optim", "adamw_torch",
            *COMMON_TRAINER_FLAGS, "--save_strategy", "steps", "--save_steps", "2"]
    single, multi = run_both(tmp_path, "pretrain.py", args, batch_size=4, config=FSDP_CONFIG)

    # the same losses, gradient norms and final weights as one process at the same global batch
    assert_same_training(single, multi, weight_prefixes=("model.", "lm_head."), learning_rate=3e-3)
    assert log_history(multi)[0]["num_input_tokens_seen"] == 2 * 4 * 2 * 32  # both processes trained
    assert_sharded_checkpoint(multi / "checkpoint-4")
    assert_no_fsdp_wrapper(multi)
    model = AutoModelForCausalLM.from_pretrained(multi)
    assert type(model).__name__ == "PhiForCausalLM" and model.config.use_cache
    trained = load_file(multi / "model.safetensors")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, trained[name])

    # resume from the newest sharded checkpoint (checkpoint-4) and go on to step 6
    launch_two_processes("pretrain.py", [*args, "--output_dir", str(multi), "--per_device_train_batch_size", "4",
                                         "--max_steps", "6", "--resume_from_checkpoint", "latest"],
                         tmp_path / "resume.log", FSDP_CONFIG)
    log = (tmp_path / "resume.log").read_text()
    assert "Loading model from " + str(multi / "checkpoint-4" / "pytorch_model_fsdp_0") in log
    history = log_history(multi)
    assert [entry["step"] for entry in history] == [1, 2, 3, 4, 5, 6]  # steps 1-4 from the checkpoint's state
    assert history[4]["loss"] < history[0]["loss"]  # step 5 went on from trained weights, not from a fresh model
    assert_sharded_checkpoint(multi / "checkpoint-6")
    assert_no_fsdp_wrapper(multi)
    AutoModelForCausalLM.from_pretrained(multi)


@pytest.mark.slow  # a two-process launch
def test_projector_fsdp_ends_in_a_complete_mmphi_folder(tmp_path, multimodal):
    data = multimodal["data"]
    output = tmp_path / "projector"
    launch_two_processes("projector.py", [
        "--model_name_or_path", multimodal["model"], "--data_path", str(data / "captions_train.json"),
        "--image_folder", str(data / "images"), "--val_fraction", "0.1", "--learning_rate", "2e-3",
        "--max_steps", "3", "--optim", "adamw_torch", *COMMON_TRAINER_FLAGS, "--save_strategy", "steps",
        "--save_steps", "2", "--per_device_train_batch_size", "2", "--output_dir", str(output)],
        tmp_path / "projector.log", FSDP_CONFIG)
    assert_sharded_checkpoint(output / "checkpoint-2")
    config = assert_no_fsdp_wrapper(output)
    assert config["auto_map"] == MMPHI_AUTO_MAP
    for name in (*MMPHI_CODE, "model.safetensors", "processor_config.json", "tokenizer.json"):
        assert (output / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    assert type(model).__name__ == "MMPhiForCausalLM" and type(model).__module__.endswith("modeling_mmphi")
    assert type(AutoProcessor.from_pretrained(output, trust_remote_code=True)).__name__ == "MMPhiProcessor"
    # the projector trained, the frozen parts are the base model's, bit for bit
    base, trained = load_file(os.path.join(multimodal["model"], "model.safetensors")), model.state_dict()
    changed = {name for name in base if not torch.equal(base[name], trained[name])}
    assert changed and all(name.startswith("model.multi_modal_projector.") for name in changed), changed


@pytest.mark.slow  # a two-process launch
def test_instruct_full_fine_tuning_fsdp_with_text_only_batches(tmp_path, multimodal):
    """No LoRA, no 4-bit: the whole model trains sharded. A fifth of the conversations have no image, so some steps
    give one process a batch without images: its vision tower does not run, which FSDP survives because the tower
    is not a shard unit of its own (fsdp_multimodal.yaml, cpu_fsdp.yaml)."""
    data = multimodal["data"]
    output = tmp_path / "instruct"
    launch_two_processes("instruct.py", [
        "--model_name_or_path", multimodal["model"], "--data_path", str(data / "llava_instruct_train.json"),
        "--image_folder", str(data / "images"), "--val_fraction", "0", "--use_peft", "false",
        "--load_in_4bit", "false", "--learning_rate", "1e-3", "--max_steps", "3", "--optim", "adamw_torch",
        *COMMON_TRAINER_FLAGS, "--save_strategy", "steps", "--save_steps", "3", "--per_device_train_batch_size", "2",
        "--output_dir", str(output)], tmp_path / "instruct.log", FSDP_CONFIG)
    with open(os.path.join(data, "llava_instruct_train.json")) as handle:
        assert any("image" not in record for record in json.load(handle))
    assert_sharded_checkpoint(output / "checkpoint-3")
    assert assert_no_fsdp_wrapper(output)["auto_map"] == MMPHI_AUTO_MAP
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    assert type(model).__name__ == "MMPhiForCausalLM"
    base, trained = load_file(os.path.join(multimodal["model"], "model.safetensors")), model.state_dict()
    assert not torch.equal(base["model.language_model.layers.0.mlp.fc1.weight"],
                           trained["model.language_model.layers.0.mlp.fc1.weight"])


def test_processes_launched_without_a_group_stop(monkeypatch):
    """cpu_fsdp.yaml without `--use_cpu true` on a machine without a GPU: torchrun starts two processes that never
    join a group and would each train alone into the same output_dir."""
    from types import SimpleNamespace

    from mmphi.training import check_processes_joined

    alone = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="--use_cpu true"):
        check_processes_joined(alone)
    check_processes_joined(SimpleNamespace(accelerator=SimpleNamespace(num_processes=2)))
    monkeypatch.delenv("WORLD_SIZE")
    check_processes_joined(alone)

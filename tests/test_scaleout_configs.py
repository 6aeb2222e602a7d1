"""scripts/configs/: every accelerate config goes through `accelerate launch`'s own validation and environment
preparation (what `accelerate launch --config_file X` does before it starts a process), the FSDP/DeepSpeed plugins
build from that environment, and the Trainer fills every "auto" of the DeepSpeed JSONs. DeepSpeed itself need not be
installed. The configs really launching processes is tests/test_multiprocess.py's job."""

from __future__ import annotations

import glob
import json
import os
from unittest import mock

import pytest
import yaml
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.deepspeed import HfDeepSpeedConfig
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env
from transformers import PhiConfig, PhiForCausalLM, TrainingArguments
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO_ROOT, "scripts", "configs")
EXPECTED = {
    "single_gpu.yaml": DistributedType.NO,
    "multi_gpu.yaml": DistributedType.MULTI_GPU,
    "cpu_multiprocess.yaml": DistributedType.MULTI_GPU,  # torchrun launcher; the script adds --use_cpu true
    "cpu_fsdp.yaml": DistributedType.FSDP,  # torchrun launcher on CPU; the stage Trainers shard (FSDPOnCPUMixin)
    "fsdp.yaml": DistributedType.FSDP,
    "fsdp_multimodal.yaml": DistributedType.FSDP,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
    "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
}


def launch_environment(config_name: str, *launch_flags: str):
    """What `accelerate launch --config_file <config> train.py` validates and exports, without starting anything."""
    argv = ["--config_file", os.path.join(CONFIGS, config_name), *launch_flags, "train.py", "--output_dir", "x"]
    args, defaults, mixed_precision_from_config = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    exported = {key: value for key, value in env.items() if os.environ.get(key) != value}
    return args, defaults, exported


def test_every_config_file_is_covered():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.yaml"))) == sorted(EXPECTED)


@pytest.mark.parametrize("config_name", sorted(EXPECTED))
def test_accelerate_launch_accepts_the_config(config_name):
    args, defaults, env = launch_environment(config_name)
    assert defaults.distributed_type == EXPECTED[config_name]
    # precision is the stage scripts' choice (bf16/fp16 by GPU); a config value would override their flags
    assert env.get("ACCELERATE_MIXED_PRECISION", "no") == "no"
    if config_name != "single_gpu.yaml":
        args, _, _ = launch_environment(config_name, "--num_processes", "8")  # the recipes set the GPU count
        assert args.num_processes == 8


def test_cpu_config_starts_two_processes_for_torchrun_on_cpu():
    args, defaults, env = launch_environment("cpu_multiprocess.yaml")
    assert args.num_processes == 2 and defaults.use_cpu
    assert not args.use_deepspeed and not args.use_fsdp


def test_cpu_fsdp_config_starts_two_cpu_processes_that_ask_for_fsdp():
    args, defaults, env = launch_environment("cpu_fsdp.yaml")
    assert args.num_processes == 2 and args.use_cpu and args.use_fsdp and not args.cpu  # torchrun
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"


def test_cpu_fsdp_config_shards_as_the_gpu_configs_do():
    """What the CPU FSDP tests cover is what the GPU configs run: the same fsdp_config."""
    def fsdp_config(name):
        with open(os.path.join(CONFIGS, name)) as handle:
            return yaml.safe_load(handle)["fsdp_config"]

    assert fsdp_config("cpu_fsdp.yaml") == fsdp_config("fsdp.yaml") == fsdp_config("fsdp_multimodal.yaml")


@pytest.mark.parametrize("config_name, layers", [
    ("fsdp.yaml", ["PhiDecoderLayer"]),
    # the vision tower stays in the root unit: a process whose batch has no image skips it
    ("fsdp_multimodal.yaml", ["PhiDecoderLayer"]),
    ("cpu_fsdp.yaml", ["PhiDecoderLayer"]),
])
def test_fsdp_plugin_builds_full_shard_with_transformer_layer_wrap(config_name, layers):
    _, _, env = launch_environment(config_name)
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # FSDP2's FULL_SHARD
    assert plugin.transformer_cls_names_to_wrap == layers
    assert not plugin.activation_checkpointing  # the Trainer's gradient checkpointing does it once


def test_fsdp_wrap_classes_exist_in_the_models():
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.phi.modeling_phi import PhiDecoderLayer

    assert PhiDecoderLayer.__name__ == "PhiDecoderLayer" and CLIPEncoderLayer.__name__ == "CLIPEncoderLayer"
    for name in ("fsdp.yaml", "fsdp_multimodal.yaml", "cpu_fsdp.yaml"):
        with open(os.path.join(CONFIGS, name)) as handle:
            wrap = yaml.safe_load(handle)["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")
        assert set(wrap) <= {"PhiDecoderLayer", "CLIPEncoderLayer"}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_plugin_reads_the_json_through_the_yaml(stage):
    _, _, env = launch_environment(f"deepspeed_zero{stage}.yaml")
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == f"scripts/configs/ds_zero{stage}.json"
    with mock.patch.dict(os.environ, env):
        cwd = os.getcwd()
        os.chdir(REPO_ROOT)  # the JSON path is relative to the repo root, where the recipes run
        try:
            plugin = DeepSpeedPlugin()
        finally:
            os.chdir(cwd)
    assert plugin.zero_stage == stage and plugin.zero3_init_flag == (stage == 3)


class TrainerDeepSpeedConfig(HfDeepSpeedConfig):
    """transformers' HfTrainerDeepSpeedConfig fill logic on accelerate's config class: transformers refuses to build
    its own without the deepspeed package, but filling the "auto" values is plain Python."""

    fill_match = HfTrainerDeepSpeedConfig.fill_match
    fill_only = HfTrainerDeepSpeedConfig.fill_only
    is_auto = HfTrainerDeepSpeedConfig.is_auto
    trainer_config_process = HfTrainerDeepSpeedConfig.trainer_config_process
    trainer_config_finalize = HfTrainerDeepSpeedConfig.trainer_config_finalize

    def __init__(self, config_file):
        super().__init__(config_file)
        self._dtype = None
        self.mismatches = []


def auto_keys(node, prefix="") -> list[str]:
    if isinstance(node, dict):
        return [key for k, v in node.items() for key in auto_keys(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_fills_every_auto_value_of_the_deepspeed_json(tmp_path, stage):
    path = os.path.join(CONFIGS, f"ds_zero{stage}.json")
    with open(path) as handle:
        raw = json.load(handle)
    assert raw["zero_optimization"]["stage"] == stage
    assert "optimizer" not in raw  # the Trainer's --optim is the one used ...
    assert raw["zero_allow_untested_optimizer"] is True  # ... and DeepSpeed accepts a client optimizer
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=4,
                             bf16=True, use_cpu=True, max_grad_norm=1.0)
    config = TrainerDeepSpeedConfig(path)
    config.trainer_config_process(args)
    model = PhiForCausalLM(PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=128))
    config.trainer_config_finalize(args, model, num_training_steps=10)
    assert auto_keys(config.config) == []
    assert config.config["bf16"]["enabled"] is True and config.config["fp16"]["enabled"] is False
    assert config.config["train_micro_batch_size_per_gpu"] == 4 and config.config["gradient_accumulation_steps"] == 4
    assert config.config["zero_optimization"]["reduce_bucket_size"] == 64 * 64


def test_deepspeed_auto_values_for_the_multimodal_model(tmp_path):
    """MM-Phi is a composite model: the bucket sizes come from its language model's hidden size."""
    import torch

    from configuration_mmphi import MMPhiConfig
    from modeling_mmphi import MMPhiForCausalLM

    with torch.device("meta"):
        model = MMPhiForCausalLM(MMPhiConfig.tiny())
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True)
    config = TrainerDeepSpeedConfig(os.path.join(CONFIGS, "ds_zero3.json"))
    config.trainer_config_process(args)
    config.trainer_config_finalize(args, model, num_training_steps=10)
    hidden = model.config.text_config.hidden_size
    assert auto_keys(config.config) == []
    assert config.config["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * hidden * hidden)

"""The instruct stage (scripts/instruct.py) and scripts/merge_lora.py on the tiny model, CPU."""

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmphi.data import BadRecordError, MMPhiDataCollator, encode_conversations, load_train_eval
from mmphi.data.synthetic import generate
from mmphi.stages.instruct import (
    DataArguments,
    InstructSFTConfig,
    ModelArguments,
    load_model,
    lora_config,
    main,
    parse_args,
    trainable_parameter_names,
)
from modeling_mmphi import MMPhiForCausalLM
from processing_mmphi import MMPhiProcessor

bnb = pytest.importorskip("bitsandbytes")

MAX_LENGTH = 56  # below the longest two-turn samples (~67 tokens), above every first answer (~44)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("synthetic")), num_images=12, val_fraction=0.25,
                    text_only_fraction=0.3, seed=5)


def cpu_config(output_dir, **overrides) -> InstructSFTConfig:
    return InstructSFTConfig(output_dir=str(output_dir), **overrides)


@pytest.fixture(scope="module")
def qlora_run(tiny_folder, synthetic, tmp_path_factory, unexpected_warnings):
    """A real 4-bit QLoRA run: an evaluation pass first (eval_on_start), then training steps, evaluation again,
    then the adapter is saved and merged. With the stage defaults (paged 8-bit AdamW, gradient checkpointing, PEFT
    wrapping the model) it prints no warning the user could not act on."""
    output_dir = tmp_path_factory.mktemp("instruct") / "run"
    with warnings.catch_warnings(record=True) as caught:
        metrics = main([
            "--model_name_or_path", str(tiny_folder), "--data_path", synthetic["llava_train"],
            "--image_folder", synthetic["images"], "--output_dir", str(output_dir), "--load_in_4bit", "true",
            "--lora_r", "8", "--max_steps", "3", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--learning_rate", "5e-3", "--warmup_steps", "0", "--val_fraction",
            "0.2", "--max_eval_samples", "2", "--eval_on_start", "true", "--eval_strategy", "steps", "--eval_steps",
            "2", "--logging_steps", "1", "--save_strategy", "no", "--max_length", str(MAX_LENGTH), "--merge",
        ])
    assert unexpected_warnings(caught) == []
    return output_dir, metrics


def test_stage_defaults_resolve_precision_on_cpu(tmp_path):
    args = cpu_config(tmp_path)
    assert not torch.cuda.is_available()
    assert args.bf16 is False and args.fp16 is False  # SFTConfig's bf16=True would fail on a GPU-less machine
    assert args.optim == "paged_adamw_8bit" and args.gradient_accumulation_steps == 4
    assert args.gradient_checkpointing and args.train_sampling_strategy == "group_by_length"
    assert args.dataset_kwargs == {"skip_prepare_dataset": True} and args.remove_unused_columns is False


def test_4bit_lora_trains_only_adapters_and_projector(tiny_folder, tmp_path):
    from peft import get_peft_model

    model = load_model(ModelArguments(str(tiny_folder), lora_r=8), cpu_config(tmp_path))
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 4 * 6  # q/k/v/dense/fc1/fc2 of the 4 language-model layers; tower and head untouched
    assert all(m.support_avx512bf16_for_cpu is False for m in four_bit)  # the avx512-bf16 workaround is applied
    quantization = model.config.quantization_config
    assert quantization.bnb_4bit_quant_type == "nf4" and quantization.bnb_4bit_use_double_quant
    peft_model = get_peft_model(model, lora_config(ModelArguments(str(tiny_folder), lora_r=8)))
    names = trainable_parameter_names(peft_model)
    lora = [n for n in names if ".lora_" in n]
    projector = [n for n in names if "multi_modal_projector.modules_to_save" in n]
    assert sorted(names) == sorted(lora + projector)
    assert len(lora) == 2 * 4 * 6 and len(projector) == 2  # A and B per wrapped layer; projector weight and bias
    assert all("language_model" in n for n in lora)
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert not [n for n in wrapped if "vision_tower" in n]  # CLIP's own q_proj/k_proj/v_proj/fc1/fc2 stay plain


def test_a_merge_cut_short_leaves_no_folder_that_looks_finished(tiny_folder, tmp_path, monkeypatch):
    """The merged folder is written beside its name and renamed when complete: a failure after the weights (here:
    the processor's save) leaves neither `merged/` nor the temporary folder; a whole run writes it."""
    from peft import get_peft_model

    from mmphi.loading import merge_lora

    base = MMPhiForCausalLM.from_pretrained(str(tiny_folder))
    get_peft_model(base, lora_config(ModelArguments(str(tiny_folder), lora_r=4))).save_pretrained(tmp_path / "lora")
    merged = tmp_path / "merged"

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(MMPhiProcessor, "save_pretrained", disk_full)
        with pytest.raises(OSError, match="No space left"):
            merge_lora(str(tiny_folder), str(tmp_path / "lora"), str(merged), base_quantization="none")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lora"]
    merge_lora(str(tiny_folder), str(tmp_path / "lora"), str(merged), base_quantization="none")
    assert {"model.safetensors", "config.json", "processor_config.json"} <= {p.name for p in merged.iterdir()}
    merge_lora(str(tiny_folder), str(tmp_path / "lora"), str(merged), base_quantization="none")  # replaces its own
    (merged / "notes.txt").write_text("mine")  # a folder that holds more than a model is the user's
    with pytest.raises(FileExistsError, match=r"holds more than a model \(notes.txt\)"):
        merge_lora(str(tiny_folder), str(tmp_path / "lora"), str(merged), base_quantization="none")
    assert (merged / "notes.txt").read_text() == "mine" and (merged / "model.safetensors").is_file()


def test_model_flags_are_trls_model_config_with_qlora_defaults(tmp_path):
    """TRL's ModelConfig flags (and `--modules_to_save` as the alias of `--lora_modules_to_save`) reach
    get_peft_config with the language-model-only target regex; --load_in_8bit replaces the 4-bit default."""
    from trl import ModelConfig

    base = ["--model_name_or_path", "m", "--data_path", "d.json", "--output_dir", str(tmp_path)]
    model_args, _, _ = parse_args([*base, "--modules_to_save", "multi_modal_projector", "lm_head", "--lora_r", "8"])
    assert isinstance(model_args, ModelConfig) and model_args.quantization == "4bit"
    peft = lora_config(model_args)
    assert (peft.r, peft.lora_alpha, peft.modules_to_save) == (8, 16, ["multi_modal_projector", "lm_head"])
    assert peft.target_modules == r"model\.language_model\..*\.(q_proj|k_proj|v_proj|dense|fc1|fc2)"
    model_args, _, _ = parse_args([*base, "--load_in_8bit", "true", "--lora_target_modules", "fc1"])
    assert model_args.quantization == "8bit"
    assert lora_config(model_args).target_modules == r"model\.language_model\..*\.(fc1)"
    # the merge and the adapter's loading rebuild nf4 + double quantization from the folder as given
    for flags in (["--bnb_4bit_quant_type", "fp4"], ["--use_bnb_nested_quant", "false"], ["--model_revision", "v2"]):
        with pytest.raises(ValueError, match=flags[0]):
            parse_args([*base, *flags])
    assert parse_args([*base, "--load_in_4bit", "false", "--use_bnb_nested_quant", "false"])[0].quantization == "none"


def test_without_peft_trains_language_model_and_projector_not_tower(tiny_folder, tmp_path):
    args = cpu_config(tmp_path)
    with pytest.raises(ValueError, match="--load_in_4bit false"):
        load_model(ModelArguments(str(tiny_folder), use_peft=False), args)
    with pytest.raises(ValueError, match="drop --merge"):
        load_model(ModelArguments(str(tiny_folder), use_peft=False, load_in_4bit=False, merge=True), args)
    model = load_model(ModelArguments(str(tiny_folder), use_peft=False, load_in_4bit=False), args)
    names = trainable_parameter_names(model)
    assert not [n for n in names if "vision_tower" in n]
    assert any(n.startswith("model.language_model.") for n in names) and "lm_head.weight" in names
    assert "model.multi_modal_projector.linear_1.weight" in names


def test_training_steps_run_after_an_evaluation_pass(qlora_run):
    output_dir, metrics = qlora_run
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    first_eval = next(i for i, entry in enumerate(history) if "eval_loss" in entry)
    train_steps = [entry["step"] for entry in history[first_eval:] if "loss" in entry]
    assert history[first_eval]["step"] == 0 and train_steps == [1, 2, 3]
    assert all(math.isfinite(entry["loss"]) for entry in history if "loss" in entry)
    assert math.isfinite(metrics["eval_loss"])


def test_adapter_holds_trained_lora_and_projector_only(qlora_run, tiny_folder):
    output_dir, _ = qlora_run
    adapter = load_file(output_dir / "adapter_model.safetensors")
    assert not [k for k in adapter if "vision_tower" in k]
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # initialised to zero: the steps changed them
    base = load_file(tiny_folder / "model.safetensors")
    projector = {k: v for k, v in adapter.items() if "multi_modal_projector" in k}
    assert len(projector) == 2
    trained = next(v for k, v in projector.items() if k.endswith("linear_1.weight"))
    assert not torch.allclose(trained.float(), base["model.multi_modal_projector.linear_1.weight"])
    assert (output_dir / "processor_config.json").exists()


def test_truncation_and_padding_are_reported(qlora_run, tiny_folder, synthetic):
    _, metrics = qlora_run
    processor = MMPhiProcessor.from_pretrained(tiny_folder, trust_remote_code=True)
    train, _, _ = load_train_eval(
        DataArguments(data_path=synthetic["llava_train"], image_folder=synthetic["images"], val_fraction=0.2,
                      max_eval_samples=2), seed=42
    )
    lengths = encode_conversations(train, processor).lengths
    too_long = sum(n > MAX_LENGTH for n in lengths)
    assert too_long > 0
    assert metrics["truncated"] + metrics["dropped_too_long"] == too_long
    assert 0 <= metrics["padding_fraction"] < 1


def test_merged_model_gives_the_logits_of_the_trained_4bit_base_plus_adapter(qlora_run, tiny_folder):
    """The default merge folds LoRA into the NF4-dequantized weights the adapter was trained on: the merged folder
    computes what was trained (4-bit base + adapter), far closer than a merge into the original weights."""
    from transformers import AutoModelForCausalLM

    from mmphi.loading import load_causal_lm, merge_lora

    output_dir, metrics = qlora_run
    merged_dir = output_dir / "merged"
    assert metrics["merged_output_dir"] == str(merged_dir)
    assert (merged_dir / "model.safetensors").exists() and not list(merged_dir.glob("*.bin"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=True).eval()
    assert not [n for n, _ in merged.named_parameters() if "lora" in n or "modules_to_save" in n]
    processor = MMPhiProcessor.from_pretrained(merged_dir, trust_remote_code=True)
    batch = processor(text=["User: <image>\nWhat colour is it?\nAssistant:", "User: How many sides?\nAssistant:"],
                      images=[[Image.new("RGB", (60, 40), (220, 30, 30))], []])
    with torch.no_grad():
        trained = load_causal_lm(str(tiny_folder), adapter=str(output_dir), quantization="4bit", device="cpu",
                                 dtype="float32")(**batch).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_folder, trust_remote_code=True).eval()(**batch).logits
        actual = merged(**batch).logits
        into_original = merge_lora(str(tiny_folder), str(output_dir), merge_into="original").eval()(**batch).logits
    torch.testing.assert_close(actual, trained, atol=1e-4, rtol=1e-4)
    assert (into_original - trained).abs().max() > 10 * (actual - trained).abs().max()
    assert not torch.allclose(plain, trained, atol=1e-3)  # the adapter does change the model


def test_collator_mixes_image_and_text_samples_and_handles_bad_images(tiny_folder, synthetic, tmp_path):
    processor = MMPhiProcessor.from_pretrained(tiny_folder, trust_remote_code=True)
    good = f"{synthetic['images']}/000001.png"
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(good).read_bytes()[:100])
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "image": good, "location": "f.json: record 0"},
        {"input_ids": [8, 9], "labels": [-100, 9], "image": None, "location": "f.json: record 1"},
        {"input_ids": [5, 6], "labels": [-100, 6], "image": str(broken), "location": "f.json: record 2 (id=x)"},
    ]
    batch = MMPhiDataCollator(processor)(rows[:2])
    assert batch["pixel_values"].shape == (1, 3, 224, 224) and batch["input_ids"].shape == (2, 3)
    assert batch["input_ids"][1, 2] == processor.tokenizer.pad_token_id and batch["labels"][1, 2] == -100
    with pytest.raises(BadRecordError, match=r"record 2 \(id=x\).*broken\.png"):
        MMPhiDataCollator(processor)(rows)
    skipping = MMPhiDataCollator(processor, skip_bad_records=True)
    assert skipping(rows)["input_ids"].shape[0] == 2 and skipping.skipped.total == 1
    # a batch of bad samples only (always so at batch size 1): the previous good sample stands in, counted
    stand_in = skipping(rows[2:])
    assert torch.equal(stand_in["input_ids"], torch.tensor([[8, 9]])) and skipping.skipped.total == 2
    with pytest.raises(BadRecordError, match="no good one came before it"):
        MMPhiDataCollator(processor, skip_bad_records=True)(rows[2:])


# --- precision ---------------------------------------------------------------------------------------------------


def test_explicit_precision_from_any_source_is_kept(tmp_path, monkeypatch):
    from mmphi.stages.instruct import parse_args
    from mmphi.training import resolve_precision

    base = ["--model_name_or_path", "m", "--data_path", "d.json", "--output_dir", str(tmp_path)]
    *_, args = parse_args([*base, "--bf16", "true", "--use_cpu", "true"])
    assert args.bf16 and not args.fp16  # CPU bf16 autocast is real: not turned into fp32
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model_name_or_path": "m", "data_path": "d.json", "output_dir": str(tmp_path),
                                  "bf16": True, "use_cpu": True}))
    *_, args = parse_args([str(config)])
    assert args.bf16 and not args.fp16  # a JSON config is as explicit as a flag
    *_, args = parse_args(base)
    assert not args.bf16 and not args.fp16  # nothing given, no GPU: fp32

    # on a bf16-capable GPU the automatic choice is bf16, but never over what the user gave
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)

    def resolved(fp16, bf16):
        args = type("Args", (), {"fp16": fp16, "bf16": bf16, "use_cpu": False})()
        resolve_precision(args)
        return args.fp16, args.bf16

    assert resolved(None, None) == (False, True)
    assert resolved(True, None) == (True, False)
    assert resolved(None, False) == (False, False)  # --bf16 false alone: fp32, as asked


def test_bf16_qlora_keeps_fp32_master_weights_so_small_updates_land(tiny_folder, synthetic, tmp_path):
    """At lr 1e-5 an Adam step changes a weight by ~1e-5, below bf16's resolution for weights of ~0.05: only fp32
    master weights (autocast keeps the matmuls in bf16) let the projector move."""
    output_dir = tmp_path / "bf16"
    main(["--model_name_or_path", str(tiny_folder), "--data_path", synthetic["llava_train"],
          "--image_folder", synthetic["images"], "--output_dir", str(output_dir), "--load_in_4bit", "true",
          "--bf16", "true", "--use_cpu", "true", "--lora_r", "8", "--max_steps", "2",
          "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-5",
          "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--optim", "adamw_torch", "--val_fraction", "0",
          "--save_strategy", "no", "--max_length", str(MAX_LENGTH), "--gradient_checkpointing", "false"])
    adapter = load_file(output_dir / "adapter_model.safetensors")
    base = load_file(tiny_folder / "model.safetensors")
    trained = {k: v for k, v in adapter.items() if "multi_modal_projector" in k or "lora_" in k}
    assert trained and all(v.dtype == torch.float32 for v in trained.values())
    projector = next(v for k, v in adapter.items() if k.endswith("multi_modal_projector.linear_1.weight"))
    assert not torch.equal(projector, base["model.multi_modal_projector.linear_1.weight"])


def test_frozen_tower_runs_without_autograd_under_trl_hooks(tiny_folder, synthetic, tmp_path):
    """TRL's enable_input_require_grads (gradient checkpointing) hooks every input embedding, CLIP's patch embedding
    included; the frozen tower must still build no graph: no activations kept, no backward through it."""
    from mmphi.stages.instruct import build_trainer, parse_args

    stage = build_trainer(*parse_args([
        "--model_name_or_path", str(tiny_folder), "--data_path", synthetic["llava_train"],
        "--image_folder", synthetic["images"], "--output_dir", str(tmp_path), "--lora_r", "8", "--val_fraction", "0",
        "--max_length", str(MAX_LENGTH), "--gradient_checkpointing", "true", "--optim", "adamw_torch",
    ]))
    backbone = stage.trainer.model.get_base_model().model
    patch_embedding = backbone.vision_tower.get_input_embeddings()
    assert patch_embedding._forward_hooks  # TRL did hook it
    pixels = torch.rand(2, 3, 224, 224)
    features = backbone.get_vision_features(pixels)
    assert not features.requires_grad and features.grad_fn is None
    projected = backbone.get_image_features(pixel_values=pixels)
    assert projected.requires_grad  # the trained projector still gets its gradient


def test_a_missing_model_folder_fails_before_the_data_is_read(tmp_path):
    from mmphi.stages.instruct import main

    with pytest.raises(FileNotFoundError, match="no such model folder: .*projector"):
        main(["--model_name_or_path", str(tmp_path / "projector"), "--data_path", str(tmp_path / "missing.json"),
              "--output_dir", str(tmp_path / "out")])


def instruct_argv(tiny_folder, synthetic, output_dir, *extra) -> list[str]:
    return ["--model_name_or_path", str(tiny_folder), "--data_path", synthetic["llava_train"],
            "--image_folder", synthetic["images"], "--output_dir", str(output_dir), "--lora_r", "8",
            "--lora_dropout", "0", "--val_fraction", "0", "--max_length", str(MAX_LENGTH), "--optim", "adamw_torch",
            "--gradient_checkpointing", "false", "--gradient_accumulation_steps", "1",
            "--per_device_train_batch_size", "4", "--train_sampling_strategy", "random", *extra]


def test_cpu_loss_is_trls_loss_on_the_answer_tokens(tiny_folder, synthetic, tmp_path):
    """On a CPU the stage takes the model's own loss instead of TRL's fused LM head (which there scores every
    position): the same loss and the same gradients on the same batch."""
    from trl import SFTTrainer

    from mmphi.stages.instruct import InstructTrainer, build_trainer, parse_args

    trainer = build_trainer(*parse_args(instruct_argv(tiny_folder, synthetic, tmp_path))).trainer
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] != -100).sum() < batch["attention_mask"].sum() / 4  # mostly prompt and image tokens
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    calls = []  # ours asks for the loss without logits: the LM head runs on the answer tokens only
    hook = trainer.model.get_base_model().register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(kwargs.get("skip_logits")), with_kwargs=True)
    results = {}
    for name, compute_loss in (("ours", InstructTrainer.compute_loss), ("trl", SFTTrainer.compute_loss)):
        trainer.model.zero_grad()
        loss = compute_loss(trainer, trainer.model, dict(batch))
        loss.backward()
        results[name] = (loss.detach(), [p.grad.clone() for p in trained])
    hook.remove()
    assert calls[0] is True
    assert results["ours"][0] == pytest.approx(results["trl"][0].item(), rel=1e-5)
    for ours, trl in zip(results["ours"][1], results["trl"][1], strict=True):
        torch.testing.assert_close(ours, trl, rtol=1e-4, atol=1e-6)


def test_instruct_trains_from_the_projector_stages_cached_features(tiny_folder, synthetic, tmp_path):
    """`--cache_vision_features` with the projector stage's cache folder: instruct reuses it (no tower pass), its
    batches carry the cached features instead of pixels, and training gives the losses of the pixel path."""
    from mmphi.stages import projector
    from mmphi.stages.instruct import build_trainer, parse_args

    cache = tmp_path / "vision_features"
    projector.build_trainer(*projector.parse_args([
        "--model_name_or_path", str(tiny_folder), "--data_path", synthetic["captions_train"],
        "--image_folder", synthetic["images"], "--output_dir", str(tmp_path / "projector"), "--val_fraction", "0.25",
        "--cache_vision_features", "--feature_cache_dir", str(cache)]))
    written = (cache / "index.json").stat().st_mtime_ns
    losses = {}
    for mode, extra in (("pixels", ()), ("cached", ("--cache_vision_features", "--feature_cache_dir", str(cache)))):
        stage = build_trainer(*parse_args(instruct_argv(
            tiny_folder, synthetic, tmp_path / mode, "--max_steps", "3", "--logging_steps", "1", "--save_strategy",
            "no", "--learning_rate", "5e-3", *extra)))
        batch = next(iter(stage.trainer.get_train_dataloader()))
        assert ("vision_features" in batch) == (mode == "cached") and ("pixel_values" in batch) == (mode == "pixels")
        stage.trainer.train()
        losses[mode] = [log["loss"] for log in stage.trainer.state.log_history if "loss" in log]
    assert (cache / "index.json").stat().st_mtime_ns == written  # reused, not recomputed
    assert len(losses["cached"]) == 3
    assert losses["cached"] == pytest.approx(losses["pixels"], rel=1e-4)

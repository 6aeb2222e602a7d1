"""The speed options through the standard flags, on CPU: `--use_liger_kernel` (the fused linear cross-entropy with
Phi's LM-head bias; chunked PyTorch where Liger's Triton kernels cannot run), `--torch_compile` and
`--attn_implementation` give the losses of the plain path on the tiny models (float noise only)."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from mmphi import TINY_TOKENIZER
from mmphi.build import build_tiny, save_mmphi
from mmphi.data.synthetic import generate
from mmphi.kernels import apply_liger_kernel, fused_linear_cross_entropy, liger_available
from mmphi.stages import instruct, pretrain, projector


@pytest.mark.parametrize("num_items", [None, 37])
def test_fused_linear_cross_entropy_equals_the_causal_lm_loss_with_bias(num_items, monkeypatch):
    """Same value and gradients as logits = head(hidden) + transformers' ForCausalLMLoss, in several chunks."""
    monkeypatch.setattr("mmphi.kernels.CHUNK_TOKENS", 5)  # 2 x 11 shifted tokens: several chunks
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 12, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (2, 12), generator=generator)
    labels[0, :4] = -100  # a prompt without loss
    items = None if num_items is None else torch.tensor(num_items)

    expected = ForCausalLMLoss(hidden @ weight.T + bias, labels, vocab_size=50, num_items_in_batch=items)
    expected_grads = torch.autograd.grad(expected, (hidden, weight, bias))
    fused = fused_linear_cross_entropy(hidden, weight, bias, labels, items, use_liger=False)
    grads = torch.autograd.grad(fused, (hidden, weight, bias))
    torch.testing.assert_close(fused, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_the_fused_loss_takes_the_trainers_skip_logits_request():
    """Projector and instruct ask the model for its loss without logits (`skip_logits`); the fused loss answers it and
    does not hand the flag on to the decoder, with the loss of the model's own `skip_logits` path."""
    model, processor = build_tiny(seed=0)
    model.train()
    batch = processor(text=["<image>\nWhat colour is it? red"], images=[torch.zeros(3, 224, 224)])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, -3:] = batch["input_ids"][0, -3:]
    expected = model(**batch, labels=labels, skip_logits=True).loss
    apply_liger_kernel(model, device_is_cuda=False)
    seen = []
    model.model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    outputs = model(**batch, labels=labels, skip_logits=True)
    assert seen and "skip_logits" not in seen[0] and outputs.logits is None
    torch.testing.assert_close(outputs.loss, expected)


def test_the_layer_norms_swapped_are_the_language_models():
    """MM-Phi's vision tower keeps its own LayerNorms (frozen, run without autograd); Phi's decoder gets Liger's."""
    from mmphi.kernels import language_model_of

    model, _ = build_tiny(seed=0)
    decoder = language_model_of(model)
    assert decoder is model.model.language_model
    norms = [m for m in decoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == model.config.text_config.num_hidden_layers + 1  # one per layer + the final one
    assert not any(m is n for m in model.model.vision_tower.modules() for n in norms)


def test_liger_is_required_on_cuda_with_a_clear_error():
    if liger_available():
        pytest.skip("liger-kernel is installed here")
    model, _ = build_tiny(seed=0)
    with pytest.raises(ImportError, match="--use_liger_kernel needs liger-kernel on CUDA: pip install liger-kernel"):
        apply_liger_kernel(model, device_is_cuda=True)


def losses(output_dir) -> list[float]:
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    words = ["the", "ship", "sailed", "north", "across", "cold", "water", "while", "captain", "watched", "sky"]
    path = tmp_path_factory.mktemp("corpus") / "cc.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(words[i % 7:] + words[: i % 7]) * 4}) + "\n"
                            for i in range(60)))
    return str(path)


def pretrain_run(corpus, output_dir, *extra):
    return pretrain.main(["--config_name", "tiny", "--config_overrides", "hidden_size=32,intermediate_size=64,"
                          "num_hidden_layers=2,num_attention_heads=4", "--tokenizer_name", TINY_TOKENIZER,
                          "--train_files", corpus, "--output_dir", str(output_dir), "--block_size", "32",
                          "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                          "--max_steps", "3", "--optim", "adamw_torch", "--learning_rate", "3e-3",
                          "--logging_steps", "1", "--save_strategy", "no", "--validation_split_percentage", "10",
                          "--seed", "3", "--gradient_checkpointing", "false", *extra])


def test_pretrain_speed_flags_keep_the_losses(corpus, tmp_path):
    plain = pretrain_run(corpus, tmp_path / "plain")
    fused = pretrain_run(corpus, tmp_path / "liger", "--use_liger_kernel", "true")
    eager = pretrain_run(corpus, tmp_path / "eager", "--attn_implementation", "eager")
    reference = losses(tmp_path / "plain")
    assert len(reference) == 3
    assert losses(tmp_path / "liger") == pytest.approx(reference, rel=1e-4)
    assert losses(tmp_path / "eager") == pytest.approx(reference, rel=1e-4)
    for metrics in (fused, eager):
        assert metrics["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-4)


@pytest.mark.slow  # inductor compiles the tiny Phi on 2 CPU cores: tens of seconds
def test_pretrain_torch_compile_keeps_the_losses(corpus, tmp_path):
    pretrain_run(corpus, tmp_path / "plain")
    pretrain_run(corpus, tmp_path / "compiled", "--torch_compile", "true")
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "plain"), rel=1e-3)


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed_mm")
    save_mmphi(*build_tiny(seed=0), str(root / "base"))
    return root, generate(str(root / "data"), num_images=8, val_fraction=0.0, seed=6)


def test_projector_and_instruct_fused_loss_keeps_the_losses(multimodal, tmp_path):
    root, data = multimodal
    common = ["--model_name_or_path", str(root / "base"), "--image_folder", data["images"], "--max_steps", "2",
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--optim", "adamw_torch",
              "--save_strategy", "no", "--logging_steps", "1", "--val_fraction", "0", "--seed", "0",
              "--gradient_checkpointing", "false"]
    for name, main, data_file, extra in (
            ("projector", projector.main, data["captions_train"], []),
            ("instruct", instruct.main, data["llava_train"], ["--load_in_4bit", "false", "--lora_r", "4",
                                                            "--learning_rate", "1e-2", "--warmup_steps", "0"])):
        runs = {}
        for variant, flags in (("plain", []), ("liger", ["--use_liger_kernel", "true"])):
            out = tmp_path / f"{name}-{variant}"
            main([*common, "--data_path", data_file, "--output_dir", str(out), *extra, *flags])
            runs[variant] = losses(out)
        assert len(runs["plain"]) == 2 and all(math.isfinite(x) for x in runs["plain"])
        assert runs["liger"] == pytest.approx(runs["plain"], rel=1e-4), name

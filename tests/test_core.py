"""Core issue: config, model and processor of MM-Phi on the tiny offline default (CPU, seconds)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    PhiConfig,
    PhiForCausalLM,
)

from configuration_mmphi import TINY_TEXT_CONFIG, TINY_VISION_CONFIG, MMPhiConfig
from mmphi import TINY_TOKENIZER
from mmphi.build import build_from_components, build_tiny, save_mmphi, save_tiny_clip, tiny_tokenizer
from mmphi.export import llava_config
from modeling_mmphi import MMPhiForCausalLM, MMPhiModel
from processing_mmphi import MMPhiProcessor

TINY_PATCHES = (TINY_VISION_CONFIG["image_size"] // TINY_VISION_CONFIG["patch_size"]) ** 2
TINY_IMAGE_TOKENS = TINY_PATCHES + 1  # the tiny default keeps CLS ("full")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny(seed=0)
    return model.eval(), processor


def colour_image(colour=(200, 30, 30), size=(64, 48)):
    return Image.new("RGB", size, colour)


# --- configuration -----------------------------------------------------------------------------------------------


def test_config_defaults_describe_tinyclip_and_phi2():
    config = MMPhiConfig()
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.patch_size, vision.image_size) == (640, 32, 224)
    assert (vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size) == (12, 10, 2560)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (2560, 32, 32)
    assert (text.intermediate_size, text.vocab_size) == (10240, 51200)
    assert text.rope_parameters["partial_rotary_factor"] == pytest.approx(0.4)
    assert config.projector_type == "linear" and config.vision_feature_layer == -1
    assert config.vision_feature_select_strategy == "default" and config.image_seq_length == 49


def test_tiny_phi_computes_phi2s_activation():
    """The tiny Phi's fused tanh-GELU is Phi-2's gelu_new (the same function, one op instead of eight)."""
    from transformers.activations import ACT2FN

    assert MMPhiConfig().text_config.hidden_act == "gelu_new"
    x = torch.linspace(-12, 12, 100_001)
    tiny = ACT2FN[MMPhiConfig.tiny().text_config.hidden_act](x)
    torch.testing.assert_close(tiny, ACT2FN["gelu_new"](x), rtol=1e-6, atol=1e-6)


def test_config_accepts_dicts_and_objects_and_checks_fields():
    as_dicts = MMPhiConfig(vision_config=dict(TINY_VISION_CONFIG), text_config=dict(TINY_TEXT_CONFIG))
    as_objects = MMPhiConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION_CONFIG), text_config=PhiConfig(**TINY_TEXT_CONFIG)
    )
    assert as_dicts.to_dict() == as_objects.to_dict()
    assert MMPhiConfig.tiny().image_seq_length == TINY_IMAGE_TOKENS
    assert MMPhiConfig.tiny(vision_feature_select_strategy="default").image_seq_length == TINY_PATCHES
    with pytest.raises(ValueError, match="projector_type"):
        MMPhiConfig.tiny(projector_type="resampler")
    with pytest.raises(ValueError, match="image_seq_length"):
        MMPhiConfig.tiny(image_seq_length=10)


# --- model -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("feature_layer,strategy", [(-1, "default"), (-2, "full"), ([-3, -1], "default")])
def test_parameter_names_and_logits_match_llava(feature_layer, strategy):
    torch.manual_seed(0)
    config = MMPhiConfig.tiny(
        projector_type="mlp2x_gelu", vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy
    )
    llava = LlavaForConditionalGeneration(llava_config(config)).eval()
    ours = MMPhiForCausalLM(config).eval()
    result = ours.load_state_dict(llava.state_dict(), strict=False)
    assert result.missing_keys == ["lm_head.bias"] and result.unexpected_keys == []  # Llava's head has no bias
    torch.nn.init.zeros_(ours.lm_head.bias)

    input_ids = torch.tensor([[7] * 3 + [config.image_token_index] * config.image_seq_length + [11, 12, 13]] * 2)
    pixel_values = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = llava(input_ids=input_ids, pixel_values=pixel_values).logits
        actual = ours(input_ids=input_ids, pixel_values=pixel_values).logits
        from_embeds = ours(inputs_embeds=ours.get_input_embeddings()(input_ids), pixel_values=pixel_values).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_embeds, actual)


def test_linear_projector_is_the_seeds_single_layer():
    model = MMPhiForCausalLM(MMPhiConfig.tiny())
    projector_params = {n for n, _ in model.named_parameters() if "multi_modal_projector" in n}
    assert projector_params == {f"model.multi_modal_projector.linear_1.{p}" for p in ("weight", "bias")}
    assert model.lm_head.bias is not None


def test_image_features_shape(tiny):
    model, _ = tiny
    features = model.get_image_features(torch.randn(3, 3, 224, 224))
    assert features.shape == (3, TINY_IMAGE_TOKENS, TINY_TEXT_CONFIG["hidden_size"])


def test_image_token_count_mismatch_is_a_clear_error(tiny):
    model, _ = tiny
    image_token = model.config.image_token_index
    with pytest.raises(ValueError, match=f"{TINY_IMAGE_TOKENS - 1} image tokens .* 1 image"):
        model(input_ids=torch.tensor([[5] + [image_token] * (TINY_IMAGE_TOKENS - 1)]),
              pixel_values=torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=torch.tensor([[5] + [image_token] * TINY_IMAGE_TOKENS]))


def test_loss_only_where_labels_are_set(tiny):
    model, processor = tiny
    batch = processor(text=["<image>\nWhat colour is it? red"], images=[colour_image()])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, -3:] = batch["input_ids"][0, -3:]
    with torch.no_grad():
        out = model(**batch, labels=labels)
    logits = out.logits[0, :-1]
    targets = labels[0, 1:]
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)
    # The loss is an average over the labelled positions only: padding those few more changes nothing else
    assert keep.sum() == 3


@pytest.mark.parametrize("num_items_in_batch", [None, 7])
def test_skip_logits_gives_the_same_loss_and_gradients(num_items_in_batch):
    """`skip_logits` runs the LM head on the labelled positions only: the loss and every gradient are the full
    path's (the mean, or the sum over `num_items_in_batch` as Trainer passes it), and no logits come back."""
    model, processor = build_tiny(seed=2)
    model.train()
    batch = processor(text=["<image>\nWhat colour is it? red", "<image>\nHow many shapes are there? 3 of them"],
                      images=[[colour_image()], [colour_image((0, 0, 255))]])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, -2:] = batch["input_ids"][0, -2:]
    labels[1, -4:] = batch["input_ids"][1, -4:]
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    results = []
    for skip in (False, True):
        model.zero_grad()
        out = model(**batch, labels=labels, skip_logits=skip, **extra)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, full_grads), (skipped, skipped_grads) = results
    assert skipped.logits is None and full.logits is not None
    torch.testing.assert_close(skipped.loss, full.loss, atol=1e-6, rtol=1e-5)
    assert full_grads.keys() == skipped_grads.keys() and "lm_head.weight" in full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(skipped_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="needs labels"):
        model(**batch, skip_logits=True)


def test_greedy_generation_same_with_and_without_cache(tiny):
    model, processor = tiny
    batch = processor(text=["<image>\nWhat shape is this?"], images=[colour_image()])
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_batched_left_padded_generation_equals_one_by_one(tiny):
    model, processor = tiny
    prompts = ["<image>\nWhat colour?", "<image>\nHow many shapes are there in this picture, please?", "Hello there"]
    images = [[colour_image((10, 200, 10))], [colour_image((10, 10, 200))], []]
    batch = processor(text=prompts, images=images)
    assert processor.tokenizer.padding_side == "left"
    with torch.no_grad():
        batched = model.generate(**batch, max_new_tokens=8, do_sample=False)[:, -8:]
        for i, prompt in enumerate(prompts):
            single = processor(text=[prompt], images=images[i] or None)
            one = model.generate(**single, max_new_tokens=8, do_sample=False)[:, -8:]
            assert torch.equal(batched[i : i + 1], one), f"prompt {i}"


def test_gradient_only_reaches_trainable_parts(tiny):
    model, processor = build_tiny(seed=1)
    model.train()
    model.model.vision_tower.requires_grad_(False)
    model.model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    batch = processor(text=["<image>\nA red square"], images=[colour_image()])
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for name, param in model.named_parameters():
        if "multi_modal_projector" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_gradient_checkpointing_and_sdpa_give_the_same_loss(tmp_path, tiny):
    model, processor = tiny
    save_mmphi(model, processor, str(tmp_path))
    batch = processor(text=["<image>\nA red square"], images=[colour_image()])
    eager = MMPhiForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")
    sdpa = MMPhiForCausalLM.from_pretrained(str(tmp_path), attn_implementation="sdpa")
    assert sdpa.model.language_model.config._attn_implementation == "sdpa"
    sdpa.train()
    sdpa.activation_checkpointing_enable()
    assert sdpa.model.language_model.gradient_checkpointing
    loss = sdpa(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    with torch.no_grad():
        reference = eager.train()(**batch, labels=batch["input_ids"]).loss
    torch.testing.assert_close(loss.detach(), reference, atol=1e-5, rtol=1e-5)
    assert sdpa.model.multi_modal_projector.linear_1.weight.grad is not None


def test_4bit_loading_quantizes_only_the_language_model(tmp_path, tiny):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    model, processor = tiny
    save_mmphi(model, processor, str(tmp_path))
    quantized = MMPhiForCausalLM.from_pretrained(
        str(tmp_path), quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    kinds = {name: type(module) for name, module in quantized.named_modules()}
    assert kinds["model.language_model.layers.0.self_attn.q_proj"] is bnb.nn.Linear4bit
    assert kinds["model.multi_modal_projector.linear_1"] is torch.nn.Linear
    assert kinds["model.vision_tower.encoder.layers.0.self_attn.q_proj"] is torch.nn.Linear
    assert kinds["lm_head"] is torch.nn.Linear
    batch = processor(text=["<image>\nWhat colour?"], images=[colour_image()])
    with torch.no_grad():
        quantized_logits = quantized(**batch).logits
        full_logits = model(**batch).logits
    assert quantized_logits.shape == full_logits.shape and torch.isfinite(quantized_logits).all()
    # 4-bit weights approximate the full ones: the predictions agree far better than chance
    agreement = (quantized_logits.argmax(-1) == full_logits.argmax(-1)).float().mean()
    assert agreement > 0.5


# --- from_components ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def component_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    phi = PhiForCausalLM(PhiConfig(**TINY_TEXT_CONFIG))
    phi.save_pretrained(root / "phi")
    tiny_tokenizer().__class__.from_pretrained(TINY_TOKENIZER).save_pretrained(
        root / "phi"
    )
    clip = CLIPModel(CLIPConfig(vision_config=dict(TINY_VISION_CONFIG), text_config={"hidden_size": 32,
                     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}, projection_dim=32))
    clip.save_pretrained(root / "clip")
    save_tiny_clip(str(root / "clip_vision"))
    return root, phi.eval()


@pytest.mark.parametrize("vision_kind", ["clip", "clip_vision"])
def test_from_components_copies_weights(component_checkpoints, vision_kind):
    root, phi = component_checkpoints
    model, processor = build_from_components(str(root / vision_kind), str(root / "phi"))
    model.eval()
    if vision_kind == "clip":
        source = CLIPModel.from_pretrained(root / "clip").vision_model
    else:
        source = CLIPVisionModel.from_pretrained(root / "clip_vision")
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(model.model.vision_tower.state_dict()[name], tensor, msg=name)
    # <image> and a pad token distinct from EOS were added; text-only logits equal the Phi checkpoint's
    tokenizer = processor.tokenizer
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.image_token_index == tokenizer.convert_tokens_to_ids("<image>")
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    ids = tokenizer("The whale swam", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[..., : phi.config.vocab_size], phi(input_ids=ids).logits)


def test_a_bf16_phi_stays_bf16_and_is_held_once(component_checkpoints, tmp_path):
    """Phi-2 ships in bf16: the build keeps the checkpoint's weights and dtype (the tower follows it), makes them
    MM-Phi's modules instead of copying them into a second model, and saves and reloads them so."""
    from safetensors import safe_open

    root, _ = component_checkpoints
    torch.manual_seed(1)
    PhiForCausalLM(PhiConfig(**TINY_TEXT_CONFIG)).to(torch.bfloat16).save_pretrained(tmp_path / "phi")
    tiny_tokenizer().__class__.from_pretrained(TINY_TOKENIZER).save_pretrained(tmp_path / "phi")
    model, processor = build_from_components(str(root / "clip_vision"), str(tmp_path / "phi"))
    language_model = model.model.language_model
    assert language_model.embed_tokens.weight.dtype == torch.bfloat16 == model.lm_head.weight.dtype
    assert model.model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16
    assert model.model.vision_tower.get_input_embeddings().weight.dtype == torch.bfloat16
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    projector = model.model.multi_modal_projector.linear_1.weight.float()
    assert 0.01 < projector.std() < 0.03 and not model.model.multi_modal_projector.linear_1.bias.any()
    reloaded = PhiForCausalLM.from_pretrained(tmp_path / "phi")
    for name, tensor in reloaded.model.state_dict().items():
        assert torch.equal(language_model.state_dict()[name], tensor), name
    save_mmphi(model, processor, str(tmp_path / "mmphi"))
    with safe_open(str(tmp_path / "mmphi" / "model.safetensors"), framework="pt") as handle:
        assert handle.get_slice("lm_head.weight").get_dtype() == "BF16"
    loaded = MMPhiForCausalLM.from_pretrained(tmp_path / "mmphi", dtype="auto")
    assert json.loads((tmp_path / "mmphi" / "config.json").read_text())["dtype"] == "bfloat16"
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    batch = processor(text=["<image>\nhi"], images=[colour_image()])
    assert loaded.generate(**batch, max_new_tokens=2, do_sample=False).shape[1] == batch["input_ids"].shape[1] + 2
    told, _ = build_from_components(str(root / "clip_vision"), str(tmp_path / "phi"), torch.float32)  # --dtype
    assert {p.dtype for p in told.parameters()} == {torch.float32}


def test_resize_when_tokens_do_not_fit(tmp_path):
    tokenizer = tiny_tokenizer().__class__.from_pretrained(TINY_TOKENIZER)
    full_vocab = len(tokenizer)  # no spare rows: <image>/<pad> must grow the embeddings and the biased head
    phi = PhiForCausalLM(PhiConfig(**{**TINY_TEXT_CONFIG, "vocab_size": full_vocab}))
    phi.save_pretrained(tmp_path / "phi")
    tokenizer.save_pretrained(tmp_path / "phi")
    save_tiny_clip(str(tmp_path / "clip"))
    model, processor = build_from_components(str(tmp_path / "clip"), str(tmp_path / "phi"))
    assert model.get_input_embeddings().weight.shape[0] >= len(processor.tokenizer) > full_vocab
    assert model.lm_head.bias.shape[0] == model.lm_head.weight.shape[0]
    batch = processor(text=["<image>\nhi"], images=[colour_image()])
    assert model(**batch).logits.shape[-1] == model.config.text_config.vocab_size


def test_build_cli_keeps_cls_for_the_tiny_tower_and_drops_it_otherwise(tmp_path):
    from mmphi.build import main as build_main

    phi = PhiForCausalLM(PhiConfig(**TINY_TEXT_CONFIG))
    phi.save_pretrained(tmp_path / "phi")
    tiny_tokenizer().save_pretrained(tmp_path / "phi")
    save_tiny_clip(str(tmp_path / "clip"))
    for vision_model, strategy, tokens in (("tiny", "full", TINY_IMAGE_TOKENS), (str(tmp_path / "clip"), "default",
                                                                                 TINY_PATCHES)):
        output_dir = tmp_path / f"built-{strategy}"
        build_main(["--vision_model", vision_model, "--text_model", str(tmp_path / "phi"), "--output_dir",
                    str(output_dir)])
        model = MMPhiForCausalLM.from_pretrained(str(output_dir))
        processor = MMPhiProcessor.from_pretrained(str(output_dir))
        assert (model.config.vision_feature_select_strategy, model.config.image_seq_length) == (strategy, tokens)
        batch = processor(text=["<image>\nhi"], images=[colour_image()])
        assert (batch["input_ids"] == processor.image_token_id).sum() == tokens
        assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]


# --- processor ---------------------------------------------------------------------------------------------------


def test_processor_expands_image_placeholders(tiny):
    _, processor = tiny
    batch = processor(text=["<image>\nQ1", "<image> and <image>\nQ2"], images=[colour_image()] * 3)
    image_id = processor.image_token_id
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}
    assert batch["pixel_values"].shape == (3, 3, 224, 224)
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [TINY_IMAGE_TOKENS, 2 * TINY_IMAGE_TOKENS]
    assert processor.batch_decode(batch["input_ids"], skip_special_tokens=True)[1].strip() == "and \nQ2"


def test_processor_placeholder_mismatch_is_a_clear_error(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="2 <image> placeholder.*1 image"):
        processor(text="<image><image> two?", images=[colour_image()])
    with pytest.raises(ValueError, match="0 <image> placeholder.*1 image"):
        processor(text="no placeholder", images=colour_image())
    with pytest.raises(ValueError, match="1 <audio> placeholder.*0 audio"):
        processor(text="<audio> what was said?")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_processor_converts_any_image_mode(tiny, mode):
    _, processor = tiny
    image = Image.new(mode, (40, 30))
    batch = processor(text="<image>\nwhat?", images=image)
    assert batch["pixel_values"].shape == (1, 3, 224, 224)


def test_transparent_pixels_become_white(tiny):
    _, processor = tiny
    transparent = processor(text="<image>", images=Image.new("RGBA", (32, 32), (0, 0, 0, 0)))["pixel_values"]
    white = processor(text="<image>", images=Image.new("RGB", (32, 32), (255, 255, 255)))["pixel_values"]
    torch.testing.assert_close(transparent, white)


def test_chat_template_round_trip_and_assistant_mask(tiny):
    _, processor = tiny
    image = colour_image()
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": "How many shapes?"},
        {"role": "assistant", "content": "Two."},
    ]
    text = processor.apply_chat_template(messages)
    eos = processor.tokenizer.eos_token
    assert text == f"User: <image>\nWhat colour?\nAssistant: Red.{eos}\nUser: How many shapes?\nAssistant: Two.{eos}\n"
    prompt = processor.apply_chat_template(messages[:1], add_generation_prompt=True)
    assert prompt == "User: <image>\nWhat colour?\nAssistant:"
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    assert out["pixel_values"].shape == (1, 3, 224, 224)
    assert (out["input_ids"] == processor.image_token_id).sum() == TINY_IMAGE_TOKENS
    answer_ids = out["input_ids"][0][out["assistant_masks"][0].bool()]
    assert processor.tokenizer.decode(answer_ids) == f" Red.{eos} Two.{eos}"


# --- save / load -------------------------------------------------------------------------------------------------

FRESH_PROCESS_LOAD = r"""
import json, sys, torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor
path = sys.argv[1]
# The checkout (or an editable install) must not be what loads: only the code files inside the folder may be used.
for name in ("configuration_mmphi", "modeling_mmphi", "processing_mmphi", "speech_mmphi"):
    sys.modules[name] = None
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
base = AutoModel.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
batch = processor(text=["<image>\nWhat colour?"], images=[Image.new("RGB", (64, 48), (200, 30, 30))])
with torch.no_grad():
    logits = model(**batch).logits
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
assert type(processor).__module__.startswith("transformers_modules."), type(processor).__module__
json.dump({"config": type(config).__name__, "base": type(base).__name__, "model": type(model).__name__,
           "processor": type(processor).__name__, "logits": logits[0, -5:].tolist()}, sys.stdout)
"""


def test_round_trip_through_auto_classes_in_a_fresh_process(tmp_path, tiny):
    model, processor = tiny
    folder = tmp_path / "mmphi"
    save_mmphi(model, processor, str(folder))
    for name in ("model.safetensors", "config.json", "modeling_mmphi.py", "configuration_mmphi.py",
                 "processing_mmphi.py", "processor_config.json", "chat_template.jinja", "tokenizer.json"):
        assert (folder / name).exists(), name
    assert not list(folder.glob("*.bin"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_LOAD, str(folder)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["config"] == "MMPhiConfig" and loaded["base"] == "MMPhiModel"
    assert loaded["model"] == "MMPhiForCausalLM" and loaded["processor"] == "MMPhiProcessor"
    batch = processor(text=["<image>\nWhat colour?"], images=[colour_image()])
    with torch.no_grad():
        expected = model(**batch).logits[0, -5:]
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected)


def test_auto_model_returns_image_hidden_states(tiny):
    model, processor = tiny
    base = MMPhiModel(model.config)
    batch = processor(text=["<image>\nhi"], images=[colour_image()])
    out = base(**batch)
    assert out.last_hidden_state.shape[:2] == batch["input_ids"].shape
    assert out.image_hidden_states.shape == (1, TINY_IMAGE_TOKENS, model.config.text_config.hidden_size)

"""The native Llava export: transformers' own classes load it without remote code and compute MM-Phi's logits."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mmphi.build import build_tiny, save_mmphi
from mmphi.data.synthetic import generate
from mmphi.export import export_llava
from modeling_mmphi import MMPhiForCausalLM
from processing_mmphi import MMPhiProcessor

QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}]


def save_tiny(folder, head_bias: bool = True, **config) -> str:
    """A tiny MM-Phi whose LM head has a bias and whose final LayerNorm is not the identity, as in Phi-2."""
    model, processor = build_tiny(seed=0, **config)
    if head_bias:
        generator = torch.Generator().manual_seed(1)
        norm = model.model.language_model.final_layernorm
        with torch.no_grad():
            model.lm_head.bias.copy_(torch.randn(model.lm_head.bias.shape, generator=generator) * 0.5)
            norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=generator))
            norm.bias.copy_(0.2 * torch.randn(norm.bias.shape, generator=generator))
    save_mmphi(model, processor, str(folder))
    return str(folder)


def both_outputs(mmphi_folder: str, llava_folder: str, image, dtype=torch.float32):
    """(MM-Phi logits, Llava logits, MM-Phi greedy ids, Llava greedy ids) for one question about `image`, each model
    fed by its own processor (which must agree)."""
    processor = MMPhiProcessor.from_pretrained(mmphi_folder, trust_remote_code=True)
    llava_processor = AutoProcessor.from_pretrained(llava_folder)
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert llava_processor.apply_chat_template(QUESTION, add_generation_prompt=True) == prompt
    inputs = processor(text=prompt, images=[image])
    llava_inputs = llava_processor(text=prompt, images=[image], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], llava_inputs["input_ids"])
    torch.testing.assert_close(inputs["pixel_values"], llava_inputs["pixel_values"], rtol=0, atol=0)
    model = MMPhiForCausalLM.from_pretrained(mmphi_folder, dtype=dtype).eval()
    llava = LlavaForConditionalGeneration.from_pretrained(llava_folder).eval()
    assert llava.dtype == dtype
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        logits, llava_logits = model(**inputs).logits.float(), llava(**inputs).logits.float()
    greedy = dict(max_new_tokens=6, do_sample=False)
    return logits, llava_logits, model.generate(**inputs, **greedy), llava.generate(**inputs, **greedy)


@pytest.fixture(scope="module")
def image(draw_shape, tmp_path_factory):
    return Image.open(draw_shape(tmp_path_factory.mktemp("images") / "red.png", "red")).convert("RGB")


@pytest.mark.parametrize("projector_type", ["linear", "mlp2x_gelu"])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_the_export_computes_mmphis_logits(projector_type, strategy, image, tmp_path):
    """Both projectors (the linear one as Llava's with an identity second layer) and both feature-select strategies;
    the head's bias folded into the weights: the difference is fp32 rounding."""
    source = save_tiny(tmp_path / "mmphi", projector_type=projector_type, vision_feature_select_strategy=strategy)
    export_llava(source, str(tmp_path / "llava"))
    config = json.loads((tmp_path / "llava" / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["text_config"]["architectures"] == ["PhiForCausalLM"]
    assert config["projector_hidden_act"] == ("linear" if projector_type == "linear" else "gelu")
    assert config["vision_feature_select_strategy"] == strategy and config["text_config"]["use_cache"] is True
    logits, llava_logits, answer, llava_answer = both_outputs(source, str(tmp_path / "llava"), image)
    assert (logits - llava_logits).abs().max() <= 1e-5 * logits.abs().max().clamp(min=1)
    assert torch.equal(answer, llava_answer)


def test_a_bias_free_head_exports_bit_for_bit_in_bf16(image, tmp_path):
    """Nothing to fold: the identity second layer is exact, so the logits are equal, in bf16 as in fp32."""
    source = save_tiny(tmp_path / "mmphi", head_bias=False)
    export_llava(source, str(tmp_path / "llava"), "bfloat16")
    logits, llava_logits, answer, llava_answer = both_outputs(source, str(tmp_path / "llava"), image, torch.bfloat16)
    assert torch.equal(logits, llava_logits) and torch.equal(answer, llava_answer)


def test_a_bf16_export_of_a_biased_head_is_within_bf16_rounding(image, tmp_path):
    source = save_tiny(tmp_path / "mmphi", projector_type="mlp2x_gelu")
    export_llava(source, str(tmp_path / "llava"), "bfloat16")
    logits, llava_logits, answer, llava_answer = both_outputs(source, str(tmp_path / "llava"), image, torch.bfloat16)
    assert (logits - llava_logits).abs().max() <= 2 ** -7 * logits.abs().max()  # two bf16 steps at most
    assert torch.equal(answer, llava_answer)


def test_transformers_alone_loads_and_answers_without_remote_code(image, tmp_path):
    """The folder holds no code and no auto_map; `AutoModelForImageTextToText`, `AutoProcessor` and the pipeline load
    it with trust_remote_code off, in a process that never imports MM-Phi, and answer like the MM-Phi folder."""
    source = save_tiny(tmp_path / "mmphi")
    export = export_llava(source, str(tmp_path / "llava"))
    assert not [name for name in os.listdir(export) if name.endswith(".py")]
    assert not any("auto_map" in (tmp_path / "llava" / name).read_text()
                   for name in os.listdir(export) if name.endswith(".json"))
    image.save(tmp_path / "red.png")
    script = f"""
import json, sys
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
model = AutoModelForImageTextToText.from_pretrained({export!r}, trust_remote_code=False)
processor = AutoProcessor.from_pretrained({export!r}, trust_remote_code=False)
pipe = pipeline("image-text-to-text", model=model, processor=processor)
chat = [{{"role": "user", "content": [{{"type": "image", "image": {str(tmp_path / "red.png")!r}}},
                                      {{"type": "text", "text": "What colour is the circle?"}}]}}]
answer = pipe(text=chat, max_new_tokens=6, do_sample=False)[0]["generated_text"][-1]["content"]
print(json.dumps({{"model": type(model).__name__, "processor": type(processor).__name__, "answer": answer,
                  "mmphi_imported": any(name.split(".")[0] in ("mmphi", "transformers_modules")
                                        or name.endswith("_mmphi") for name in sys.modules)}}))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    processor = MMPhiProcessor.from_pretrained(source, trust_remote_code=True)
    model = MMPhiForCausalLM.from_pretrained(source)
    inputs = processor(text=processor.apply_chat_template(QUESTION, add_generation_prompt=True), images=[image])
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert result == {"model": "LlavaForConditionalGeneration", "processor": "LlavaProcessor", "answer": expected,
                      "mmphi_imported": False}


def test_instruct_exports_its_merged_model(image, tmp_path):
    """`--merge --export_llava DIR`: the QLoRA adapter merged, then exported; the export answers as the merged
    folder. Without --merge the flag is refused before training, and an adapter folder is refused by the export."""
    from mmphi.stages import instruct

    base = save_tiny(tmp_path / "base")
    data = generate(str(tmp_path / "data"), num_images=8, val_fraction=0.0, seed=2)
    arguments = ["--model_name_or_path", base, "--data_path", data["llava_train"], "--image_folder", data["images"],
                 "--output_dir", str(tmp_path / "instruct"), "--lora_r", "4", "--max_steps", "2",
                 "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--optim", "adamw_torch",
                 "--val_fraction", "0", "--save_strategy", "no", "--export_llava", str(tmp_path / "llava")]
    with pytest.raises(ValueError, match="add --merge"):
        instruct.main(arguments)
    metrics = instruct.main([*arguments, "--merge"])
    assert metrics["export_llava"] == str(tmp_path / "llava")
    logits, llava_logits, answer, llava_answer = both_outputs(str(tmp_path / "instruct" / "merged"),
                                                              str(tmp_path / "llava"), image)
    assert (logits - llava_logits).abs().max() <= 1e-5 * logits.abs().max().clamp(min=1)
    assert torch.equal(answer, llava_answer)
    with pytest.raises(ValueError, match="is a LoRA adapter: merge it"):
        export_llava(str(tmp_path / "instruct"), str(tmp_path / "other"))

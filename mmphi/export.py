"""Export an MM-Phi folder as a native transformers Llava checkpoint: no remote code, served by engines that know Llava.

    python scripts/export_llava.py --model outputs/instruct/merged --output_dir outputs/instruct-llava

The folder loads with transformers alone (`LlavaForConditionalGeneration`, `AutoModelForImageTextToText`,
`AutoProcessor`, `pipeline("image-text-to-text")`) without `trust_remote_code`, and computes the MM-Phi folder's logits.
MM-Phi already names its parameters like Llava; two parts need rewriting, both exactly:

- the `linear` projector becomes Llava's two-layer one with `projector_hidden_act: "linear"` (the identity) and an
  identity second layer;
- Phi's LM head has a bias, Llava's none. The bias moves into the weights through the final LayerNorm: its output
  `y = g * n + beta` has `n` summing to zero, so `sum(y / g)` is the same number for every token and acts as a constant
  input for the bias (`fold_lm_head_bias`). The head's bias is written as zeros, for engines whose Phi has one (vLLM).

Speech is text by then: a spoken question is transcribed first (`speech_mmphi`), as the MM-Phi processor does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch

from mmphi.loading import check_model_path, readable_weights, write_folder_atomically

logger = logging.getLogger(__name__)

PROJECTOR_KEY = "model.multi_modal_projector"
NORM_KEY = "model.language_model.final_layernorm"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llava_config(config):
    """MM-Phi's config as a `LlavaConfig`: the same tower, feature layer and strategy, image token and count; the
    text model named `PhiForCausalLM` (what serving engines build for `text_config`)."""
    from transformers import LlavaConfig

    text_config = config.text_config.to_dict() | {"architectures": ["PhiForCausalLM"], "use_cache": True}
    linear = config.projector_type == "linear"
    return LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=text_config,
        image_token_index=config.image_token_index,
        image_seq_length=config.image_seq_length,
        projector_hidden_act="linear" if linear else config.projector_hidden_act,
        multimodal_projector_bias=config.multimodal_projector_bias,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        tie_word_embeddings=False,
        architectures=["LlavaForConditionalGeneration"],
    )


def fold_lm_head_bias(norm_weight, norm_bias, head_weight, head_bias):
    """(new final-LayerNorm bias, new head weight) so that `head_weight' @ LN'(x) == head_weight @ LN(x) + head_bias`.

    LN(x) = g * n + beta, and n = (x - mean) / std sums to zero, so with v = 1 / g, `v . LN(x) = v . beta` = K for
    every x: the bias rides on that constant, `W' = W + outer(b, v) / K`. Shifting beta by t * g (and the head by
    -t * W g) moves K to K + t * H, away from zero, so rounding stays at the level of the matmul itself. In float64."""
    g, beta, weight, bias = (t.detach().double() for t in (norm_weight, norm_bias, head_weight, head_bias))
    if bool((g == 0).any()):
        raise ValueError("the final LayerNorm has a zero weight: its head bias cannot be folded into Llava's "
                         "bias-free LM head")
    v = 1.0 / g
    constant = float((v * beta).sum())
    shift = 1.0 if constant >= 0 else -1.0
    shifted_constant = constant + shift * g.numel()
    coefficient = (bias - shift * (weight @ g)) / shifted_constant
    new_weight = weight + torch.outer(coefficient, v)
    return beta + shift * g, new_weight


def llava_state_dict(model, dtype: torch.dtype) -> dict:
    """MM-Phi's weights under Llava's layout, in `dtype` (rewritten tensors computed in float64 first)."""
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    config = model.config
    if config.projector_type == "linear":  # Llava's projector always has a second layer: make it the identity
        hidden = config.text_config.hidden_size
        reference = state[f"{PROJECTOR_KEY}.linear_1.weight"]
        state[f"{PROJECTOR_KEY}.linear_2.weight"] = torch.eye(hidden, dtype=reference.dtype)
        if config.multimodal_projector_bias:
            state[f"{PROJECTOR_KEY}.linear_2.bias"] = torch.zeros(hidden, dtype=reference.dtype)
    head_bias = state.pop("lm_head.bias")
    if bool(head_bias.any()):
        norm_bias, head_weight = fold_lm_head_bias(state[f"{NORM_KEY}.weight"], state[f"{NORM_KEY}.bias"],
                                                   state["lm_head.weight"], head_bias)
        state[f"{NORM_KEY}.bias"], state["lm_head.weight"] = norm_bias, head_weight
    state["lm_head.bias"] = torch.zeros_like(head_bias)
    return {name: tensor.to(dtype).contiguous() for name, tensor in state.items()}


def check_llava_keys(config, state: dict) -> None:
    """Every parameter of transformers' Llava is in `state` with its shape, and nothing else but the head bias."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in LlavaForConditionalGeneration(config).state_dict().items()}
    got = {name: tuple(t.shape) for name, t in state.items() if name != "lm_head.bias"}
    if got != expected:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        shapes = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])
        raise ValueError(f"the weights do not fit transformers' Llava: missing {missing[:5]}, unexpected "
                         f"{extra[:5]}, other shapes {shapes[:5]}")


def llava_processor(processor, config):
    """MM-Phi's image processor, tokenizer and chat template in a `LlavaProcessor`, which expands `<image>` to the
    same count: one token per patch, plus CLS (`num_additional_image_tokens`) unless the "default" strategy drops it."""
    from transformers import LlavaProcessor

    return LlavaProcessor(  # the auto_map its parts carry is stripped from the saved files (export_llava)
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=processor.chat_template,
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def export_llava(model_path: str, output_dir: str, dtype: str | torch.dtype | None = None) -> str:
    """Write `model_path` (a full MM-Phi folder: the projector stage's output or a merged instruct model) as a native
    Llava folder at `output_dir`, in `dtype` (default: the folder's). Returns `output_dir`."""
    from huggingface_hub import save_torch_state_dict

    from modeling_mmphi import MMPhiForCausalLM
    from processing_mmphi import MMPhiProcessor

    check_model_path(model_path)
    if os.path.isfile(os.path.join(model_path, "adapter_config.json")):
        raise ValueError(f"{model_path} is a LoRA adapter: merge it into its base first (scripts/merge_lora.py, or "
                         "the instruct stage's --merge) and export the merged folder")
    with readable_weights(model_path):
        model = MMPhiForCausalLM.from_pretrained(model_path, dtype="auto")
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype or model.dtype
    config = llava_config(model.config)
    config.dtype = dtype
    state = llava_state_dict(model, dtype)
    check_llava_keys(config, state)
    processor = llava_processor(MMPhiProcessor.from_pretrained(model_path, trust_remote_code=True), model.config)
    generation_config = model.generation_config
    generation_config.use_cache = True
    del model

    def write(folder: str) -> None:
        config.save_pretrained(folder)
        generation_config.save_pretrained(folder)
        save_torch_state_dict(state, folder, max_shard_size="5GB")
        processor.save_pretrained(folder)
        strip_remote_code_references(folder)
        with open(os.path.join(folder, "README.md"), "w") as handle:
            handle.write(export_card(model_path, config))

    write_folder_atomically(output_dir, write)
    logger.info("exported %s as a native Llava folder: %s", model_path, output_dir)
    return output_dir


def export_card(model_path: str, config) -> str:
    """The export's model card: what it is, how transformers loads it, and that speech is transcribed first."""
    projector = "linear" if config.projector_hidden_act == "linear" else f"two layers, {config.projector_hidden_act}"
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [llava, phi, mmphi]
---

# MM-Phi as a native Llava checkpoint

Exported from the MM-Phi folder `{os.path.basename(os.path.normpath(model_path))}` by MM-Phi's
`scripts/export_llava.py`: a CLIP vision tower ({config.vision_config.hidden_size}-d, layer
{config.vision_feature_layer}, strategy "{config.vision_feature_select_strategy}"), a projector ({projector}) and a
Phi language model ({config.text_config.hidden_size}-d, {config.text_config.num_hidden_layers} layers). It loads with
transformers alone, no remote code, and computes the MM-Phi model's logits (Phi's LM head bias is folded into the
head's weights; the zero `lm_head.bias` in the file is for engines whose Phi has one, and transformers lists it as
unexpected).

```python
from transformers import pipeline

pipe = pipeline("image-text-to-text", model="PATH_OR_REPO")
chat = [{{"role": "user", "content": [{{"type": "image", "url": "https://example.com/photo.jpg"}},
                                     {{"type": "text", "text": "What is in the picture?"}}]}}]
print(pipe(text=chat, max_new_tokens=64)[0]["generated_text"][-1]["content"])
```

Speech: this checkpoint reads images and text. MM-Phi answers a spoken question by transcribing it first (the first
10 s, with `speech_mmphi.SpeechTranscriber`) and asking the transcript as text; do the same before calling it.
"""


def strip_remote_code_references(folder: str) -> None:
    """No `auto_map` in any saved JSON: the export loads with transformers' own classes, never MM-Phi's code."""
    for name in os.listdir(folder):
        if not name.endswith(".json"):
            continue
        path = os.path.join(folder, name)
        with open(path) as handle:
            data = json.load(handle)
        cleaned = _without_auto_map(data)
        if cleaned != data:
            with open(path, "w") as handle:
                json.dump(cleaned, handle, indent=2)


def _without_auto_map(data):
    if isinstance(data, dict):
        return {key: _without_auto_map(value) for key, value in data.items() if key != "auto_map"}
    if isinstance(data, list):
        return [_without_auto_map(item) for item in data]
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a full MM-Phi folder (the projector stage's output or a merged instruct model)")
    parser.add_argument("--output_dir", required=True, help="where the Llava folder is written")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights' dtype (default: the model's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    export_llava(args.model, args.output_dir, args.dtype)

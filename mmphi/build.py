"""Build an MM-Phi folder (model + processor + code) from components, or the tiny offline default.

    python scripts/build_model.py --vision_model wkcn/TinyCLIP-ViT-61M-32-Text-29M-LAION400M \
        --text_model microsoft/phi-2 --output_dir outputs/mmphi-base
    python scripts/build_model.py --preset tiny --output_dir outputs/mmphi-tiny
    python scripts/build_model.py --vision_model tiny --text_model outputs/pretrain --output_dir outputs/mmphi

`--vision_model tiny` is a random tiny CLIP tower; offline, `scripts/clip.py` trains a tiny CLIP whose folder
is a `--vision_model` like any CLIP checkpoint (the demo's, with `--vision_feature_select_strategy full`).
`--text_model` may be the pretrain output. The result loads with `AutoModelForCausalLM`/`AutoProcessor` and
`trust_remote_code=True`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil

import torch
from transformers import AutoConfig, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

from configuration_mmphi import TINY_VISION_CONFIG, MMPhiConfig, image_seq_length_for
from mmphi import TINY_TOKENIZER
from modeling_mmphi import MMPhiForCausalLM
from processing_mmphi import MMPhiProcessor, add_mmphi_tokens

logger = logging.getLogger(__name__)


def save_mmphi(model: MMPhiForCausalLM, processor: MMPhiProcessor, output_dir: str) -> None:
    """Save weights (safetensors), config with auto_map, processor, chat template and the code files (the model
    and processor classes write them on every save_pretrained), so the folder is complete on its own; generation
    with the KV cache."""
    os.makedirs(output_dir, exist_ok=True)
    enable_kv_cache(model)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def enable_kv_cache(model) -> None:
    """`use_cache` on in the configs and generation config that get saved: the Trainer turns it off for training
    (`TrainingArguments.use_cache`), and a folder saved that way generates without a KV cache, re-running the whole
    sequence at every new token. A PEFT model's config is its base model's."""
    config = model.config
    for part in (config, getattr(config, "text_config", None)):
        if part is not None:
            part.use_cache = True
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True


def tiny_tokenizer():
    from transformers import AutoTokenizer

    if not os.path.isdir(TINY_TOKENIZER):
        raise FileNotFoundError(f"The tiny tokenizer is missing: {TINY_TOKENIZER} (train_tokenizer.py)")
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    add_mmphi_tokens(tokenizer)
    return tokenizer


def tiny_image_processor(image_size: int = 224) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def sincos_position_embeddings(grid: int, dim: int) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position embeddings for a `grid` x `grid` patch grid, [grid * grid, dim]: half the
    dimensions encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need a dimension divisible by 4, got {dim}")
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coordinate in (rows.reshape(-1), cols.reshape(-1)):
        angles = coordinate[:, None] * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def init_tower_positions(tower, scale: float = 16.0) -> None:
    """Start a random CLIP vision tower's learned position embeddings from 2-D sin-cos (CLS: zeros), as MAE and MoCo v3
    do; `scale` 16 puts them near the tiny tower's patch embeddings (std ~20 on the synthetic images). CLIP's random
    init (std 0.02) is a thousand times smaller, so the tiny tower's patch tokens said nothing of where they lie (a
    linear probe found a patch's grid index 8-17% of the time, chance 6%) and "Where is the circle?" stayed at chance
    (BENCHMARKS.md "Tiny CLIP"). A pretrained tower (TinyCLIP) keeps its own."""
    embeddings = getattr(tower, "vision_model", tower).embeddings  # a CLIPModel or a CLIPVisionModel
    grid = embeddings.image_size // embeddings.patch_size
    with torch.no_grad():
        table = embeddings.position_embedding.weight
        table.zero_()
        table[embeddings.num_positions - grid * grid:] = scale * sincos_position_embeddings(grid, table.shape[1])


def build_tiny(seed: int = 0, **config_overrides) -> tuple[MMPhiForCausalLM, MMPhiProcessor]:
    """The tiny random-init default: tiny CLIP tower + tiny Phi + the committed tiny tokenizer."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = MMPhiConfig.tiny(image_token_index=tokenizer.convert_tokens_to_ids("<image>"), **config_overrides)
    config.text_config.pad_token_id = tokenizer.pad_token_id
    model = MMPhiForCausalLM(config)
    init_tower_positions(model.model.vision_tower)
    fit_embeddings_to_tokenizer(model, tokenizer)
    processor = MMPhiProcessor(
        image_processor=tiny_image_processor(config.vision_config.image_size),
        tokenizer=tokenizer,
        image_seq_length=config.image_seq_length,
    )
    return model, processor


def fit_embeddings_to_tokenizer(model: MMPhiForCausalLM, tokenizer) -> None:
    """Grow the embeddings if the added tokens do not fit (Phi-2's 51200 rows already leave room), and make
    generation stop at EOS and pad with the pad token."""
    if len(tokenizer) > model.config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    model.config.text_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def new_tiny_tower(seed: int = 0, **config_overrides) -> CLIPVisionModel:
    """A random tiny CLIP vision tower (TINY_VISION_CONFIG with `config_overrides`), sin-cos positions."""
    torch.manual_seed(seed)
    tower = CLIPVisionModel(CLIPVisionConfig(**dict(TINY_VISION_CONFIG, **config_overrides)))
    init_tower_positions(tower)
    return tower


def save_tiny_clip(output_dir: str, seed: int = 0) -> str:
    """A random tiny CLIP vision tower + image processor, saved like a hub checkpoint (stand-in for TinyCLIP)."""
    new_tiny_tower(seed).save_pretrained(output_dir)
    tiny_image_processor(TINY_VISION_CONFIG["image_size"]).save_pretrained(output_dir)
    return output_dir


def build_from_components(vision_model: str, text_model: str, dtype: str | torch.dtype = "auto", **config_overrides):
    strategy = config_overrides.get("vision_feature_select_strategy", "default")
    vision_config = AutoConfig.from_pretrained(vision_model)
    vision_config = getattr(vision_config, "vision_config", vision_config)  # a CLIPModel's, or a tower's own
    processor = MMPhiProcessor.from_components(vision_model, text_model,
                                               image_seq_length_for(vision_config, strategy))
    tokenizer = processor.tokenizer
    overrides = dict(image_token_index=processor.image_token_id, image_seq_length=processor.image_seq_length)
    overrides.update(config_overrides)
    model = MMPhiForCausalLM.from_components(vision_model, text_model, dtype=dtype, **overrides)
    fit_embeddings_to_tokenizer(model, tokenizer)
    return model, processor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny"], help="build the tiny random-init default")
    parser.add_argument("--vision_model", help="CLIP id or path (CLIPModel or CLIPVisionModel), or 'tiny'")
    parser.add_argument("--text_model", help="Phi id or path (PhiForCausalLM with its tokenizer)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--projector_type", choices=["linear", "mlp2x_gelu"], default="linear")
    parser.add_argument("--vision_feature_select_strategy", choices=["default", "full"], default=None,
                        help="default: drop CLS (LLaVA; the real recipe); full: keep it (default for the tiny tower, "
                             "which learns to gather the image into CLS)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="the built model's dtype; auto: the Phi checkpoint's (Phi-2: bf16), the tower follows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    tiny_tower = args.preset == "tiny" or args.vision_model == "tiny"
    strategy = args.vision_feature_select_strategy or (
        MMPhiConfig.tiny().vision_feature_select_strategy if tiny_tower else "default"
    )
    if args.preset == "tiny":
        model, processor = build_tiny(seed=args.seed, projector_type=args.projector_type,
                                      vision_feature_select_strategy=strategy)
    elif args.vision_model and args.text_model:
        from mmphi.loading import check_model_path

        for path in {args.vision_model, args.text_model} - {"tiny"}:
            check_model_path(path)
        vision_model = args.vision_model
        if vision_model == "tiny":
            vision_model = save_tiny_clip(os.path.join(args.output_dir, "_tiny_clip"), seed=args.seed)
        torch.manual_seed(args.seed)
        dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
        model, processor = build_from_components(vision_model, args.text_model, dtype,
                                                 projector_type=args.projector_type,
                                                 vision_feature_select_strategy=strategy)
        if args.vision_model == "tiny":
            shutil.rmtree(vision_model)
    else:
        parser.error("give --preset tiny, or both --vision_model and --text_model")
    save_mmphi(model, processor, args.output_dir)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("saved MM-Phi (%.2fM parameters) to %s", n_params / 1e6, args.output_dir)


if __name__ == "__main__":
    from mmphi.errors import run_command

    run_command(main)

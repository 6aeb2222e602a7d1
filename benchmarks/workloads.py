"""Benchmark workloads: each stage's own `build_trainer` (its argument dataclasses, data path, model loading,
freezing, LoRA and collator) on data files written for the benchmark, with random weights; nothing from the Hub.

- pretrain: a JSONL corpus of random words, packed into `seq`-token blocks; Phi-2 (real) or the tiny preset.
- projector: COCO captions of random words (cut at `max_length = seq`) on COCO-sized JPEGs, tower features cached
  (the recipe's `--cache_vision_features`).
- instruct: LLaVA conversations with long answers (cut at `max_length = seq`) on COCO-sized JPEGs decoded by the
  collator every step; 4-bit language model + LoRA + projector through the stage's SFTTrainer.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from benchmarks.flops import attention_flops_per_token, linear_weights, vision_forward_flops_per_image
from benchmarks.measure import Workload, free_memory
from configuration_mmphi import PHI2_TEXT_CONFIG, TINY_TEXT_CONFIG, TINY_VISION_CONFIG, TINYCLIP_VISION_CONFIG

# Micro-batch and tokens per sample (every sample cut at `seq`) of each stage, and the LoRA rank of instruct: `tiny`
# runs in seconds on a CPU; `real` is the goals' shapes (Phi-2 2.7B at block 2048, micro-batch 4; instruct QLoRA r=64
# at max_length 2048).
SIZES = {
    "tiny": {"pretrain": dict(batch=8, seq=128), "projector": dict(batch=8, seq=80),
             "instruct": dict(batch=4, seq=128, lora_r=16)},
    "real": {"pretrain": dict(batch=4, seq=2048), "projector": dict(batch=32, seq=128),
             "instruct": dict(batch=4, seq=2048, lora_r=64)},
}


def training_flags(device: str, batch: int, max_steps: int, output_dir: str) -> list[str]:
    """What every measured Trainer run shares, on top of the stage's own defaults."""
    return ["--output_dir", output_dir, "--per_device_train_batch_size", str(batch),
            "--gradient_accumulation_steps", "1", "--max_steps", str(max_steps), "--eval_strategy", "no",
            "--save_strategy", "no", "--report_to", "none", "--logging_steps", "10", "--disable_tqdm", "true",
            "--use_cpu", str(device == "cpu").lower(), "--seed", "0",
            "--dataloader_num_workers", "0" if device == "cpu" else "4", "--warmup_steps", "0"]


def random_text(words: int, generator: torch.Generator) -> str:
    """Random lowercase words: text the tokenizer splits into roughly one or more tokens per word."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    lengths = torch.randint(2, 8, (words,), generator=generator).tolist()
    picks = torch.randint(0, len(letters), (sum(lengths),), generator=generator).tolist()
    out, position = [], 0
    for length in lengths:
        out.append("".join(letters[i] for i in picks[position: position + length]))
        position += length
    return " ".join(out)


def write_images(folder: str, count: int, generator: torch.Generator) -> list[str]:
    """COCO-sized (640 x 480) smooth random JPEGs: the collator decodes and preprocesses them every step."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for index in range(count):
        small = torch.randint(0, 256, (12, 16, 3), generator=generator, dtype=torch.uint8).numpy()
        image = Image.fromarray(np.asarray(small)).resize((640, 480), Image.BILINEAR)
        path = os.path.join(folder, f"{index:04d}.jpg")
        image.save(path, quality=90)
        paths.append(path)
    return paths


def build_random_mmphi(size: str, folder: str, device: str) -> str:
    """A random-init MM-Phi saved with its processor, as scripts/build_model.py saves one (TinyCLIP + Phi-2 shapes, or
    the tiny default), with the tiny tokenizer (the token ids are what matters, not their meaning)."""
    from transformers import CLIPVisionConfig, PhiConfig

    from configuration_mmphi import MMPhiConfig
    from mmphi.build import save_mmphi, tiny_image_processor, tiny_tokenizer
    from modeling_mmphi import MMPhiForCausalLM
    from processing_mmphi import MMPhiProcessor

    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    tokenizer = tiny_tokenizer()
    vision = TINYCLIP_VISION_CONFIG if size == "real" else TINY_VISION_CONFIG
    config = MMPhiConfig(vision_config=CLIPVisionConfig(**vision),
                         text_config=PhiConfig(**(PHI2_TEXT_CONFIG if size == "real" else TINY_TEXT_CONFIG)),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda" if device == "cuda" else "cpu"):
        model = MMPhiForCausalLM(config)
    if device == "cuda":
        model = model.to(torch.bfloat16)  # what a pretrained checkpoint holds; the stages cast what they train
    processor = MMPhiProcessor(image_processor=tiny_image_processor(vision["image_size"]), tokenizer=tokenizer,
                               image_seq_length=config.image_seq_length)
    partial = folder + ".partial"  # renamed when complete: a run killed mid-save leaves no half folder behind
    save_mmphi(model, processor, partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    del model
    free_memory(device)
    return folder


def write_json(path: str, payload) -> str:
    with open(path, "w") as handle:
        json.dump(payload, handle)
    return path


def check_full_length(stage, seq: int) -> None:
    """Every sample must be cut at exactly `seq` tokens: the sizes (and the goals) are stated at that length, and a
    shorter text would quietly measure a smaller workload."""
    short = [n for n in stage.train.lengths if n != seq]
    if short:
        raise ValueError(f"{len(short)} benchmark sample(s) shorter than seq={seq} (e.g. {short[0]}): write longer "
                         "texts")


# ---------------------------------------------------------------------------------------------------- the stages


def pretrain_workload(size: str, device: str, generator: torch.Generator, work_dir: str,
                      extra_flags: tuple[str, ...] = ()) -> Workload:
    from mmphi.stages import pretrain

    batch, seq = SIZES[size]["pretrain"]["batch"], SIZES[size]["pretrain"]["seq"]
    os.makedirs(work_dir, exist_ok=True)
    corpus = os.path.join(work_dir, "corpus.jsonl")
    with open(corpus, "w") as handle:  # 2 x batch blocks of documents, so the packed train split fills a batch
        for _ in range(2 * batch):
            handle.write(json.dumps({"text": random_text(seq, generator)}) + "\n")

    def build_trainer(output_dir: str, max_steps: int):
        flags = ["--config_name", "phi-2" if size == "real" else "tiny", "--train_files", corpus,
                 "--block_size", str(seq), "--validation_split_percentage", "0",
                 "--data_cache_dir", os.path.join(work_dir, "cache"), *training_flags(device, batch, max_steps,
                                                                                      output_dir), *extra_flags]
        return pretrain.build_trainer(*pretrain.parse_args(flags)).trainer

    def flops_per_sample(model, tokens: int) -> float:
        return tokens * (6.0 * linear_weights(model) + attention_flops_per_token(model.config, tokens))

    return Workload("pretrain", seq, batch, build_trainer, flops_per_sample)


def caption_data(folder: str, images: list[str], seq: int, generator: torch.Generator) -> str:
    """COCO captions, one per image, long enough to be cut at `seq` tokens."""
    return write_json(os.path.join(folder, "captions.json"), {
        "images": [{"id": i, "file_name": os.path.basename(path)} for i, path in enumerate(images)],
        "annotations": [{"id": i, "image_id": i, "caption": random_text(seq, generator)} for i in range(len(images))],
    })


def multimodal_trainer(stage_module, write_data, model_folder: str, work_dir: str, device: str, batch: int,
                       seq: int, generator: torch.Generator, *stage_flags: str, extra_flags: tuple[str, ...] = ()):
    """`build_trainer(output_dir, max_steps)` for projector or instruct: `batch` images and their records
    (`write_data`), read by the stage's own build_trainer with every sample cut at `seq` tokens."""
    image_folder = os.path.join(work_dir, "images")
    data_path = write_data(work_dir, write_images(image_folder, batch, generator), seq, generator)

    def build_trainer(output_dir: str, max_steps: int):
        flags = ["--model_name_or_path", model_folder, "--data_path", data_path, "--image_folder", image_folder,
                 "--val_fraction", "0", "--max_length", str(seq), *stage_flags,
                 *training_flags(device, batch, max_steps, output_dir), *extra_flags]
        stage = stage_module.build_trainer(*stage_module.parse_args(flags))
        check_full_length(stage, seq)
        return stage.trainer

    return build_trainer


def projector_workload(size: str, device: str, generator: torch.Generator, model_folder: str,
                       work_dir: str, extra_flags: tuple[str, ...] = ()) -> Workload:
    from mmphi.stages import projector

    batch, seq = SIZES[size]["projector"]["batch"], SIZES[size]["projector"]["seq"]
    build_trainer = multimodal_trainer(projector, caption_data, model_folder, work_dir, device, batch, seq, generator,
                                       "--cache_vision_features", "--feature_cache_dir",
                                       os.path.join(work_dir, "features"), extra_flags=extra_flags)

    def flops_per_sample(model, tokens: int) -> float:
        language = model.model.language_model
        per_token = 4.0 * (linear_weights(language) + linear_weights(model.lm_head)) + attention_flops_per_token(
            model.config.text_config, tokens)
        projector_flops = 6.0 * linear_weights(model.model.multi_modal_projector) * model.config.image_seq_length
        return tokens * per_token + projector_flops

    return Workload("projector", seq, batch, build_trainer, flops_per_sample,
                    notes="cached tower features (the recipe's --cache_vision_features)")


def conversation_data(folder: str, images: list[str], seq: int, generator: torch.Generator) -> str:
    """LLaVA records, one per image: a question and an answer long enough to be cut at `seq` tokens."""
    return write_json(os.path.join(folder, "llava.json"), [
        {"id": str(i), "image": os.path.basename(path),
         "conversations": [{"from": "human", "value": "<image>\nDescribe the picture."},
                           {"from": "gpt", "value": random_text(seq, generator)}]}
        for i, path in enumerate(images)
    ])


def instruct_workload(size: str, device: str, generator: torch.Generator, model_folder: str,
                      work_dir: str, extra_flags: tuple[str, ...] = ()) -> Workload:
    from mmphi.stages import instruct

    settings = SIZES[size]["instruct"]
    batch, seq = settings["batch"], settings["seq"]
    build_trainer = multimodal_trainer(instruct, conversation_data, model_folder, work_dir, device, batch, seq,
                                       generator, "--lora_r", str(settings["lora_r"]), extra_flags=extra_flags)

    def flops_per_sample(model, tokens: int) -> float:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        text, vision = base.config.text_config, base.config.vision_config
        language = base.model.language_model
        frozen = linear_weights(language, trainable=False) + linear_weights(base.lm_head)
        lora = linear_weights(language, trainable=True)
        per_token = 4.0 * frozen + 6.0 * lora + attention_flops_per_token(text, tokens)
        projector_flops = 6.0 * linear_weights(base.model.multi_modal_projector) * base.config.image_seq_length
        return tokens * per_token + projector_flops + vision_forward_flops_per_image(vision, base.model.vision_tower)

    return Workload("instruct", seq, batch, build_trainer, flops_per_sample,
                    notes=f"4-bit LM + LoRA r={settings['lora_r']}; images decoded from JPEG each step")


def make_workload(stage: str, size: str, device: str, generator: torch.Generator, work_dir: str,
                  model_dir: str | None = None, extra_flags: tuple[str, ...] = ()) -> Workload:
    """`extra_flags`: stage flags on top of the measured defaults (a speed variant: `--use_liger_kernel true`,
    `--torch_compile true`, `--attn_implementation flash_attention_2`, `--gradient_checkpointing false`, ...)."""
    stage_dir = os.path.join(work_dir, f"{stage}-data")
    os.makedirs(stage_dir, exist_ok=True)
    if stage == "pretrain":
        return pretrain_workload(size, device, generator, stage_dir, extra_flags)
    model_folder = build_random_mmphi(size, model_dir or os.path.join(work_dir, f"mmphi-{size}"), device)
    if stage == "projector":
        return projector_workload(size, device, generator, model_folder, stage_dir, extra_flags)
    return instruct_workload(size, device, generator, model_folder, stage_dir, extra_flags)

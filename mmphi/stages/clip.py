"""The clip stage: a tiny CLIP, the offline stand-in for TinyCLIP, trained with CLIP's own contrastive loss on
COCO-format captions.

No pretrained CLIP can be downloaded offline, and a random tower learns too slowly through the projector stage's
caption loss: after 600 steps its features still held no count (a linear probe: 48% on held-out images, chance
25%), and the captions named the count 28% of the time. A tiny CLIPModel (the tiny MM-Phi tower + a tiny text
encoder) trained contrastively on the same captions, as CLIP itself was trained, learns count, size, shape and colour
in a few hundred steps (BENCHMARKS.md "Tiny CLIP"). MM-Phi is then built from it exactly as the real recipe builds
from TinyCLIP, and the projector stage keeps the tower frozen:

    python scripts/clip.py --config recipes/tiny/clip.yaml --data_path data/synthetic/captions_train.json \
        --image_folder data/synthetic/images --output_dir outputs/clip
    python scripts/build_model.py --vision_model outputs/clip --text_model outputs/pretrain \
        --vision_feature_select_strategy full --output_dir outputs/mmphi-base

`--model_name_or_path` continues from a CLIP checkpoint instead (its tokenizer and image processor come with it),
e.g. to adapt TinyCLIP to a domain. Each training image is one sample per epoch, paired with one of its captions
drawn at random (two captions of one image in a batch would be false negatives). Validation is split by image. Every
`TrainingArguments` flag works. The output folder is a CLIPModel checkpoint with its processor (tokenizer and image
processor).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, Trainer, set_seed

from configuration_mmphi import TINY_VISION_CONFIG
from mmphi.build import init_tower_positions, tiny_image_processor, tiny_tokenizer
from mmphi.data import (
    CaptionedImage,
    SkipReport,
    captioned_images,
    load_image,
    read_source,
    split_by_image,
    validate_data,
)
from mmphi.errors import BadRecordError, handle_bad_record
from mmphi.stages.arguments import DataSourceArguments
from mmphi.training import BuiltStage, FSDPOnCPUMixin, Stage, StageTrainingArguments

logger = logging.getLogger(__name__)

# The text half of the tiny CLIP (the vision half is MM-Phi's TINY_VISION_CONFIG); 77 positions as in CLIP.
TINY_CLIP_TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=77)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "a CLIP checkpoint to continue from; default: a new tiny CLIP (tiny tokenizer)"}
    )


@dataclass
class DataArguments(DataSourceArguments):
    """Captions: COCO captions, or LLaVA-Pretrain-style one-turn records (any registered format), from a file or a
    dataset."""

    val_fraction: float = field(default=0.02, metadata={"help": "fraction of images held out (split by image)"})
    skip_bad_records: bool = field(
        default=False, metadata={"help": "skip bad records/images (counted and reported) instead of failing"}
    )
    validate_data: bool = field(default=False, metadata={"help": "scan the data (records + images) and exit"})
    cache_pixels: bool = field(
        default=False,
        metadata={"help": "keep each image's processed pixels in memory after its first epoch (0.6 MB an image at "
                          "224 px: 1.6 GB for the demo's 2,700 images, ~70 GB for COCO's 118K, so off by default). "
                          "The image processor is about half of the tiny CLIP's step on a 2-core CPU. Each process and "
                          "dataloader worker keeps its own cache (with workers, add --dataloader_persistent_workers "
                          "so they keep it across epochs)"},
    )


@dataclass
class ClipTrainingArguments(StageTrainingArguments):
    """Contrastive defaults: every sample of a batch is a negative for the others, so no gradient accumulation
    (it would shrink the batch the loss sees) and a large batch; AdamW with CLIP's weight decay."""

    output_dir: str = field(default="outputs/clip")
    optim: str = field(default="adamw_torch")
    gradient_accumulation_steps: int = field(default=1)
    gradient_checkpointing: bool = field(default=False)
    per_device_train_batch_size: int = field(default=64)
    learning_rate: float = field(default=1e-3)
    weight_decay: float = field(default=0.1)
    remove_unused_columns: bool = field(default=False)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """One item per image: its pixels and one of its captions, drawn at random each time the image is served. A bad
    image raises an error naming its record, or with `skip_bad_records` is counted and the next image served (a
    contrastive batch wants its full size). With `cache_pixels` an image is decoded and processed once, then served
    from memory; each process and dataloader worker keeps its own copy of what it served."""

    def __init__(self, images: list[CaptionedImage], image_processor, skip_bad_records: bool = False,
                 cache_pixels: bool = False):
        self.images = images
        self.image_processor = image_processor
        self.skip_bad_records = skip_bad_records
        self.skipped = SkipReport()
        self.pixel_cache: dict[int, torch.Tensor] | None = {} if cache_pixels else None

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self, position: int) -> torch.Tensor:
        if self.pixel_cache is not None and position in self.pixel_cache:
            return self.pixel_cache[position]
        image = self.images[position]
        pixels = self.image_processor([load_image(image.image)], return_tensors="pt")["pixel_values"][0]
        if self.pixel_cache is not None:
            self.pixel_cache[position] = pixels
        return pixels

    def __getitem__(self, index: int) -> dict:
        for attempt in range(min(len(self), 100)):
            position = (index + attempt) % len(self)
            image = self.images[position]
            try:
                return {"pixel_values": self.pixels(position), "caption": random.choice(image.captions)}
            except BadRecordError as error:
                handle_bad_record(image.location, error, self.skip_bad_records, self.skipped, logger)
        raise BadRecordError(f"{min(len(self), 100)} consecutive images failed to load: {self.skipped.summary()}")


@dataclass
class ClipCollator:
    """Captions -> `input_ids` ending in EOS (CLIP's text embedding is read at the first EOS, so truncation keeps it)
    + `attention_mask`; stacked `pixel_values`; `return_loss` so the model (and the Trainer's evaluation) gives the
    contrastive loss."""

    tokenizer: object
    max_length: int

    def __call__(self, items: list[dict]) -> dict:
        eos = self.tokenizer.eos_token_id
        ids = []
        for item in items:  # CLIP's tokenizer adds BOS/EOS itself (truncation keeps them); Phi's adds none
            sequence = self.tokenizer(item["caption"], truncation=True, max_length=self.max_length)["input_ids"]
            ids.append(sequence if sequence[-1] == eos else sequence[: self.max_length - 1] + [eos])
        longest = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        input_ids = torch.full((len(ids), longest), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, sequence in enumerate(ids):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        pixel_values = torch.stack([item["pixel_values"] for item in items])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                "return_loss": True}


def new_tiny_clip(seed: int) -> tuple[CLIPModel, CLIPProcessor]:
    """A random tiny CLIP whose vision half is MM-Phi's tiny tower, with the tiny tokenizer."""
    tokenizer = tiny_tokenizer()
    text_config = dict(TINY_CLIP_TEXT_CONFIG, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config=text_config, vision_config=TINY_VISION_CONFIG,
                        projection_dim=TINY_VISION_CONFIG["projection_dim"])
    torch.manual_seed(seed)
    model = CLIPModel(config)
    init_tower_positions(model)
    return model, CLIPProcessor(image_processor=tiny_image_processor(TINY_VISION_CONFIG["image_size"]),
                                tokenizer=tokenizer)


def load_clip(model_args: ModelArguments, seed: int) -> tuple[CLIPModel, CLIPProcessor]:
    if model_args.model_name_or_path is None:
        return new_tiny_clip(seed)
    path = model_args.model_name_or_path
    return CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)


class ClipTrainer(FSDPOnCPUMixin, Trainer):
    """HF's Trainer, which shards under an FSDP launch on CPU too (`FSDPOnCPUMixin`)."""


def build_trainer(model_args: ModelArguments, data_args: DataArguments, training_args) -> BuiltStage:
    """The contrastive Trainer with its data: one sample per image and epoch, held out by image."""
    set_seed(training_args.seed)
    model, processor = load_clip(model_args, training_args.seed)
    image_processor = processor.image_processor
    report = SkipReport()
    source = data_args.source
    captions = read_source(source, data_args.image_folder, data_args.skip_bad_records, report,
                           data_format=data_args.data_format)
    train_images, eval_images = split_by_image(captioned_images(captions), data_args.val_fraction, training_args.seed)
    if len(train_images) < 2:
        raise ValueError(f"{source.label}: {len(train_images)} training image(s); the contrastive loss needs "
                         "at least 2 per batch")
    train = ImageCaptionDataset(train_images, image_processor, data_args.skip_bad_records, data_args.cache_pixels)
    evaluation = (ImageCaptionDataset(eval_images, image_processor, data_args.skip_bad_records, data_args.cache_pixels)
                  if eval_images else None)
    if evaluation is None:
        training_args.eval_strategy = "no"
    workers = training_args.dataloader_num_workers
    if data_args.cache_pixels and workers and not training_args.dataloader_persistent_workers:
        logger.warning("--cache_pixels with %d dataloader workers that are not persistent: each worker's cache is "
                       "dropped at the end of every epoch, so nothing is served from it (add "
                       "--dataloader_persistent_workers true)", workers)
    logger.info("%d training images, %d held out; %.2fM parameters", len(train), len(eval_images),
                sum(p.numel() for p in model.parameters()) / 1e6)
    collator = ClipCollator(processor.tokenizer, model.config.text_config.max_position_embeddings)
    trainer = ClipTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                          data_collator=collator, processing_class=processor)
    reports = [report, train.skipped] + ([evaluation.skipped] if evaluation else [])
    return BuiltStage(trainer, model, processor, collator, train, evaluation, reports)


STAGE = Stage("clip", (ModelArguments, DataArguments, ClipTrainingArguments), build_trainer, validate_data)
parse_args = STAGE.parse_args
main = STAGE.main

if __name__ == "__main__":
    from mmphi.errors import run_command

    run_command(main)

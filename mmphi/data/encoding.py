"""Encoding and batching for the projector and instruct stages (one path: the projector's Trainer and instruct's
SFTTrainer get the same dataset and the same collator).

- `encode_conversations(conversations, processor, max_length)` -> `EncodedSamples`: a `datasets.Dataset` (columns
  `input_ids`, `labels`, `length`, `image`, `location`) tokenised with `Dataset.map` (progress bar; `num_proc`)
  through the processor's chat template. `<image>` is expanded to the image tokens; labels are -100 everywhere except
  the answer tokens and the EOS that ends each answer (the template's `{% generation %}` blocks); samples longer than
  `max_length` are cut after the image, or dropped when the image would be cut or no answer token is left (counted in
  `truncation`).
- `MMPhiDataCollator(processor, vision_features=None, skip_bad_records=False)`: loads each row's image (in the
  DataLoader workers) or its cached tower features, right-pads with the pad token (never EOS), labels -100 on
  padding; an image that fails to load raises an error naming the record, or with `skip_bad_records` drops the
  sample (counted in `collator.skipped`). Counts real and padding tokens, training and evaluation batches apart;
  a batch collated in a DataLoader worker carries its counts back (`CollatedCounts`, added by the stages' Trainer
  mixin), and `gather_collator_counts` sums them over the processes of a distributed run.
- `build_datasets(model, processor, data_args, training_args, train, eval, max_length)`: both stages' entry point:
  the feature cache when asked (`--cache_vision_features`), the encoded samples and the collator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import torch

from mmphi.data.features import VisionFeatureStore, cache_vision_features
from mmphi.data.images import load_image
from mmphi.data.records import Conversation, Turn
from mmphi.errors import BadRecordError, SkipReport, handle_bad_record

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
KEEP, DROP_IMAGE_CUT, DROP_NO_ANSWER = 0, 1, 2
ENCODING_VERSION = "1"  # part of the cache key: bump when `_encode_rows` changes what it writes


# ---------------------------------------------------------------------------------------------------------- tokens


@dataclass
class TruncationReport:
    """Samples longer than max_length: cut after the image, or dropped (image would be cut / no answer left)."""

    truncated: int = 0
    dropped_image_cut: int = 0
    dropped_no_answer: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_image_cut + self.dropped_no_answer

    def summary(self) -> str:
        return (f"{self.truncated} sample(s) truncated to max_length; dropped {self.dropped_image_cut} whose image "
                f"tokens would be cut and {self.dropped_no_answer} with no answer token left")


def encode_messages(processor, batch: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """Chat messages -> (input_ids, labels) per conversation, through the processor's chat template. Labels keep the
    tokens of the template's `{% generation %}` blocks (each answer and its EOS) and are -100 elsewhere; each image
    token is expanded to `image_seq_length` (the same ids `processor(text=..., images=...)` gives)."""
    tokenizer = processor.tokenizer
    encoded = tokenizer.apply_chat_template(
        batch, chat_template=processor.chat_template, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True,
    )
    image_token_id, n_image = processor.image_token_id, processor.image_seq_length
    results = []
    for ids, mask in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True):
        input_ids, labels = [], []
        for token, is_answer in zip(ids, mask, strict=True):
            repeat = n_image if token == image_token_id else 1
            input_ids += [token] * repeat
            labels += [token if is_answer else IGNORE_INDEX] * repeat
        results.append((input_ids, labels))
    return results


def encode_conversation(processor, conversation: Conversation) -> tuple[list[int], list[int]]:
    return encode_messages(processor, [conversation.messages()])[0]


def truncate(input_ids: list[int], labels: list[int], max_length: int | None, image_token_id: int):
    """(input_ids, labels, verdict): cut to max_length without cutting image tokens; the verdict says whether the
    sample is kept (KEEP) or must be dropped (DROP_IMAGE_CUT, DROP_NO_ANSWER)."""
    if max_length is None or len(input_ids) <= max_length:
        return input_ids, labels, KEEP
    image_positions = [i for i, token in enumerate(input_ids) if token == image_token_id]
    if image_positions and image_positions[-1] >= max_length:
        return input_ids, labels, DROP_IMAGE_CUT
    labels = labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return input_ids, labels, DROP_NO_ANSWER
    return input_ids[:max_length], labels, KEEP


@dataclass
class EncodedSamples:
    """The tokenised samples (a `datasets.Dataset`, what both Trainers take) and what truncation did to them."""

    dataset: datasets.Dataset
    truncation: TruncationReport

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def lengths(self) -> list[int]:
        return sample_lengths(self.dataset)


def _as_rows(conversations: Sequence[Conversation]) -> dict[str, list]:
    return {
        "id": [c.id for c in conversations],
        "image": [c.image for c in conversations],
        "location": [c.location for c in conversations],
        "questions": [[t.question for t in c.turns] for c in conversations],
        "answers": [[t.answer for t in c.turns] for c in conversations],
    }


def _encode_rows(batch: dict, processor, max_length: int | None) -> dict:
    conversations = [
        Conversation(id_, image, [Turn(q, a) for q, a in zip(questions, answers, strict=True)])
        for id_, image, questions, answers in zip(batch["id"], batch["image"], batch["questions"], batch["answers"],
                                                  strict=True)
    ]
    encoded = encode_messages(processor, [c.messages() for c in conversations])
    columns = {"input_ids": [], "labels": [], "length": [], "verdict": [], "cut": []}
    for ids, labels in encoded:
        kept_ids, kept_labels, verdict = truncate(ids, labels, max_length, processor.image_token_id)
        columns["input_ids"].append(kept_ids)
        columns["labels"].append(kept_labels)
        columns["length"].append(len(kept_ids))
        columns["verdict"].append(verdict)
        columns["cut"].append(verdict == KEEP and len(kept_ids) < len(ids))
    return columns


def encoding_fingerprint(rows: dict, processor, max_length: int | None) -> str:
    """What the tokenised samples depend on: the records, the chat template, the tokenizer and max_length (the
    processor object itself does not hash stably across processes)."""
    digest = hashlib.sha256()
    for column in sorted(rows):  # value by value: LLaVA-Instruct-150K never becomes one 200 MB string
        digest.update(f"\x00{column}\x00".encode())
        for value in rows[column]:
            digest.update(json.dumps(value).encode() + b"\x01")
    tokenizer = processor.tokenizer
    vocabulary = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else \
        json.dumps(sorted(tokenizer.get_vocab().items()))
    for part in (ENCODING_VERSION, processor.chat_template or "", vocabulary, str(max_length),
                 str(processor.image_seq_length)):
        digest.update(hashlib.sha256(part.encode()).digest())
    return digest.hexdigest()[:24]


def encoded_cache_file(fingerprint: str) -> str:
    """Where `Dataset.map` keeps the tokenised samples: in datasets' cache (HF_DATASETS_CACHE), keyed by content, so
    a re-run or another DDP process (after the main one, `main_process_first`) loads them instead of tokenising."""
    folder = os.path.join(datasets.config.HF_DATASETS_CACHE, "mmphi-encoded")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"encoded-{fingerprint}.arrow")


def encode_conversations(conversations: Sequence[Conversation], processor, max_length: int | None = None,
                         num_proc: int | None = None, desc: str = "tokenising") -> EncodedSamples:
    """Tokenise `conversations` with `Dataset.map` (batched, `num_proc` processes, a progress bar, cached by
    content); drop (and count) the samples that do not fit `max_length`."""
    columns = _as_rows(conversations)
    fingerprint = encoding_fingerprint(columns, processor, max_length)
    rows = datasets.Dataset.from_dict(columns)
    encoded = rows.map(_encode_rows, batched=True, batch_size=256, num_proc=num_proc, desc=desc,
                       fn_kwargs=dict(processor=processor, max_length=max_length),
                       remove_columns=["questions", "answers"], new_fingerprint=fingerprint,
                       cache_file_name=encoded_cache_file(fingerprint))
    verdicts, cut = column_values(encoded, "verdict"), column_values(encoded, "cut")
    report = TruncationReport(truncated=sum(cut), dropped_image_cut=verdicts.count(DROP_IMAGE_CUT),
                              dropped_no_answer=verdicts.count(DROP_NO_ANSWER))
    if report.dropped:
        encoded = encoded.select([i for i, verdict in enumerate(verdicts) if verdict == KEEP])
    encoded = encoded.remove_columns(["verdict", "cut"])
    if report.truncated or report.dropped:
        logger.warning("max_length=%s: %s", max_length, report.summary())
    if conversations and not len(encoded):
        raise ValueError(f"no sample fits max_length={max_length}: {report.summary()}")
    return EncodedSamples(encoded, report)


def encode_train_eval(train: Sequence[Conversation], evaluation: Sequence[Conversation], processor,
                      max_length: int | None, num_proc: int | None = None):
    """(train samples, eval samples or None when there is no held-out data): the split of projector and instruct,
    encoded."""
    encode = dict(max_length=max_length, num_proc=num_proc)
    encoded_train = encode_conversations(train, processor, desc="tokenising training samples", **encode)
    encoded_eval = encode_conversations(evaluation, processor, desc="tokenising eval samples", **encode) \
        if evaluation else None
    return encoded_train, encoded_eval


def build_datasets(model, processor, data_args, training_args, train_records: Sequence[Conversation],
                   eval_records: Sequence[Conversation], max_length: int | None):
    """(train, eval, collator) of projector and instruct: the tokenised samples and the collator that loads their
    images or, with `--cache_vision_features` (the tower is frozen in both stages), the tower's cached features. A
    cache folder that already covers the images with the same tower (the projector stage's, given to instruct) is
    reused."""
    store = None
    if data_args.cache_vision_features:
        images = [c.image for c in [*train_records, *eval_records] if c.image is not None]
        start = time.perf_counter()
        store = cache_vision_features(model, processor, images, data_args.feature_cache_dir,
                                      batch_size=data_args.feature_cache_batch_size,
                                      shard_size=data_args.feature_cache_shard_size, device=training_args.device,
                                      num_workers=training_args.dataloader_num_workers)
        logger.info("vision features ready in %.1f s (%s)", time.perf_counter() - start, store.directory)
    with training_args.main_process_first(desc="tokenising"):  # the others then load the main process's cache
        train, evaluation = encode_train_eval(train_records, eval_records, processor, max_length,
                                              data_args.preprocessing_num_workers)
    collator = MMPhiDataCollator(processor, vision_features=store, skip_bad_records=data_args.skip_bad_records)
    return train, evaluation, collator


# ---------------------------------------------------------------------------------------------------------- batches


def column_values(dataset: datasets.Dataset, column: str) -> list:
    """A column's values read through arrow in one go: iterating or indexing a `datasets` column decodes it one row at
    a time (49 s for three columns of COCO's 591K captions, on every process; minutes for per-sample indexing)."""
    return dataset.with_format("arrow")[column].to_pylist()


def sample_lengths(dataset: datasets.Dataset) -> list[int]:
    """Every sample's token count (the `length` column), for the length-grouped sampler and the padding report."""
    return column_values(dataset, "length")


COLLATED_COUNTS = "collated_counts"  # the batch key the counts travel under; popped before the model sees the batch


@dataclass
class CollatedCounts:
    """What collating one batch counted: its real and padding tokens and the samples it skipped. A DataLoader worker
    collates in its own process, whose collator is a copy; the batch brings these back to the trainer's."""

    split: str
    real: int
    padding: int
    skipped: SkipReport


class MMPhiDataCollator:
    """Rows of `encode_conversations` -> a batch. Loads each row's image (or its cached features), right-pads
    `input_ids` with the pad token (never EOS, which the model must learn to emit), sets `attention_mask`, pads
    `labels` with -100, and concatenates the image tensors of the samples that have one, in sample order (the model
    fills the image tokens in that order). Rows that already carry `pixel_values` / `vision_features` keep them."""

    def __init__(self, processor=None, pad_token_id: int | None = None, pad_to_multiple_of: int | None = None,
                 max_length: int | None = None, vision_features: VisionFeatureStore | None = None,
                 skip_bad_records: bool = False):
        tokenizer = processor.tokenizer if processor is not None else None
        self.processor = processor
        self.pad_token_id = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: build the processor with MMPhiProcessor.from_components")
        if tokenizer is not None and self.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("the pad token must differ from EOS (the model must learn to emit EOS)")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length
        self.vision_features = vision_features
        self.skip_bad_records = skip_bad_records
        self.skipped = SkipReport()
        self.evaluating = False  # set by mmphi.training.MMPhiTrainerMixin.evaluate: its batches are counted apart
        self.token_counts = {"train": [0, 0], "eval": [0, 0]}  # [real, padding]
        # the latest sample that loaded, per split: stands in for a batch of bad ones (skip_bad_records)
        self.last_good = {"train": None, "eval": None}

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        skipped = SkipReport()
        features = [feature for feature in (self._feature(row, skipped) for row in rows) if feature is not None]
        self.skipped.merge(skipped)
        split = "eval" if self.evaluating else "train"
        if features:
            self.last_good[split] = features[-1]
        elif self.last_good[split] is not None:  # skipped, every one: a step cannot be left out (DDP's all-reduce)
            logger.warning("every sample of a batch failed to load; using the previous good sample again in its "
                           "place: %s", skipped.summary())
            features = [self.last_good[split]]
        else:
            raise BadRecordError(f"every sample of a batch failed to load, and no good one came before it to "
                                 f"stand in for them: {skipped.summary()}")
        batch = self._pad(features)
        real = int(batch["attention_mask"].sum())
        counts = CollatedCounts(split, real, batch["attention_mask"].numel() - real, skipped)
        self.add_counts(counts, skipped_merged=True)
        if torch.utils.data.get_worker_info() is not None:  # a worker's copy: the trainer's collator adds them
            batch[COLLATED_COUNTS] = counts
        return batch

    def add_counts(self, counts: CollatedCounts, skipped_merged: bool = False) -> None:
        """Count a collated batch's tokens (and, unless already merged, its skipped samples)."""
        self.token_counts[counts.split][0] += counts.real
        self.token_counts[counts.split][1] += counts.padding
        if not skipped_merged:
            self.skipped.merge(counts.skipped)

    def _feature(self, row: dict, skipped: SkipReport) -> dict | None:
        """A row with its image loaded (`pixel_values` [1, 3, H, W] or `vision_features` [1, seq, hidden]), or None
        when the image is bad and `skip_bad_records` is on."""
        feature = {"input_ids": row["input_ids"], "labels": row["labels"]}
        for key in ("pixel_values", "vision_features"):
            if row.get(key) is not None:
                feature[key] = row[key]
        image = row.get("image")
        if image is None or "pixel_values" in feature or "vision_features" in feature:  # nothing to load
            return feature
        try:
            if self.vision_features is not None:
                feature["vision_features"] = self.vision_features.get(image)
            else:
                pixels = self.processor.image_processor([load_image(image)], return_tensors="pt")["pixel_values"]
                feature["pixel_values"] = pixels
        except BadRecordError as error:
            handle_bad_record(row.get("location", image), error, self.skip_bad_records, skipped, logger)
            return None
        return feature

    def _pad(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.max_length is not None and longest > self.max_length:
            raise ValueError(f"a sample has {longest} tokens > max_length={self.max_length}; truncate in the dataset")
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(features)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"])
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.as_tensor(feature["labels"])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key, single_dims in (("pixel_values", 3), ("vision_features", 2)):  # [3, H, W] / [seq, hidden]
            tensors = [torch.as_tensor(f[key]) for f in features if f.get(key) is not None]
            if tensors:
                batch[key] = torch.cat([t.unsqueeze(0) if t.dim() == single_dims else t for t in tensors])
        if "pixel_values" in batch and "vision_features" in batch:
            raise ValueError("a batch mixes pixel_values and cached vision_features; use one kind per dataset")
        return batch

    @property
    def padding_fraction(self) -> float:
        """Padding tokens / all tokens of the training batches so far."""
        real, padding = self.token_counts["train"]
        return padding / (real + padding) if real + padding else 0.0


def padding_fraction(lengths: Sequence[int], batch_size: int, indices: Sequence[int] | None = None) -> float:
    """Fraction of padding tokens when samples are batched in `indices` order (default: as given), right-padded to
    the longest in each batch."""
    order = list(indices) if indices is not None else list(range(len(lengths)))
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1 - real / padded if padded else 0.0


def gather_collator_counts(trainer) -> None:
    """Sum the collator's token counts and skipped samples over the processes of a distributed run (each counted
    its own batches), so every process reports the run's totals. Every process must call it."""
    collator = trainer.data_collator
    if trainer.args.world_size <= 1 or not isinstance(collator, MMPhiDataCollator):
        return
    from accelerate.utils import gather_object

    gathered = gather_object([(collator.token_counts, collator.skipped)])
    collator.token_counts = {split: [sum(counts[split][i] for counts, _ in gathered) for i in range(2)]
                             for split in collator.token_counts}
    total = SkipReport()
    for _, report in gathered:
        total.merge(report)
    collator.skipped.counts, collator.skipped.examples = total.counts, total.examples  # the stage holds this object


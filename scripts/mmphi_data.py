"""The data module of stages 1 and 2: records, images, prompts, label masks, batches.

Formats (the ones the public datasets use; files written by scripts/make_synthetic_data.py follow them too):
- COCO 2017 captions: `{"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "caption", ...}]}`.
- LLaVA-Instruct: `[{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}]`; `<image>` in the
  first human turn (added there when missing); records without "image" are text-only. An optional `question_type`
  on a human turn is kept (per-type accuracy).

Public API:
- `load_coco_records(path, image_folder=None, skip_bad_records=False)` -> `list[CaptionedImage]` (one per image, with
  all its captions); `caption_conversations(images, prompt=CAPTION_PROMPT)` -> one `Conversation` per caption
  (the fixed captioning prompt as the user turn with the image, the caption as the assistant turn).
- `load_llava_records(path, image_folder=None, skip_bad_records=False)` -> `list[Conversation]`.
- `validate_coco_file(...)` / `validate_llava_file(...)`: the `--validate_data` scan (structure of every record, and
  every image file decoded) -> `SkipReport`; `validation_exit(report)` prints it and returns the exit status.
- `split_by_image(items, val_fraction)`: train/validation split by a hash of the image file (never by caption or
  turn), stable under reordering; text-only records are split by id.
- `encode_conversation(processor, conversation)` / `ConversationDataset(conversations, processor, max_length,
  vision_features=None, skip_bad_records=False)`: tokens through the processor's chat template, `<image>` expanded to
  the image tokens, labels -100 everywhere except the answer tokens and the EOS that ends each answer (the template's
  `{% generation %}` blocks); samples longer than `max_length` are cut after the image, or dropped when the image
  would be cut or no answer token is left (`dataset.truncation` counts both). `dataset.lengths` holds token counts.
- `MMPhiDataCollator(processor)`: right-pads with the pad token (never EOS), labels -100 on padding; returns
  `input_ids`, `attention_mask`, `labels` and, for the samples that have an image (in order), `pixel_values` or the
  cached `vision_features`. Counts real and padding tokens (`collator.padding_fraction`).
- `cache_vision_features(model, processor, image_paths, directory)` -> `VisionFeatureStore` (safetensors shards of
  `model.model.get_vision_features(pixel_values)`, keyed by image path, reused when the tower is unchanged).
- `LengthGroupedTrainerMixin`: put it before `Trainer`/`SFTTrainer` in the bases so `--train_sampling_strategy
  group_by_length` reads `dataset.lengths` instead of loading every sample; `padding_fraction(lengths, batch_size,
  indices)` measures what an order of samples costs in padding.
- Errors: `BadRecordError("<file>: record <n> (id=<id>): <what is wrong>")`; with `skip_bad_records` the record is
  skipped and counted in a `SkipReport` (`report.summary()`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from text_data import BadRecordError, SkipReport  # shared with stage 0: same error and skip-report style

from processing_mmphi import IMAGE_TOKEN, to_rgb

logger = logging.getLogger(__name__)

CAPTION_PROMPT = "Write a short caption for the image."
IGNORE_INDEX = -100
SKIP_HINT = " (pass --skip_bad_records to skip and count such records, --validate_data to scan a file up front)"
HUMAN_ROLES, GPT_ROLES = ("human", "user"), ("gpt", "assistant")

__all__ = [
    "BadRecordError", "SkipReport", "CAPTION_PROMPT", "Turn", "Conversation", "CaptionedImage",
    "load_coco_records", "caption_conversations", "load_llava_records", "validate_coco_file", "validate_llava_file",
    "validation_exit", "split_by_image", "encode_conversation", "ConversationDataset", "MMPhiDataCollator",
    "TruncationReport", "load_image", "check_image_file", "cache_vision_features", "VisionFeatureStore",
    "LengthGroupedTrainerMixin", "padding_fraction",
]


# ---------------------------------------------------------------------------------------------------------- records


@dataclass
class Turn:
    question: str
    answer: str
    question_type: str | None = None


@dataclass
class Conversation:
    """One training sample: an optional image (a path) and question/answer turns. `location` names it in errors."""

    id: str
    image: str | None
    turns: list[Turn]
    location: str = ""

    def messages(self) -> list[dict]:
        """Chat messages for the processor's template; the image goes first in the first user turn."""
        messages = []
        for index, turn in enumerate(self.turns):
            content = [{"type": "text", "text": turn.question}]
            if index == 0 and self.image is not None:
                content.insert(0, {"type": "image", "path": self.image})
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": turn.answer})
        return messages


@dataclass
class CaptionedImage:
    image_id: int | str
    image: str  # path
    captions: list[str] = field(default_factory=list)
    location: str = ""


def _read_json(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise BadRecordError(f"{path}: not valid UTF-8 (byte offset {error.start})") from None
    except json.JSONDecodeError as error:
        raise BadRecordError(f"{path}: malformed JSON ({error.msg} at line {error.lineno}, column {error.colno})") \
            from None


def _image_path(image_folder: str, name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise BadRecordError(f"image file name must be a non-empty string, got {name!r}")
    return os.path.join(image_folder, name)


def _require_image_file(path: str) -> None:
    if not os.path.isfile(path):
        raise BadRecordError(f"image file not found: {path}")


def _handle_bad(location: str, error: BadRecordError, skip_bad_records: bool, report: SkipReport) -> None:
    if not skip_bad_records:
        raise BadRecordError(f"{location}: {error}{SKIP_HINT}") from None
    report.add(location, str(error))


def _log_skips(path: str, report: SkipReport) -> None:
    if report.total:
        logger.warning("%s: %s", path, report.summary())


def load_coco_records(path: str, image_folder: str | None = None, skip_bad_records: bool = False,
                      report: SkipReport | None = None, check_images: bool = True) -> list[CaptionedImage]:
    """COCO captions JSON -> one `CaptionedImage` per image that has captions (images without any are dropped).
    `image_folder` defaults to the JSON's folder; `check_images` checks that each file exists (cheap; decoding every
    image is `validate_coco_file`'s job)."""
    report = report if report is not None else SkipReport()
    image_folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path))
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise BadRecordError(f'{path}: not a COCO captions file (expected an object with "images" and "annotations" '
                             "lists)")
    images: dict = {}
    for index, entry in enumerate(data["images"]):
        location = f"{path}: images[{index}]" + (f" (id={entry.get('id')})" if isinstance(entry, dict) else "")
        try:
            image = _parse_coco_image(entry, image_folder, check_images)
            if image.image_id in images:
                raise BadRecordError(f"duplicate image id {image.image_id!r}")
        except BadRecordError as error:
            _handle_bad(location, error, skip_bad_records, report)
            continue
        image.location = location
        images[image.image_id] = image
    for index, annotation in enumerate(data["annotations"]):
        location = f"{path}: annotations[{index}]"
        if isinstance(annotation, dict) and "id" in annotation:
            location += f" (id={annotation['id']})"
        try:
            image_id, caption = _parse_coco_annotation(annotation, images)
        except BadRecordError as error:
            _handle_bad(location, error, skip_bad_records, report)
            continue
        images[image_id].captions.append(caption)
    captioned = [image for image in images.values() if image.captions]
    if len(captioned) < len(images):
        logger.info("%s: %d image(s) without captions are not used", path, len(images) - len(captioned))
    _log_skips(path, report)
    return captioned


def _parse_coco_image(entry, image_folder: str, check_images: bool) -> CaptionedImage:
    if not isinstance(entry, dict):
        raise BadRecordError(f"image entry is a JSON {type(entry).__name__}, not an object")
    for key in ("id", "file_name"):
        if key not in entry:
            raise BadRecordError(f'image entry has no "{key}"')
    if not isinstance(entry["id"], (int, str)) or isinstance(entry["id"], bool):
        raise BadRecordError(f'image "id" must be an integer or a string, got {entry["id"]!r}')
    path = _image_path(image_folder, entry["file_name"])
    if check_images:
        _require_image_file(path)
    return CaptionedImage(image_id=entry["id"], image=path)


def _parse_coco_annotation(annotation, images: dict) -> tuple:
    if not isinstance(annotation, dict):
        raise BadRecordError(f"annotation is a JSON {type(annotation).__name__}, not an object")
    for key in ("image_id", "caption"):
        if key not in annotation:
            raise BadRecordError(f'annotation has no "{key}"')
    if annotation["image_id"] not in images:
        raise BadRecordError(f"caption for unknown image id {annotation['image_id']!r} (not in \"images\")")
    caption = annotation["caption"]
    if not isinstance(caption, str) or not caption.strip():
        raise BadRecordError(f"empty caption ({caption!r})")
    return annotation["image_id"], caption.strip()


def caption_conversations(images: Iterable[CaptionedImage], prompt: str = CAPTION_PROMPT) -> list[Conversation]:
    """Stage 1 samples: one per caption, the fixed prompt with the image as the question, the caption as the answer."""
    return [
        Conversation(id=f"{image.image_id}-{k}", image=image.image, turns=[Turn(prompt, caption, "caption")],
                     location=f"{image.location} caption {k}")
        for image in images
        for k, caption in enumerate(image.captions)
    ]


def load_llava_records(path: str, image_folder: str | None = None, skip_bad_records: bool = False,
                       report: SkipReport | None = None, check_images: bool = True) -> list[Conversation]:
    """LLaVA-Instruct JSON (a list of records) -> `Conversation`s. `image_folder` defaults to the JSON's folder."""
    report = report if report is not None else SkipReport()
    image_folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path))
    data = _read_json(path)
    if not isinstance(data, list):
        raise BadRecordError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    conversations = []
    for index, record in enumerate(data):
        location = f"{path}: record {index}"
        if isinstance(record, dict) and "id" in record:
            location += f" (id={record['id']})"
        try:
            conversation = parse_llava_record(record, image_folder, check_images)
        except BadRecordError as error:
            _handle_bad(location, error, skip_bad_records, report)
            continue
        conversation.location = location
        conversations.append(conversation)
    _log_skips(path, report)
    return conversations


def parse_llava_record(record, image_folder: str, check_images: bool = True) -> Conversation:
    """One LLaVA record -> `Conversation`; BadRecordError says what is wrong (the caller adds file and record)."""
    if not isinstance(record, dict):
        raise BadRecordError(f"record is a JSON {type(record).__name__}, not an object")
    image = None
    if record.get("image") is not None:
        image = _image_path(image_folder, record["image"])
        if check_images:
            _require_image_file(image)
    turns_raw = record.get("conversations")
    if turns_raw is None:
        raise BadRecordError('record has no "conversations"')
    if not isinstance(turns_raw, list) or not turns_raw:
        raise BadRecordError('"conversations" must be a non-empty list of turns')
    turns = _pair_turns(turns_raw)
    turns[0].question = _place_image(turns, image is not None)
    return Conversation(id=str(record.get("id", "")), image=image, turns=turns)


def _pair_turns(turns_raw: list) -> list[Turn]:
    """human/gpt turns must alternate, starting with human and ending with gpt; values non-empty strings."""
    values = []
    for position, turn in enumerate(turns_raw):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadRecordError(f'turn {position} must be an object with a string "value"')
        expected = HUMAN_ROLES if position % 2 == 0 else GPT_ROLES
        if turn.get("from") not in expected:
            raise BadRecordError(
                f"turns do not alternate human/gpt: turn {position} is from {turn.get('from')!r}, expected "
                f"{expected[0]!r}"
            )
        values.append(turn)
    if len(values) % 2:
        raise BadRecordError(f"the last turn ({len(values) - 1}) is a question without a gpt answer")
    turns = []
    for position in range(0, len(values), 2):
        human, gpt = values[position], values[position + 1]
        if not gpt["value"].strip():
            raise BadRecordError(f"empty answer in turn {position + 1}")
        turns.append(Turn(human["value"], gpt["value"].strip(), human.get("question_type")))
    return turns


def _place_image(turns: list[Turn], has_image: bool) -> str:
    """The first question without its `<image>` placeholder (the chat template puts the image first); `<image>`
    anywhere else, more than one, or without an image file is an error."""
    for position, turn in enumerate(turns[1:], start=1):
        if IMAGE_TOKEN in turn.question:
            raise BadRecordError(f"{IMAGE_TOKEN} in human turn {2 * position}: only the first turn may hold the image")
        if not turn.question.strip():
            raise BadRecordError(f"empty question in turn {2 * position}")
    first = turns[0].question
    n_placeholders = first.count(IMAGE_TOKEN)
    if n_placeholders and not has_image:
        raise BadRecordError(f'the first turn has {IMAGE_TOKEN} but the record has no "image"')
    if n_placeholders > 1:
        raise BadRecordError(f"the first turn has {n_placeholders} {IMAGE_TOKEN} placeholders; one image per record")
    question = first.replace(IMAGE_TOKEN, "").strip()
    if not question and not has_image:
        raise BadRecordError("empty question in turn 0")
    return question


# ---------------------------------------------------------------------------------------------------------- validation


def load_image(path: str) -> Image.Image:
    """Decode an image fully (truncated files fail here, not mid-batch) and convert it to RGB."""
    try:
        with Image.open(path) as opened:
            opened.load()
            return to_rgb(opened).copy()
    except FileNotFoundError:
        raise BadRecordError(f"image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadRecordError(f"cannot read image {path}: {error}") from None


def check_image_file(path: str) -> str | None:
    """None when `path` decodes completely, else what is wrong. JPEGs decode at reduced size (draft mode): every
    byte is still read, so truncation is caught, at a fraction of the cost."""
    try:
        with Image.open(path) as opened:
            if opened.format == "JPEG":
                opened.draft("RGB", (64, 64))
            opened.load()
    except FileNotFoundError:
        return f"image file not found: {path}"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"cannot read image {path}: {error}"
    return None


def _check_images(items: Sequence, report: SkipReport, num_threads: int) -> int:
    """Decode the image of every item (threads: PIL releases the GIL while decoding); count the failures in
    `report` and return how many items failed."""
    with_images = [item for item in items if item.image is not None]
    unique = sorted({item.image for item in with_images})
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        problems = dict(zip(unique, pool.map(check_image_file, unique), strict=True))
    failed = 0
    for item in with_images:
        if problems[item.image]:
            report.add(item.location, problems[item.image])
            failed += 1
    return failed


def validate_llava_file(path: str, image_folder: str | None = None, decode_images: bool = True,
                        num_threads: int = 8) -> tuple[int, SkipReport]:
    """Scan a whole LLaVA file: every record's structure and (by default) every image decoded.
    Returns (number of good records, report of the bad ones)."""
    report = SkipReport(max_examples=20)
    conversations = load_llava_records(path, image_folder, skip_bad_records=True, report=report)
    failed = _check_images(conversations, report, num_threads) if decode_images else 0
    return len(conversations) - failed, report


def validate_coco_file(path: str, image_folder: str | None = None, decode_images: bool = True,
                       num_threads: int = 8) -> tuple[int, SkipReport]:
    """Scan a whole COCO captions file (images, annotations, and by default every image decoded).
    Returns (number of good captioned images, report of the bad entries)."""
    report = SkipReport(max_examples=20)
    images = load_coco_records(path, image_folder, skip_bad_records=True, report=report)
    failed = _check_images(images, report, num_threads) if decode_images else 0
    return len(images) - failed, report


def validation_exit(path: str, n_good: int, report: SkipReport) -> int:
    """Print the result of a `--validate_data` scan; exit status 0 when the file is clean, 1 otherwise."""
    if not report.total:
        print(f"{path}: OK, {n_good} good record(s), no problems found")
        return 0
    counts = ", ".join(f"{n} x {reason}" for reason, n in report.counts.most_common())
    print(f"{path}: {n_good} good record(s), {report.total} bad: {counts}")
    for example in report.examples:
        print(f"  {example}")
    return 1


# ---------------------------------------------------------------------------------------------------------- splits


def _hash_fraction(key: str) -> float:
    return int(hashlib.md5(key.encode("utf-8")).hexdigest()[:8], 16) / 0x100000000


def split_by_image(items: Sequence, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Train/validation split by a hash of each item's image file name (all captions/records of an image go to the
    same side); text-only items by their id. Stable under reordering and across runs."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for item in items:
        key = os.path.basename(item.image) if item.image is not None else f"text:{item.id}"
        (val if _hash_fraction(f"{seed}:{key}") < val_fraction else train).append(item)
    return train, val


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


def truncate(input_ids: list[int], labels: list[int], max_length: int | None, image_token_id: int,
             report: TruncationReport):
    """Cut to max_length without cutting image tokens; None (counted) when the sample must be dropped."""
    if max_length is None or len(input_ids) <= max_length:
        return input_ids, labels
    image_positions = [i for i, token in enumerate(input_ids) if token == image_token_id]
    if image_positions and image_positions[-1] >= max_length:
        report.dropped_image_cut += 1
        return None
    labels = labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        report.dropped_no_answer += 1
        return None
    report.truncated += 1
    return input_ids[:max_length], labels


class SkippingDataset(torch.utils.data.Dataset):
    """Items that load an image: a BadRecordError names the record and the file; with `skip_bad_records` it is
    counted in `self.skipped` (and logged) and the next item is served instead. Subclasses define `_item(position)`
    and `_location(position)`."""

    skip_bad_records: bool = False
    skipped: SkipReport

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for attempt in range(min(len(self), 100)):
            position = (index + attempt) % len(self)
            try:
                return self._item(position)
            except BadRecordError as error:
                location = self._location(position)
                if not self.skip_bad_records:
                    raise BadRecordError(f"{location}: {error}{SKIP_HINT}") from None
                self.skipped.add(location, str(error))
                logger.warning("skipping a bad sample (%d so far): %s: %s", self.skipped.total, location, error)
        raise BadRecordError(f"{min(len(self), 100)} consecutive samples failed to load: {self.skipped.summary()}")


class ConversationDataset(SkippingDataset):
    """Tokenized conversations (encoded once, up front) + images loaded per item.

    Items: `input_ids`, `labels` (1-D LongTensors) and, for samples with an image, `pixel_values` [1, 3, H, W] or,
    with a `VisionFeatureStore`, `vision_features` [1, image_seq_length, vision_hidden]. An image that fails to load
    raises BadRecordError naming the record and file; with `skip_bad_records` it is counted in `self.skipped` and the
    next sample is served instead.
    """

    def __init__(self, conversations: Sequence[Conversation], processor, max_length: int | None = None,
                 vision_features: VisionFeatureStore | None = None, skip_bad_records: bool = False,
                 encode_batch_size: int = 512):
        self.processor = processor
        self.vision_features = vision_features
        self.skip_bad_records = skip_bad_records
        self.skipped = SkipReport()
        self.truncation = TruncationReport()
        self.conversations: list[Conversation] = []
        self.input_ids: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        for start in range(0, len(conversations), encode_batch_size):
            chunk = conversations[start : start + encode_batch_size]
            for conversation, (ids, labels) in zip(
                chunk, encode_messages(processor, [c.messages() for c in chunk]), strict=True
            ):
                kept = truncate(ids, labels, max_length, processor.image_token_id, self.truncation)
                if kept is None:
                    continue
                self.conversations.append(conversation)
                self.input_ids.append(np.asarray(kept[0], dtype=np.int32))
                self.labels.append(np.asarray(kept[1], dtype=np.int32))
        self.lengths = [len(ids) for ids in self.input_ids]
        if self.truncation.truncated or self.truncation.dropped:
            logger.warning("max_length=%s: %s", max_length, self.truncation.summary())
        if not self.conversations and conversations:
            raise ValueError(f"no sample fits max_length={max_length}: {self.truncation.summary()}")

    def __len__(self) -> int:
        return len(self.conversations)

    def _location(self, position: int) -> str:
        return self.conversations[position].location

    def _item(self, position: int) -> dict[str, torch.Tensor]:
        conversation = self.conversations[position]
        item = {
            "input_ids": torch.from_numpy(self.input_ids[position].astype(np.int64)),
            "labels": torch.from_numpy(self.labels[position].astype(np.int64)),
        }
        if conversation.image is None:
            return item
        if self.vision_features is not None:
            item["vision_features"] = self.vision_features.get(conversation.image)
        else:
            image = load_image(conversation.image)
            item["pixel_values"] = self.processor.image_processor([image], return_tensors="pt")["pixel_values"]
        return item


# ---------------------------------------------------------------------------------------------------------- batches


class MMPhiDataCollator:
    """Right-pads `input_ids` with the pad token (never EOS, which the model must learn to emit), sets
    `attention_mask`, pads `labels` with -100, and concatenates the image tensors of the samples that have one,
    in sample order (the model fills the image tokens in that order). Counts real and padding tokens."""

    def __init__(self, processor=None, pad_token_id: int | None = None, pad_to_multiple_of: int | None = None,
                 max_length: int | None = None):
        tokenizer = processor.tokenizer if processor is not None else None
        self.pad_token_id = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: build the processor with MMPhiProcessor.from_components")
        if tokenizer is not None and self.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("the pad token must differ from EOS (the model must learn to emit EOS)")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length
        self.real_tokens = 0
        self.padding_tokens = 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
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
        self.real_tokens += int(attention_mask.sum())
        self.padding_tokens += batch_size * longest - int(attention_mask.sum())
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
        total = self.real_tokens + self.padding_tokens
        return self.padding_tokens / total if total else 0.0


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


class LengthGroupedTrainerMixin:
    """Trainer mixin: `--train_sampling_strategy group_by_length` takes the lengths from `dataset.lengths`
    (computed while tokenizing) instead of loading every sample, images included, to measure it."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            return length_grouped_sampler(dataset.lengths, self.args)
        return super()._get_train_sampler(train_dataset)


def length_grouped_sampler(lengths, args):
    """Length-grouped order that is the same on every process and for every process count: groups are sized by the
    global batch (per-device batch x processes x accumulation) and shuffled by a generator seeded from
    `data_seed`/`seed`. Accelerate then deals the batches of this one order out to the processes."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    global_batch = args.per_device_train_batch_size * max(1, args.world_size) * args.gradient_accumulation_steps
    generator = torch.Generator().manual_seed(args.data_seed if args.data_seed is not None else args.seed)
    return LengthGroupedSampler(global_batch, lengths=list(lengths), generator=generator)


# ---------------------------------------------------------------------------------------------------------- features


class VisionFeatureStore:
    """Cached tower outputs: image path -> [1, image_seq_length, vision_hidden], read lazily from safetensors
    shards (memory-mapped), so a COCO-size cache need not fit in RAM."""

    INDEX = "index.json"

    def __init__(self, directory: str):
        self.directory = directory
        with open(os.path.join(directory, self.INDEX)) as handle:
            index = json.load(handle)
        self.fingerprint = index["fingerprint"]
        self.rows = {path: tuple(location) for path, location in index["rows"].items()}
        self._handles: dict = {}

    def __contains__(self, path: str) -> bool:
        return os.path.abspath(path) in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, path: str) -> torch.Tensor:
        key = os.path.abspath(path)
        if key not in self.rows:
            raise BadRecordError(f"no cached vision features for {path} in {self.directory}")
        shard, row = self.rows[key]
        if shard not in self._handles:
            from safetensors import safe_open

            self._handles[shard] = safe_open(os.path.join(self.directory, shard), framework="pt")
        return self._handles[shard].get_slice("features")[row : row + 1]

    def __getstate__(self):  # DataLoader workers reopen the shards themselves
        return {**self.__dict__, "_handles": {}}


def tower_fingerprint(model, processor) -> str:
    """Changes whenever the cached features would: tower weights, layer choice, CLS handling, preprocessing."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.model.vision_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    config = model.config
    digest.update(f"{config.vision_feature_layer}:{config.vision_feature_select_strategy}".encode())
    digest.update(json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def cache_vision_features(model, processor, image_paths: Iterable[str], directory: str, batch_size: int = 32,
                          shard_size: int = 4096) -> VisionFeatureStore:
    """Run the (frozen) tower once over every image and store `get_vision_features` as safetensors shards under
    `directory`. An existing cache with the same tower fingerprint that covers all images is reused."""
    from safetensors.torch import save_file

    paths = sorted({os.path.abspath(p) for p in image_paths})
    fingerprint = tower_fingerprint(model, processor)
    index_path = os.path.join(directory, VisionFeatureStore.INDEX)
    if os.path.isfile(index_path):
        store = VisionFeatureStore(directory)
        if store.fingerprint == fingerprint and all(p in store.rows for p in paths):
            logger.info("reusing cached vision features in %s (%d images)", directory, len(store))
            return store
    os.makedirs(directory, exist_ok=True)
    was_training = model.training
    model.eval()
    device = next(model.model.vision_tower.parameters()).device
    rows: dict[str, tuple[str, int]] = {}
    for shard_index, shard_start in enumerate(range(0, len(paths), shard_size)):
        shard_paths = paths[shard_start : shard_start + shard_size]
        shard_name = f"vision_features-{shard_index:05d}.safetensors"
        chunks = []
        for start in range(0, len(shard_paths), batch_size):
            images = [load_image(p) for p in shard_paths[start : start + batch_size]]
            pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)
            chunks.append(model.model.get_vision_features(pixel_values).cpu())
        save_file({"features": torch.cat(chunks).contiguous()}, os.path.join(directory, shard_name))
        rows.update({p: (shard_name, row) for row, p in enumerate(shard_paths)})
    with open(index_path, "w") as handle:
        json.dump({"fingerprint": fingerprint, "rows": rows}, handle)
    model.train(was_training)
    logger.info("cached vision features of %d images in %s", len(paths), directory)
    return VisionFeatureStore(directory)


"""Dataset formats, one registry: each format is one reader registered here, and every multimodal stage (and the
evaluation) reads its files through `read_conversations`, which recognises the format from the data.

Formats (the public datasets'; scripts/make_synthetic_data.py writes the first two):
- `coco_captions`: `{"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "caption", ...}]}` (COCO
  2017 captions); one sample per caption: the fixed captioning prompt with the image, the caption as the answer.
- `llava`: `[{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}]` (LLaVA-Instruct-150K, and
  LLaVA-Pretrain-558K's one-turn captions); `<image>` in the first human turn (added there when missing); records
  without "image" are text-only. An optional `question_type` on a human turn is kept (per-type accuracy).

A new format: write `read(data, path, options) -> list[Conversation]` (raise `BadRecordError` for a bad record
through `options.bad(location, error)`, which raises or counts), and register it with
`@register_format(name, matches=..., description=...)`.

Errors: `BadRecordError("<file>: record <n> (id=<id>): <what is wrong>")`; with `skip_bad_records` the record is
skipped and counted in a `SkipReport`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mmphi.data.images import check_images
from mmphi.data.records import CAPTION_PROMPT, CaptionedImage, Conversation, Turn, first_images, split_by_image
from mmphi.errors import BadRecordError, SkipReport, handle_bad_record
from processing_mmphi import IMAGE_TOKEN

logger = logging.getLogger(__name__)

HUMAN_ROLES, GPT_ROLES = ("human", "user"), ("gpt", "assistant")


# ---------------------------------------------------------------------------------------------------------- registry


@dataclass
class ReadOptions:
    """How a reader treats a file: where its images are, whether bad records are skipped (counted in `report`),
    whether image files must exist, and the user turn of caption samples."""

    image_folder: str
    skip_bad_records: bool = False
    report: SkipReport = field(default_factory=SkipReport)
    check_images: bool = True
    caption_prompt: str = CAPTION_PROMPT

    def bad(self, location: str, error: BadRecordError) -> None:
        handle_bad_record(location, error, self.skip_bad_records, self.report)


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    matches: Callable[[object], bool]  # on the parsed file
    read: Callable[[object, str, ReadOptions], list[Conversation]]
    description: str


FORMATS: dict[str, DatasetFormat] = {}


def register_format(name: str, matches: Callable[[object], bool], description: str):
    """Decorator: register `read(data, path, options) -> list[Conversation]` as the reader of format `name`."""
    def register(read):
        FORMATS[name] = DatasetFormat(name, matches, read, description)
        return read
    return register


def detect_format(data, path: str, data_format: str | None = None) -> DatasetFormat:
    """The registered format named `data_format`, or the first whose `matches(data)` holds; else a clear error
    saying what was found and which formats are known."""
    if data_format is not None:
        if data_format not in FORMATS:
            raise ValueError(f"unknown data format {data_format!r}; known: {', '.join(FORMATS)}")
        return FORMATS[data_format]
    for candidate in FORMATS.values():
        if candidate.matches(data):
            return candidate
    known = "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values())
    raise BadRecordError(f"{path}: no known dataset format fits ({_describe(data)}). Known formats: {known}")


def _describe(data) -> str:
    if isinstance(data, dict):
        return f"a JSON object with keys {sorted(data)[:8]}"
    if isinstance(data, list):
        first = data[0] if data else None
        keys = f" whose first record has keys {sorted(first)[:8]}" if isinstance(first, dict) else ""
        return f"a JSON list of {len(data)} item(s){keys}"
    return f"a JSON {type(data).__name__}"


def read_conversations(path: str, image_folder: str | None = None, skip_bad_records: bool = False,
                       report: SkipReport | None = None, check_images: bool = True, data_format: str | None = None,
                       caption_prompt: str = CAPTION_PROMPT) -> list[Conversation]:
    """Any registered format -> training samples. `image_folder` defaults to the file's folder; `check_images`
    checks that each image file exists (cheap; decoding every image is `validate_file`'s job)."""
    options = ReadOptions(
        image_folder=image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path)),
        skip_bad_records=skip_bad_records, report=report if report is not None else SkipReport(),
        check_images=check_images, caption_prompt=caption_prompt,
    )
    data = _read_json(path)
    conversations = detect_format(data, path, data_format).read(data, path, options)
    if options.report.total:
        logger.warning("%s: %s", path, options.report.summary())
    return conversations


def validate_file(path: str, image_folder: str | None = None, data_format: str | None = None,
                  decode_images: bool = True, num_threads: int = 8) -> tuple[int, SkipReport]:
    """The `--validate_data` scan of one file, any format: every record's structure and (by default) every image
    decoded. Returns (number of good samples, report of the bad ones)."""
    report = SkipReport(max_examples=20)
    conversations = read_conversations(path, image_folder, skip_bad_records=True, report=report,
                                       data_format=data_format)
    failed = check_images(conversations, report, num_threads) if decode_images else 0
    return len(conversations) - failed, report


# ---------------------------------------------------------------------------------------------------------- COCO


def _is_coco_captions(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("images"), list) \
        and isinstance(data.get("annotations"), list)


@register_format("coco_captions", matches=_is_coco_captions,
                 description='COCO captions, {"images": [...], "annotations": [{"image_id", "caption"}]}')
def read_coco_captions(data, path: str, options: ReadOptions) -> list[Conversation]:
    return caption_conversations(coco_images(data, path, options), options.caption_prompt)


def coco_images(data, path: str, options: ReadOptions) -> list[CaptionedImage]:
    """One `CaptionedImage` per image that has captions (images without any are dropped)."""
    images: dict = {}
    for index, entry in enumerate(data["images"]):
        location = f"{path}: images[{index}]" + (f" (id={entry.get('id')})" if isinstance(entry, dict) else "")
        try:
            image = _parse_coco_image(entry, options.image_folder, options.check_images)
            if image.image_id in images:
                raise BadRecordError(f"duplicate image id {image.image_id!r}")
        except BadRecordError as error:
            options.bad(location, error)
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
            options.bad(location, error)
            continue
        images[image_id].captions.append(caption)
    captioned = [image for image in images.values() if image.captions]
    if len(captioned) < len(images):
        logger.info("%s: %d image(s) without captions are not used", path, len(images) - len(captioned))
    return captioned


def load_coco_records(path: str, image_folder: str | None = None, skip_bad_records: bool = False,
                      report: SkipReport | None = None, check_images: bool = True) -> list[CaptionedImage]:
    """A COCO captions file -> one `CaptionedImage` per image, with all its captions (the CLIP stage and the
    caption evaluation want images, not caption samples)."""
    data = _read_json(path)
    if not _is_coco_captions(data):
        raise BadRecordError(f'{path}: not a COCO captions file (expected an object with "images" and "annotations" '
                             "lists)")
    options = ReadOptions(image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path)),
                          skip_bad_records, report if report is not None else SkipReport(), check_images)
    images = coco_images(data, path, options)
    if options.report.total:
        logger.warning("%s: %s", path, options.report.summary())
    return images


# ---------------------------------------------------------------------------------------------------------- LLaVA


def _is_llava(data) -> bool:
    return isinstance(data, list) and all(isinstance(r, dict) and "conversations" in r for r in data[:1])


@register_format("llava", matches=_is_llava,
                 description='LLaVA, [{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]')
def read_llava(data, path: str, options: ReadOptions) -> list[Conversation]:
    conversations = []
    for index, record in enumerate(data):
        location = f"{path}: record {index}"
        if isinstance(record, dict) and "id" in record:
            location += f" (id={record['id']})"
        try:
            conversation = parse_llava_record(record, options.image_folder, options.check_images)
        except BadRecordError as error:
            options.bad(location, error)
            continue
        conversation.location = location
        conversations.append(conversation)
    return conversations


def load_llava_records(path: str, image_folder: str | None = None, skip_bad_records: bool = False,
                       report: SkipReport | None = None, check_images: bool = True) -> list[Conversation]:
    """A LLaVA JSON file (a list of records) -> `Conversation`s; any other content is an error."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise BadRecordError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    return read_conversations(path, image_folder, skip_bad_records, report, check_images, data_format="llava")


# ---------------------------------------------------------------------------------------------------------- splits


@dataclass
class MultimodalDataArguments:
    """The data flags of stages 1 and 2 (each stage subclasses it for its own extras and defaults)."""

    data_path: str = field(metadata={"help": "training data, any registered format (COCO captions, LLaVA)"})
    image_folder: str | None = field(default=None, metadata={"help": "folder of the images (default: the file's)"})
    data_format: str | None = field(
        default=None, metadata={"help": "the format's registered name (default: recognised from the data)"}
    )
    eval_data_path: str | None = field(
        default=None, metadata={"help": "held-out data; without it --val_fraction of the images"}
    )
    eval_image_folder: str | None = field(default=None, metadata={"help": "images of --eval_data_path"})
    val_fraction: float = field(default=0.02, metadata={"help": "fraction of images held out (split by image)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use at most this many training samples"})
    max_eval_samples: int | None = field(default=500, metadata={"help": "evaluate on at most this many samples"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "processes for tokenising"})
    skip_bad_records: bool = field(
        default=False, metadata={"help": "skip bad records/images (counted and reported) instead of failing"}
    )
    validate_data: bool = field(default=False, metadata={"help": "scan the data (records + images) and exit"})


def load_train_eval(data_args, seed: int) -> tuple[list[Conversation], list[Conversation], SkipReport]:
    """(train, eval, skip report) from the stage's `MultimodalDataArguments`: `data_path` in any registered format,
    held out by image (`--val_fraction`, or a separate `--eval_data_path` sharing no image with it)."""
    report = SkipReport()

    def read(path: str, folder: str | None) -> list[Conversation]:
        return read_conversations(path, folder, data_args.skip_bad_records, report, data_format=data_args.data_format,
                                  caption_prompt=getattr(data_args, "caption_prompt", CAPTION_PROMPT))

    records = read(data_args.data_path, data_args.image_folder)
    if data_args.eval_data_path:
        train, evaluation = records, read(data_args.eval_data_path, data_args.eval_image_folder)
        overlap = {c.image for c in train if c.image} & {c.image for c in evaluation if c.image}
        if overlap:
            raise ValueError(f"{len(overlap)} image(s) are in both the training and the eval file, e.g. "
                             f"{sorted(overlap)[0]}: validation must be held out by image")
    else:
        train, evaluation = split_by_image(records, data_args.val_fraction, seed)
    if getattr(data_args, "max_train_images", None) is not None:
        train = first_images(train, data_args.max_train_images)
    if data_args.max_train_samples is not None:
        train = train[: data_args.max_train_samples]
    if data_args.max_eval_samples is not None:
        evaluation = evaluation[: data_args.max_eval_samples]
    return train, evaluation, report


def validate_data(data_args) -> int:
    """`--validate_data`: scan the training and eval files; exit status 0 when both are clean."""
    from mmphi.errors import validation_exit

    status = 0
    for path, folder in ((data_args.data_path, data_args.image_folder),
                         (data_args.eval_data_path, data_args.eval_image_folder)):
        if path:
            status |= validation_exit(path, *validate_file(path, folder, data_args.data_format))
    return status


# ---------------------------------------------------------------------------------------------------------- parsing


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

"""Dataset formats, one registry: each format is one reader registered here, and every multimodal stage (and the
evaluation) reads its data through `read_source` (a `DataSource` or a file path), which loads it with
`datasets.load_dataset` and recognises the format from the columns (or checks the one a caller names:
`data_format="llava"`). `validate_source` scans one source up front; `validate_data` is the stages' `--validate_data`.

Sources (`DataSource`): a local file (`--data_path`: .json, .jsonl, .parquet, also compressed: .gz, .bz2, .xz, .zst)
or anything `load_dataset` reads (`--dataset_name`: a hub id or a local dataset folder, with `--dataset_config_name`
and a split).

Formats (the public datasets'; scripts/make_synthetic_data.py writes the first two):
- `coco_captions`: `{"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "caption", ...}]}` (COCO
  2017 captions); one sample per caption: the fixed captioning prompt with the image, the caption as the answer.
- `llava`: rows `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}` (LLaVA-Instruct-150K,
  and LLaVA-Pretrain-558K's one-turn captions); `<image>` in the first human turn (added there when missing); rows
  without "image" are text-only. An optional `question_type` on a human turn is kept (per-type accuracy).
- `trl_messages`: TRL's vision format, rows `{"messages": [{"role", "content": [{"type": "image"} |
  {"type": "text", "text"}]}], "images": [image]}`; the images are embedded (parquet, as hub datasets store them) or
  paths under the image folder.

A new format: write `read(rows, label, options) -> list[Conversation]` (rows: a sequence of dicts, `label` names
the source in errors; raise `BadRecordError` for a bad record through `options.bad(location, error)`, which raises
or counts), and register it with `@register_format(name, matches=lambda columns: ..., description=...)`.

Errors: `BadRecordError("<file>: record <n> (id=<id>): <what is wrong>")`; with `skip_bad_records` the record is
skipped and counted in a `SkipReport`.
"""


from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import logging
import lzma
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import datasets
import zstandard
from tqdm.auto import tqdm

from mmphi.data.corpus import zstd_reader
from mmphi.data.images import check_images, embedded_image_keys
from mmphi.data.records import CAPTION_PROMPT, CaptionedImage, Conversation, Turn, first_images, split_by_image
from mmphi.errors import (
    BadRecordError,
    SkipReport,
    check_data_file,
    handle_bad_record,
    parse_json_object,
    validation_exit,
)
from processing_mmphi import AUDIO_TOKEN, IMAGE_TOKEN, PAD_TOKEN

# Text that the tokenizer turns into a control token instead of words: in an answer `<image>` would ask the model for
# image features that no image supplies, and `<|endoftext|>` (Phi's EOS) would train a false end of the answer. A
# record that holds one is refused with what and where (or skipped and counted with --skip_bad_records); the question
# keeps its one leading `<image>` placeholder, checked on its own.
RESERVED_TEXTS = (IMAGE_TOKEN, AUDIO_TOKEN, PAD_TOKEN, "<|endoftext|>")

logger = logging.getLogger(__name__)

HUMAN_ROLES, GPT_ROLES = ("human", "user"), ("gpt", "assistant")


# ---------------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class DataSource:
    """Where records come from: a local file (`path`), or whatever `datasets.load_dataset` reads (`name`: a hub id
    or a local dataset folder; `config`, `split`)."""

    path: str | None = None
    name: str | None = None
    config: str | None = None
    split: str = "train"

    def __post_init__(self):
        if (self.path is None) == (self.name is None):
            raise ValueError("give exactly one of --data_path (a file) or --dataset_name (a hub id or dataset folder)")

    @property
    def label(self) -> str:
        """How errors name the source: the file, or `name[/config]:split`."""
        if self.path is not None:
            return self.path
        return f"{self.name}{'/' + self.config if self.config else ''}:{self.split}"

    @property
    def default_image_folder(self) -> str | None:
        """Relative image paths resolve against the file's folder, or a local dataset folder."""
        if self.path is not None:
            return os.path.dirname(os.path.abspath(self.path))
        return self.name if os.path.isdir(self.name) else None


COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": None, ".zstd": None}
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _file_kind(path: str) -> tuple[str, str | None]:
    """(builder, compression suffix) of a data file from its name, or a clear error."""
    stem, suffix = os.path.splitext(path.lower())
    compression = suffix if suffix in COMPRESSIONS else None
    if compression:
        stem, suffix = os.path.splitext(stem)
    if suffix not in BUILDERS or (compression and BUILDERS[suffix] == "parquet"):
        raise ValueError(f"{path}: unsupported data file type; use .json, .jsonl or .parquet (json may be compressed: "
                         f"{', '.join(COMPRESSIONS)})")
    return BUILDERS[suffix], compression


def load_rows(source: DataSource) -> Sequence[dict]:
    """The source's records through `datasets.load_dataset` (memory-mapped, cached). A JSON file that arrow cannot
    read (a malformed line, a record that is not an object) is parsed again in Python to name what is wrong."""
    if source.name is not None:
        try:
            return datasets.load_dataset(source.name, source.config, split=source.split)
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"{source.label}: cannot load the dataset: {error}") from None
    check_data_file(source.path, "*.json")
    builder, compression = _file_kind(source.path)
    try:
        with _quiet_builder(builder):
            return datasets.load_dataset(builder, data_files=source.path, split="train")
    except DECOMPRESSION_ERRORS as error:  # met while datasets reads the first block for the columns
        raise _not_decompressible(source.path, compression, error) from None
    except (datasets.exceptions.DatasetGenerationError, ValueError) as error:  # ValueError: no rows at all
        if builder != "json":
            raise BadRecordError(f"{source.path}: cannot be read as {builder}: {error.__cause__ or error}") from None
        return _read_json_records(source.path)


@contextlib.contextmanager
def _quiet_builder(builder: str):
    """datasets' builders log an ERROR before they raise: the JSON one for a file arrow reads as no table of rows (a
    COCO file: one object of lists), which is then read here, the parquet one for a file that is not parquet, which
    the error raised here names; either message would only repeat or alarm."""
    builder_logger = datasets.utils.logging.get_logger(f"datasets.packaged_modules.{builder}.{builder}")
    level = builder_logger.level
    builder_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        builder_logger.setLevel(level)


def _read_json_records(path: str) -> list:
    """A JSON document (one list of records, or one object such as a COCO file) or JSON lines, parsed in Python so
    that an error names the line or record."""
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRecordError(f"{path}: not valid UTF-8 (byte offset {error.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg != "Extra data":  # one document, malformed
            raise BadRecordError(f"{path}: malformed JSON ({error.msg} at line {error.lineno}, column "
                                 f"{error.colno})") from None
        return [_json_line(path, number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    except RecursionError:
        raise BadRecordError(f"{path}: JSON nested too deeply to read (beyond Python's recursion limit)") from None
    return data if isinstance(data, list) else [data]


def _json_line(path: str, number: int, line: str) -> dict:
    try:
        return parse_json_object(line)
    except BadRecordError as error:
        raise BadRecordError(f"{path}: line {number}: {error}") from None


def _read_bytes(path: str) -> bytes:
    _, compression = _file_kind(path)
    try:
        if compression in (".zst", ".zstd"):
            with open(path, "rb") as handle:
                return zstd_reader(handle, path).read()
        opener = COMPRESSIONS[compression] if compression else open
        with opener(path, "rb") as handle:
            return handle.read()
    except DECOMPRESSION_ERRORS as error:
        raise _not_decompressible(path, compression, error) from None


# what a cut-off or mislabelled .gz / .bz2 / .xz / .zst raises while read: bz2's "Invalid data stream" and gzip's
# BadGzipFile are OSErrors without an errno, unlike a missing file or a full disk
DECOMPRESSION_ERRORS = (EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError, OSError)


def _not_decompressible(path: str, compression: str, error: Exception) -> Exception:
    if not compression or (isinstance(error, OSError) and error.errno is not None):
        return error
    detail = str(error).removeprefix(f"{path}: ")
    return BadRecordError(f"{path}: cannot decompress it as {compression} ({detail}): the file is cut short, damaged, "
                          f"or not {compression}-compressed")


def columns_of(rows: Sequence[dict]) -> frozenset[str]:
    if isinstance(rows, datasets.Dataset):
        return frozenset(rows.column_names)
    return frozenset(rows[0]) if rows and isinstance(rows[0], dict) else frozenset()


# ---------------------------------------------------------------------------------------------------------- registry


@dataclass
class ReadOptions:
    """How a reader treats a source: where its images are, whether bad records are skipped (counted in `report`),
    whether image files must exist, and the user turn of caption samples."""

    image_folder: str | None
    skip_bad_records: bool = False
    report: SkipReport = field(default_factory=SkipReport)
    check_images: bool = True
    caption_prompt: str = CAPTION_PROMPT

    def bad(self, location: str, error: BadRecordError) -> None:
        handle_bad_record(location, error, self.skip_bad_records, self.report)

    @staticmethod
    def progress(rows, label: str):
        """`rows` with a progress bar when there are many (LLaVA-Instruct-150K takes a while to parse)."""
        return tqdm(rows, desc=f"reading {os.path.basename(label)}", unit="record", disable=len(rows) < 10_000)


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    matches: Callable[[frozenset[str]], bool]  # on the column names
    read: Callable[[Sequence[dict], str, ReadOptions], list[Conversation]]
    description: str


FORMATS: dict[str, DatasetFormat] = {}


def register_format(name: str, matches: Callable[[frozenset[str]], bool], description: str):
    """Decorator: register `read(rows, label, options) -> list[Conversation]` as the reader of format `name`, which
    `matches(column names)` recognises."""
    def register(read):
        FORMATS[name] = DatasetFormat(name, matches, read, description)
        return read
    return register


def detect_format(rows: Sequence[dict], label: str, data_format: str | None = None) -> DatasetFormat:
    """The registered format named `data_format` (checked against the columns, so that a file of another format is
    named as such rather than failing record by record), or the first that matches the columns; else a clear error
    saying what was found and which formats are known."""
    columns = columns_of(rows)
    if data_format is not None:
        if data_format not in FORMATS:
            raise ValueError(f"unknown data format {data_format!r}; known: {', '.join(FORMATS)}")
        wanted = FORMATS[data_format]
        if not wanted.matches(columns):
            kind, _, expected = wanted.description.partition(", ")  # "COCO captions, {...}"
            raise BadRecordError(f"{label}: not a {kind} file (data_format {data_format!r} expects {expected}; "
                                 f"found {_found(rows, columns)})")
        return wanted
    for candidate in FORMATS.values():
        if candidate.matches(columns):
            return candidate
    known = "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values())
    raise BadRecordError(f"{label}: no known dataset format fits ({_found(rows, columns)}). Known formats: {known}")


def _found(rows: Sequence[dict], columns: frozenset[str]) -> str:
    """What a source holds, for an error that says its format is not the one wanted."""
    if columns:
        return f"columns {sorted(columns)[:8]}"
    return f"{len(rows)} record(s) that are not JSON objects" if len(rows) else "no records"


def read_source(source: DataSource | str, image_folder: str | None = None, skip_bad_records: bool = False,
                report: SkipReport | None = None, check_images: bool = True, data_format: str | None = None,
                caption_prompt: str = CAPTION_PROMPT) -> list[Conversation]:
    """The one reader: any registered format from any source (a `DataSource`, or a file path) -> training samples.
    `data_format` names the format a caller needs (anything else is an error); `captioned_images` of caption samples
    gives one `CaptionedImage` per image. `image_folder` defaults to the source's folder; `check_images` checks that
    each image file exists (cheap; decoding every image is `validate_source`'s job)."""
    source = DataSource(path=source) if isinstance(source, str) else source
    options = ReadOptions(
        image_folder=image_folder if image_folder is not None else source.default_image_folder,
        skip_bad_records=skip_bad_records, report=report if report is not None else SkipReport(),
        check_images=check_images, caption_prompt=caption_prompt,
    )
    rows = load_rows(source)
    conversations = detect_format(rows, source.label, data_format).read(rows, source.label, options)
    if not conversations and not options.report.total:
        raise BadRecordError(f"{source.label}: no samples in it (a COCO file with no annotations, an empty list?)")
    if options.report.total:
        logger.warning("%s: %s", source.label, options.report.summary())
    return conversations


def validate_source(source: DataSource | str, image_folder: str | None = None, data_format: str | None = None,
                    decode_images: bool = True, num_threads: int = 8) -> tuple[int, SkipReport]:
    """The `--validate_data` scan of one source (a `DataSource`, or a file path), any format: every record's structure
    and (by default) every image decoded. Returns (number of good samples, report of the bad ones), which
    `validation_exit` prints."""
    report = SkipReport(max_examples=20)
    conversations = read_source(source, image_folder, skip_bad_records=True, report=report, data_format=data_format)
    failed = check_images(conversations, report, num_threads) if decode_images else 0
    return len(conversations) - failed, report


def _location(label: str, index: int, record) -> str:
    location = f"{label}: record {index}"
    if isinstance(record, dict) and record.get("id") is not None:
        location += f" (id={record['id']})"
    return location


# ---------------------------------------------------------------------------------------------------------- COCO


@register_format("coco_captions", matches=lambda columns: {"images", "annotations"} <= columns,
                 description='COCO captions, {"images": [...], "annotations": [{"image_id", "caption"}]}')
def read_coco_captions(rows, label: str, options: ReadOptions) -> list[Conversation]:
    return caption_conversations(coco_images(rows, label, options), options.caption_prompt)


def coco_images(rows, label: str, options: ReadOptions) -> list[CaptionedImage]:
    """One `CaptionedImage` per image that has captions (images without any are dropped). `rows` holds one COCO
    document (a JSON object read as one row)."""
    if len(rows) != 1:
        raise BadRecordError(f"{label}: expected one COCO captions document, found {len(rows)} rows")
    data = rows[0]
    images: dict = {}
    for index, entry in enumerate(data["images"] or []):
        location = f"{label}: images[{index}]" + (f" (id={entry.get('id')})" if isinstance(entry, dict) else "")
        try:
            image = _parse_coco_image(entry, options.image_folder, options.check_images)
            if image.image_id in images:
                raise BadRecordError(f"duplicate image id {image.image_id!r}")
        except BadRecordError as error:
            options.bad(location, error)
            continue
        image.location = location
        images[image.image_id] = image
    for index, annotation in enumerate(data["annotations"] or []):
        location = f"{label}: annotations[{index}]"
        if isinstance(annotation, dict) and annotation.get("id") is not None:
            location += f" (id={annotation['id']})"
        try:
            image_id, caption = _parse_coco_annotation(annotation, images)
        except BadRecordError as error:
            options.bad(location, error)
            continue
        images[image_id].captions.append(caption)
    captioned = [image for image in images.values() if image.captions]
    if len(captioned) < len(images):
        logger.info("%s: %d image(s) without captions are not used", label, len(images) - len(captioned))
    return captioned


# ---------------------------------------------------------------------------------------------------------- LLaVA


@register_format("llava", matches=lambda columns: "conversations" in columns,
                 description='LLaVA, rows {"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}')
def read_llava(rows, label: str, options: ReadOptions) -> list[Conversation]:
    conversations = []
    for index, record in enumerate(options.progress(rows, label)):
        location = _location(label, index, record)
        try:
            conversation = parse_llava_record(record, options.image_folder, options.check_images)
        except BadRecordError as error:
            options.bad(location, error)
            continue
        conversation.location = location
        conversations.append(conversation)
    return conversations


# ---------------------------------------------------------------------------------------------------------- TRL


@register_format("trl_messages", matches=lambda columns: "messages" in columns,
                 description='TRL vision, rows {"messages": [{"role", "content": [{"type": "image"|"text"}]}], '
                             '"images": [...]}')
def read_trl_messages(rows, label: str, options: ReadOptions) -> list[Conversation]:
    """TRL's conversational vision format. Embedded images stay in the dataset's arrow file (addressed by a key the
    collator and the feature cache decode); image paths resolve under the image folder."""
    images = _trl_images(rows, label, options)
    conversations = []
    messages = rows.select_columns(["messages"]) if isinstance(rows, datasets.Dataset) else rows
    for index, record in enumerate(options.progress(messages, label)):
        location = _location(label, index, record)
        try:
            turns, n_images = _trl_turns(record.get("messages") if isinstance(record, dict) else record)
            image = images(index, n_images)
        except BadRecordError as error:
            options.bad(location, error)
            continue
        conversations.append(Conversation(str(record.get("id", index)), image, turns, location))
    return conversations


def _trl_images(rows, label: str, options: ReadOptions) -> Callable[[int, int], str | None]:
    """`image(row, number of image entries in the messages)` -> the row's image key, or a BadRecordError."""
    if isinstance(rows, datasets.Dataset) and "images" in rows.column_names:
        column = rows.data.column("images")
        if not hasattr(column.type, "value_type"):
            raise BadRecordError(f'{label}: "images" must be a list column, found {column.type}')
        counts = column.combine_chunks().value_lengths().to_pylist()
        embedded = not str(column.type.value_type).startswith(("string", "large_string"))
        keys = embedded_image_keys(rows, "images") if embedded else None
        paths = None if embedded else column.to_pylist()
    else:  # a Python list (JSON the arrow reader could not read)
        lists = [r.get("images") or [] if isinstance(r, dict) else [] for r in rows]
        counts, embedded, keys, paths = [len(x) for x in lists], False, None, lists

    def image(index: int, n_placeholders: int) -> str | None:
        n = counts[index] or 0
        if n != n_placeholders:
            raise BadRecordError(f'{n} image(s) in "images" but {n_placeholders} {{"type": "image"}} in the messages')
        if n > 1:
            raise BadRecordError(f"{n} images; MM-Phi trains on one image per record")
        if n == 0:
            return None
        if embedded:
            return keys(index)
        path = _image_path(options.image_folder, paths[index][0])
        if options.check_images:
            _require_image_file(path)
        return path

    return image


def _trl_turns(messages) -> tuple[list[Turn], int]:
    """TRL messages -> (turns, number of image entries); the image entry must be in the first user message."""
    if not isinstance(messages, list) or not messages:
        raise BadRecordError('"messages" must be a non-empty list')
    texts, n_images = [], 0
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecordError(f"message {position} is not an object")
        expected = "user" if position % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise BadRecordError(f"message {position} has role {message.get('role')!r}, expected {expected!r} "
                                 "(user/assistant alternate, starting with user; no system message)")
        text, images = _trl_content(message.get("content"), position)
        if images and position:
            raise BadRecordError(f"an image in message {position}: only the first user message may hold the image")
        n_images += images
        texts.append(text)
    if len(texts) % 2:
        raise BadRecordError(f"the last message ({len(texts) - 1}) is a question without an assistant answer")
    turns = []
    for position in range(0, len(texts), 2):
        if not texts[position + 1]:
            raise BadRecordError(f"empty answer in message {position + 1}")
        if not texts[position] and not (position == 0 and n_images):
            raise BadRecordError(f"empty question in message {position}")
        turns.append(Turn(texts[position], texts[position + 1]))
    check_turn_texts(turns)
    return turns, n_images


def _trl_content(content, position: int) -> tuple[str, int]:
    """(text, number of image entries) of one message's content (a string or a list of typed parts)."""
    if isinstance(content, str):
        return content.replace(IMAGE_TOKEN, "").strip(), content.count(IMAGE_TOKEN)
    if not isinstance(content, list):
        raise BadRecordError(f"message {position}: content must be a string or a list of parts")
    texts, images = [], 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            images += 1
        elif kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"].strip())
        else:
            raise BadRecordError(f"message {position}: a content part must be {{\"type\": \"image\"}} or "
                                 f"{{\"type\": \"text\", \"text\": ...}}, got {part!r}"[:300])
    return "\n".join(t for t in texts if t), images


# ---------------------------------------------------------------------------------------------------------- splits


def load_train_eval(data_args, seed: int) -> tuple[list[Conversation], list[Conversation], SkipReport]:
    """(train, eval, skip report) from the stage's `MultimodalDataArguments`: a file or a dataset in any registered
    format, held out by image (`--val_fraction`, or a separate eval file / split sharing no image with it)."""
    report = SkipReport()

    def read(source: DataSource, folder: str | None) -> list[Conversation]:
        return read_source(source, folder, data_args.skip_bad_records, report, data_format=data_args.data_format,
                           caption_prompt=getattr(data_args, "caption_prompt", CAPTION_PROMPT))

    (train_source, train_folder), *held_out = data_args.sources()
    records = read(train_source, train_folder)
    if held_out:
        eval_source, eval_folder = held_out[0]
        train, evaluation = records, read(eval_source, eval_folder)
        overlap = {c.image for c in train if c.image} & {c.image for c in evaluation if c.image}
        if overlap:
            raise ValueError(f"{len(overlap)} image(s) are in both the training and the eval data "
                             f"({train_source.label}, {eval_source.label}), e.g. {sorted(overlap)[0]}: validation "
                             "must be held out by image")
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
    """The stages' `--validate_data`: scan every training and held-out source (`data_args.sources()`), print each
    result; exit status 0 when all are clean."""
    status = 0
    for source, folder in data_args.sources():
        status |= validation_exit(source.label, *validate_source(source, folder, data_args.data_format))
    return status


# ---------------------------------------------------------------------------------------------------------- parsing


def _image_path(image_folder: str, name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise BadRecordError(f"image file name must be a non-empty string, got {name!r}")
    return os.path.join(image_folder, name) if image_folder else name


def _require_image_file(path: str) -> None:
    if not os.path.isfile(path):
        hint = "" if os.path.isabs(path) else " (relative to the working directory: pass --image_folder)"
        raise BadRecordError(f"image file not found: {path}{hint}")


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
    check_reserved_text(caption, "the caption")
    return annotation["image_id"], caption.strip()


def check_reserved_text(text: str, where: str, allowed: tuple[str, ...] = ()) -> None:
    """BadRecordError when `text` holds a RESERVED_TEXTS entry other than `allowed`."""
    found = [reserved for reserved in RESERVED_TEXTS if reserved in text and reserved not in allowed]
    if found:
        raise BadRecordError(f"{where} holds {', '.join(found)}, which the tokenizer reads as a control token, not "
                             "text: remove or rewrite it")


def check_turn_texts(turns: list[Turn]) -> None:
    """Every answer, and every question apart from the first's `<image>` placeholder, free of reserved text."""
    for position, turn in enumerate(turns):
        check_reserved_text(turn.question, f"question {position}", allowed=(IMAGE_TOKEN,))
        check_reserved_text(turn.answer, f"answer {position}")


def caption_conversations(images: Iterable[CaptionedImage], prompt: str = CAPTION_PROMPT) -> list[Conversation]:
    """Projector samples: one per caption, the fixed prompt with the image as the question, the caption as the
    answer."""
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
    check_turn_texts(turns)
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

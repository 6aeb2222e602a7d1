"""The vision-feature cache of the projector and instruct stages: the frozen tower run once over every image, its
outputs stored as safetensors shards and read back lazily (memory-mapped), so a COCO-size cache need not fit in RAM."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable

import torch

from mmphi.data.images import EMBEDDED_ROW, load_image
from mmphi.errors import BadRecordError

logger = logging.getLogger(__name__)

# How images are decoded (mmphi.data.images.load_image): part of the tower fingerprint, so features made by another
# decoding are recomputed.
IMAGE_DECODING = "rgb-exif-upright"


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
        self.unreadable = index.get("unreadable", {})
        self.stamps = {path: tuple(stamp) if stamp else None for path, stamp in index.get("stamps", {}).items()}
        self._handles: dict = {}

    def __contains__(self, path: str) -> bool:
        return os.path.abspath(path) in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, path: str) -> torch.Tensor:
        key = os.path.abspath(path)
        if key in self.unreadable:
            raise BadRecordError(self.unreadable[key])
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
    digest.update(IMAGE_DECODING.encode())
    digest.update(json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


class _ImageFiles(torch.utils.data.Dataset):
    """Pixels of one shard's images, decoded in DataLoader workers; a bad image gives None (named by the caller)."""

    def __init__(self, paths: list[str], image_processor):
        self.paths, self.image_processor = paths, image_processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = load_image(self.paths[index])
        except BadRecordError as error:
            return index, None, str(error)
        return index, self.image_processor([image], return_tensors="pt")["pixel_values"][0], None


def default_cache_dir(fingerprint: str, paths: list[str]) -> str:
    """Outside any output folder (so checkpoints and pushes never carry it), keyed by the tower and the image set:
    `$MMPHI_CACHE` (default ~/.cache/mmphi)/vision_features/<tower fingerprint>-<image list digest>."""
    root = os.environ.get("MMPHI_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mmphi"))
    images = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:12]
    return os.path.join(root, "vision_features", f"{fingerprint}-{images}")


def file_stamp(path: str) -> tuple[int, int] | None:
    """(size, modification time in ns) of an image file (of its arrow file for an embedded image); None when it is
    missing. A replaced or repaired image gets a new stamp, so its features are computed again."""
    try:
        stat = os.stat(path.rsplit(EMBEDDED_ROW, 1)[0])
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _still_valid(kept: VisionFeatureStore, path: str, stamp) -> bool:
    """The cache's entry for `path` (features or "unreadable") was made from the file as it is now."""
    return (path in kept.rows or path in kept.unreadable) and kept.stamps.get(path, False) == stamp


_SHARD_PREFIX, _SHARD_SUFFIX = "vision_features-", ".safetensors"


def _shard_name(index: int) -> str:
    return f"{_SHARD_PREFIX}{index:05d}{_SHARD_SUFFIX}"


def _next_shard_index(directory: str) -> int:
    """One past the highest shard number in `directory`: after the indexed shards, and after any that a run stopped
    before its index was written left behind."""
    numbers = [int(name[len(_SHARD_PREFIX):-len(_SHARD_SUFFIX)]) for name in os.listdir(directory)
               if name.startswith(_SHARD_PREFIX) and name.endswith(_SHARD_SUFFIX)]
    return max(numbers, default=-1) + 1


def _write_shard(tower_model, paths: list[str], directory: str, name: str, image_processor, device, batch_size: int,
                 num_workers: int, progress) -> dict[str, str]:
    """Features of `paths` into one safetensors file (rows in `paths` order; a bad image's row stays zero);
    returns {path: what is wrong} for the images that could not be read."""
    from safetensors.torch import save_file

    loader = torch.utils.data.DataLoader(_ImageFiles(paths, image_processor), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=list)
    rows, bad = None, {}
    for batch in loader:
        good = [(index, pixels) for index, pixels, _ in batch if pixels is not None]
        bad.update({paths[index]: problem for index, pixels, problem in batch if pixels is None})
        if good:
            pixels = torch.stack([p for _, p in good]).to(device)
            features = tower_model.get_vision_features(pixels).cpu()
            if rows is None:
                rows = torch.zeros((len(paths), *features.shape[1:]), dtype=features.dtype)
            rows[[index for index, _ in good]] = features
        progress.update(len(batch))
    if rows is None:  # every image of the shard unreadable: nothing to store, the index names them
        return bad
    save_file({"features": rows.contiguous()}, os.path.join(directory, name))
    return bad


@torch.no_grad()
def refuse_a_split_tower(model) -> None:
    """The cache runs (and fingerprints) the frozen tower before training. Under DeepSpeed ZeRO-3 (`zero3_init_flag`)
    its weights are split across the processes by then: each holds empty placeholders, which would run as nothing."""
    if any(param.numel() == 0 for param in model.model.vision_tower.parameters()):
        raise ValueError("--cache_vision_features runs the frozen vision tower before training, but DeepSpeed ZeRO-3 "
                         "has split its weights across the processes: pass --cache_vision_features false, or train "
                         "this stage with DDP (scripts/configs/multi_gpu.yaml) or ZeRO-2 (deepspeed_zero2.yaml)")


def cache_vision_features(model, processor, image_paths: Iterable[str], directory: str | None = None,
                          batch_size: int = 32, shard_size: int = 1024, device=None, num_workers: int = 0,
                          state=None) -> VisionFeatureStore:
    """Run the frozen tower once over every image and store `get_vision_features` as safetensors shards (read back
    memory-mapped). Batched on `device` (default: where the tower is), images decoded in `num_workers` DataLoader
    workers, with a progress bar. Under DDP (`state`: accelerate's PartialState) each process computes every
    `num_processes`-th shard, so the work is shared and nobody waits in a barrier for the whole cache; the shards are
    the same whatever the process count. An existing cache with the same tower fingerprint that covers the images is
    reused; one that covers part of them is extended with the rest. Each entry records its file's size and mtime: an
    image replaced since, or an unreadable one repaired, is computed again. Unreadable images are left out of the
    index (the collator then names or skips their samples)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = state or PartialState()
    refuse_a_split_tower(model)
    paths = sorted({os.path.abspath(p) for p in image_paths})
    stamps = {path: file_stamp(path) for path in paths}
    fingerprint = tower_fingerprint(model, processor)
    directory = directory or default_cache_dir(fingerprint, paths)
    index_path = os.path.join(directory, VisionFeatureStore.INDEX)
    kept = VisionFeatureStore(directory) if os.path.isfile(index_path) else None
    if kept is not None and kept.fingerprint != fingerprint:
        logger.info("%s holds another tower's (or preprocessing's) features: this one's go into new shards", directory)
        kept = None
    # Computed again: images the cache lacks, and images replaced or repaired since (size or mtime changed).
    todo = [path for path in paths if kept is None or not _still_valid(kept, path, stamps[path])]
    if not todo:
        logger.info("reusing cached vision features in %s (%d images)", directory, len(kept))
        return kept
    # New shards always come after every shard in the folder: the shards the current index (or another tower's, or
    # another stage's) points at are never rewritten, so a run stopped midway leaves that index true.
    paths = todo
    first = _next_shard_index(directory) if os.path.isdir(directory) else 0
    state.wait_for_everyone()  # nobody may still be reading an old index in this folder
    os.makedirs(directory, exist_ok=True)
    backbone = model.model
    tower_device = next(backbone.vision_tower.parameters()).device
    device = torch.device(device) if device is not None else tower_device
    was_training = model.training
    model.eval()
    backbone.vision_tower.to(device)
    shards = [paths[start : start + shard_size] for start in range(0, len(paths), shard_size)]
    mine = range(state.process_index, len(shards), state.num_processes)
    progress = tqdm(total=sum(len(shards[k]) for k in mine), desc="caching vision features", unit="image",
                    disable=not state.is_local_main_process)
    bad: dict[str, str] = {}
    for k in mine:
        bad.update(_write_shard(backbone, shards[k], directory, _shard_name(first + k), processor.image_processor,
                                device, batch_size, num_workers, progress))
    progress.close()
    _write_unreadable(directory, state.process_index, bad)
    backbone.vision_tower.to(tower_device)
    model.train(was_training)
    state.wait_for_everyone()  # every shard written: only the slowest process's share is waited for
    if state.is_main_process:
        unreadable = _read_unreadable(directory, state.num_processes)
        rows = {p: (_shard_name(first + k), row) for k, shard in enumerate(shards) for row, p in enumerate(shard)
                if p not in unreadable}
        if kept:  # an image now readable leaves "unreadable", one now broken leaves the rows
            rows = {**{p: r for p, r in kept.rows.items() if p not in unreadable}, **rows}
            unreadable = {**{p: u for p, u in kept.unreadable.items() if p not in rows}, **unreadable}
        all_stamps = {**(kept.stamps if kept else {}), **{p: stamps[p] for p in paths}}
        with open(index_path + ".partial", "w") as handle:
            json.dump({"fingerprint": fingerprint, "rows": rows, "unreadable": unreadable, "stamps": all_stamps},
                      handle)
        os.replace(index_path + ".partial", index_path)
        _remove_unindexed_shards(directory, rows)
        if unreadable:
            logger.warning("%d image(s) could not be read and have no cached features, e.g. %s",
                           len(unreadable), next(iter(unreadable.values())))
    state.wait_for_everyone()
    logger.info("cached vision features of %d images in %s", len(paths), directory)
    return VisionFeatureStore(directory)


def _remove_unindexed_shards(directory: str, rows: dict) -> None:
    """Shards the index no longer points at (another tower's, replaced images' only shard, a stopped run's)."""
    indexed = {shard for shard, _ in rows.values()}
    for name in os.listdir(directory):
        if name.startswith(_SHARD_PREFIX) and name.endswith(_SHARD_SUFFIX) and name not in indexed:
            os.remove(os.path.join(directory, name))


def _write_unreadable(directory: str, process_index: int, bad: dict[str, str]) -> None:
    with open(os.path.join(directory, f"unreadable-{process_index:05d}.json"), "w") as handle:
        json.dump(bad, handle)


def _read_unreadable(directory: str, num_processes: int) -> dict[str, str]:
    unreadable = {}
    for index in range(num_processes):
        path = os.path.join(directory, f"unreadable-{index:05d}.json")
        with open(path) as handle:
            unreadable.update(json.load(handle))
        os.remove(path)
    return unreadable

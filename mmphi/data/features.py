"""The stage-1 vision-feature cache: the frozen tower run once over every image, its outputs stored as safetensors
shards and read back lazily (memory-mapped), so a COCO-size cache need not fit in RAM."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable

import torch

from mmphi.data.images import load_image
from mmphi.errors import BadRecordError

logger = logging.getLogger(__name__)


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


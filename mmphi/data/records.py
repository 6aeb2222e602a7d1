"""The records every multimodal stage trains on, whatever file format they came from, and the split by image."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

CAPTION_PROMPT = "Write a short caption for the image."


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




def captioned_images(conversations: Sequence[Conversation]) -> list[CaptionedImage]:
    """Caption samples grouped back by image (first-seen order): one `CaptionedImage` with all its captions, named
    in errors as the image (a COCO image entry, a LLaVA record) rather than as its first caption
    (`caption_conversations` names each sample `<image location> caption <k>`)."""
    images: dict[str, CaptionedImage] = {}
    for conversation in conversations:
        if conversation.image is None:
            continue
        location = re.sub(r" caption \d+$", "", conversation.location)
        image = images.setdefault(conversation.image, CaptionedImage(
            conversation.id.rsplit("-", 1)[0], conversation.image, location=location))
        image.captions.append(conversation.turns[0].answer)
    return list(images.values())


def first_images(conversations: Sequence[Conversation], max_images: int) -> list[Conversation]:
    """The samples of the first `max_images` distinct images (text-only samples are kept)."""
    kept: set[str] = set()
    selected = []
    for conversation in conversations:
        if conversation.image is not None and conversation.image not in kept:
            if len(kept) == max_images:
                continue
            kept.add(conversation.image)
        selected.append(conversation)
    return selected

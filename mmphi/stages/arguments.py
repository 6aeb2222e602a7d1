"""The data flags the stages share: where the training data comes from (`DataSourceArguments`, every stage that
reads registered formats) and the held-out data, skips, scan and feature cache of projector and instruct
(`MultimodalDataArguments`), and the sources they name (`sources()`). `mmphi.data.formats` reads any object with
these attributes and that method, so the data package needs nothing from here."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmphi.data.formats import DataSource


@dataclass
class DataSourceArguments:
    """Where a multimodal stage's training data comes from: a file, or a dataset `load_dataset` reads (every stage
    that reads registered formats extends this)."""

    data_path: str | None = field(default=None, metadata={
        "help": "training data file (.json, .jsonl, .parquet; compressed json too), any registered format (COCO "
                "captions, LLaVA, TRL messages)"})
    image_folder: str | None = field(default=None, metadata={
        "help": "folder of the images (default: the file's or dataset folder's; not needed for embedded images)"})
    dataset_name: str | None = field(default=None, metadata={
        "help": "instead of --data_path: a hub dataset id or a local dataset folder, read with datasets.load_dataset"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "the dataset's configuration"})
    train_split: str = field(default="train", metadata={"help": "the --dataset_name split to train on"})
    data_format: str | None = field(
        default=None, metadata={"help": "the format's registered name (default: recognised from the columns)"}
    )

    def __post_init__(self):
        self.source  # noqa: B018 (DataSource refuses both or neither of --data_path and --dataset_name)

    def sources(self) -> list[tuple[DataSource, str | None]]:
        """[(source, its image folder)] to read and to scan (`--validate_data`): here the training data alone, whose
        held-out images are split off it."""
        return [(self.source, self.image_folder)]

    @property
    def source(self) -> DataSource:
        """The training data as a `DataSource`."""
        if self.dataset_name is not None:
            return DataSource(name=self.dataset_name, config=self.dataset_config_name, split=self.train_split)
        return DataSource(path=self.data_path)


@dataclass
class MultimodalDataArguments(DataSourceArguments):
    """The data flags of projector and instruct (each stage subclasses it for its own extras and defaults)."""

    validation_split: str | None = field(default=None, metadata={
        "help": "the --dataset_name split to evaluate on (default: --val_fraction of the training images)"})
    eval_data_path: str | None = field(
        default=None, metadata={"help": "held-out data file; without it --val_fraction of the images"}
    )
    eval_image_folder: str | None = field(default=None, metadata={"help": "images of --eval_data_path"})
    val_fraction: float = field(default=0.02, metadata={"help": "fraction of images held out (split by image)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use at most this many training samples"})
    max_eval_samples: int | None = field(default=500, metadata={"help": "evaluate on at most this many samples"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "processes for tokenising"})
    skip_bad_records: bool = field(
        default=False, metadata={"help": "skip bad records/images (counted and reported) instead of failing"}
    )
    validate_data: bool = field(default=False, metadata={"help": "scan the data (records + images) and exit"})
    cache_vision_features: bool = field(
        default=False, metadata={"help": "run the frozen tower once, store its features, train from them"}
    )
    feature_cache_dir: str | None = field(
        default=None, metadata={"help": "where cached features live (default: $MMPHI_CACHE or ~/.cache/mmphi/"
                                        "vision_features/<tower>-<images>, outside output_dir: never uploaded); "
                                        "instruct given the projector stage's folder reuses its features"}
    )
    feature_cache_batch_size: int = field(default=64, metadata={"help": "images per tower forward while caching"})
    feature_cache_shard_size: int = field(
        default=1024, metadata={"help": "images per cache file; under DDP each process computes every N-th file"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.validation_split is not None and self.dataset_name is None:
            raise ValueError("--validation_split goes with --dataset_name; a file's held-out data is --eval_data_path")

    def sources(self) -> list[tuple[DataSource, str | None]]:
        """[(training source, its image folder), (held-out source, its image folder)?]: the held-out data is a
        dataset split (`--validation_split`) or a file (`--eval_data_path`), else split off the training data."""
        sources = super().sources()
        if self.validation_split is not None:
            held_out = DataSource(name=self.dataset_name, config=self.dataset_config_name, split=self.validation_split)
            sources.append((held_out, self.image_folder))
        if self.eval_data_path:
            sources.append((DataSource(path=self.eval_data_path), self.eval_image_folder))
        return sources


EXPORT_LLAVA_HELP = ("also write the final model as a native transformers Llava folder here (scripts/export_llava.py): "
                     "no remote code, servable by engines that know Llava")


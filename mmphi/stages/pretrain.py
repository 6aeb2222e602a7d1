"""The pretrain stage: a Phi-2 language model (`PhiForCausalLM`) from random initialisation with HF Trainer.

Data: RedPajama-style JSONL (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.zip` of them), split into train/validation by
document, tokenized once (cached), packed into full blocks with EOS between documents, optionally mixed by source.
Every `TrainingArguments` flag works (`--resume_from_checkpoint`, `--report_to tensorboard`, `accelerate launch`).

    # offline, tiny (about 3 minutes of a 2-core CPU; BENCHMARKS.md "Pretrain (tiny)")
    python scripts/prepare_corpus.py --output_dir data/corpus
    python scripts/pretrain.py --config recipes/tiny/pretrain.yaml \
        --train_files data/corpus/cc.jsonl data/corpus/c4.jsonl --output_dir outputs/pretrain
    # real size (one 40 GB GPU; BENCHMARKS.md "Pretrain" for the memory plan)
    python scripts/pretrain.py --config recipes/real/pretrain.yaml --tokenizer_name microsoft/phi-2 \
        --train_files redpajama/c4*.jsonl redpajama/cc*.jsonl --output_dir outputs/pretrain

`--validate_data` scans the corpus files (every record) and exits.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import datasets
import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PhiConfig,
    PhiForCausalLM,
    Trainer,
    set_seed,
)
from transformers.trainer_utils import IntervalStrategy

from configuration_mmphi import PHI2_TEXT_CONFIG, TINY_TEXT_CONFIG
from mmphi import TINY_TOKENIZER
from mmphi.data.corpus import (
    CorpusDataset,
    build_lm_datasets,
    collate_blocks,
    iter_documents,
    parse_source_weights,
)
from mmphi.errors import BadRecordError, SkipReport, validation_exit
from mmphi.training import BuiltStage, FSDPOnCPUMixin, Stage, StageTrainingArguments, apply_speed_options

logger = logging.getLogger(__name__)

CONFIG_PRESETS = {"phi-2": PHI2_TEXT_CONFIG, "tiny": TINY_TEXT_CONFIG}


@dataclass
class ModelArguments:
    config_name: str = field(
        default="tiny",
        metadata={"help": "`phi-2` (the real 2.7B architecture), `tiny` (CPU-trainable), or a path/hub id of a config"},
    )
    tokenizer_name: str = field(
        default=TINY_TOKENIZER,
        metadata={"help": "path or hub id (microsoft/phi-2 when online; the packaged tiny tokenizer offline)"},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "comma-separated key=value applied to the config, e.g. hidden_size=64,num_hidden_layers=2"},
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa, flash_attention_2, ..."})


@dataclass
class DataArguments:
    train_files: list[str] = field(
        default_factory=list, metadata={"help": "RedPajama JSONL files (.jsonl, .jsonl.gz, .jsonl.zst, .zip)"}
    )
    validation_files: list[str] | None = field(default=None, metadata={"help": "held-out files (else a split)"})
    dataset_name: str | None = field(default=None, metadata={
        "help": "instead of --train_files: a hub dataset id or a local dataset folder (datasets.load_dataset), e.g. "
                "cerebras/SlimPajama-627B"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "the dataset's configuration"})
    train_split: str = field(default="train", metadata={"help": "the --dataset_name split to train on"})
    validation_split: str | None = field(default=None, metadata={
        "help": "the --dataset_name split held out (default: --validation_split_percentage of the documents)"})
    text_column_name: str = field(default="text", metadata={"help": "the --dataset_name column holding the text"})
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "percent of training documents held out (by document, never by block)"}
    )
    source_weights: str | None = field(
        default=None,
        metadata={"help": "mix sources, e.g. RedPajamaC4=0.2,RedPajamaCommonCrawl=0.8 (set names, or file names "
                          "with --mix_by file)"},
    )
    mix_by: str = field(
        default="set_name",
        metadata={"help": "what a source is: meta.redpajama_set_name (file name when absent), or the file",
                  "choices": ["set_name", "file"]},
    )
    mixing_stopping_strategy: str = field(
        default="all_exhausted",
        metadata={"help": "interleave_datasets strategy: all_exhausted (oversample small sources) or first_exhausted",
                  "choices": ["all_exhausted", "first_exhausted"]},
    )
    block_size: int = field(default=2048, metadata={"help": "tokens per packed training block"})
    streaming: bool = field(default=False, metadata={"help": "stream the corpus (needs --max_steps)"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "num_proc for tokenizing"})
    skip_bad_records: bool = field(
        default=False, metadata={"help": "skip malformed records (counted and reported) instead of failing"}
    )
    data_cache_dir: str | None = field(default=None, metadata={"help": "where tokenized datasets are cached"})
    validate_data: bool = field(default=False, metadata={"help": "scan the --train_files (every record) and exit"})
    max_eval_blocks: int | None = field(
        default=512, metadata={"help": "evaluate on at most this many held-out blocks, drawn evenly from every source "
                                       "(each reported as eval_<source>_loss); a stream needs a cap"},
    )

    def __post_init__(self):
        if bool(self.train_files) == (self.dataset_name is not None):
            raise ValueError("give exactly one of --train_files (JSONL files) or --dataset_name (a hub id or a "
                             "dataset folder)")

    @property
    def corpus_dataset(self) -> CorpusDataset | None:
        if self.dataset_name is None:
            return None
        return CorpusDataset(self.dataset_name, self.dataset_config_name, self.train_split, self.validation_split,
                             self.text_column_name)


@dataclass
class PretrainTrainingArguments(StageTrainingArguments):
    """Stage defaults plus what from-scratch pretraining wants: periodic held-out loss, AdamW betas of LM practice."""

    output_dir: str = field(default="outputs/pretrain")
    eval_strategy: str = field(default="steps")
    eval_steps: float | None = field(default=200)
    save_steps: float = field(default=500)
    learning_rate: float = field(default=3e-4)
    weight_decay: float = field(default=0.1)
    adam_beta2: float = field(default=0.95)
    include_num_input_tokens_seen: str | bool = field(default=True)  # -> "all": tokens/s in the logs
    # Same default as common's, but typed as TrainingArguments types it: HfArgumentParser rejects `str | list | None`.
    report_to: None | str | list[str] = field(default="none")


def parse_overrides(overrides: str | None) -> dict:
    """`"hidden_size=64,resid_pdrop=0.1,qk_layernorm=true"` -> typed dict (JSON literals, else strings)."""
    parsed = {}
    for item in (overrides or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--config_overrides: cannot read {item!r}; expected key=value")
        try:
            parsed[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key.strip()] = value
    return parsed


def build_config(config_name: str, overrides: str | None = None) -> PhiConfig:
    """A preset (`phi-2`, `tiny`) written out in the repo, or any Phi config path/hub id. Overrides go in before the
    config is built, so a preset's derived values follow them (num_key_value_heads after num_attention_heads)."""
    if config_name in CONFIG_PRESETS:
        base = dict(CONFIG_PRESETS[config_name])
    else:
        loaded = AutoConfig.from_pretrained(config_name)
        if not isinstance(loaded, PhiConfig):
            raise ValueError(f"{config_name}: a {type(loaded).__name__}; the pretrain stage trains PhiForCausalLM "
                             "(a phi config)")
        base = loaded.to_dict()
    return PhiConfig(**{**base, **parse_overrides(overrides)})


def count_parameters(config: PhiConfig) -> int:
    """Parameter count without allocating anything (the 2.7B model is built on the meta device)."""
    with torch.device("meta"):
        model = PhiForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def align_config_with_tokenizer(config: PhiConfig, tokenizer, block_size: int) -> None:
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the config's vocab_size is "
                         f"{config.vocab_size}: use a larger vocab_size (--config_overrides vocab_size=N)")
    if block_size > config.max_position_embeddings:
        raise ValueError(f"--block_size {block_size} exceeds max_position_embeddings {config.max_position_embeddings}")
    config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    config.eos_token_id = tokenizer.eos_token_id


class PretrainTrainer(FSDPOnCPUMixin, Trainer):
    """Trainer that evaluates each source's held-out blocks apart (`eval_<source>_loss`; `eval_loss` is their mean
    over all blocks) and reports held-out perplexity (exp of the mean held-out loss) next to every eval loss."""

    def __init__(self, *args, eval_by_source: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_by_source = eval_by_source or {}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if eval_dataset is not None or len(self.eval_by_source) < 2:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics, blocks, total = {}, 0, 0.0
        for source, dataset in self.eval_by_source.items():
            result = super().evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{source}")
            metrics.update(result)
            count = len(dataset) if hasattr(dataset, "__len__") else 1  # a stream: its sources count alike
            blocks, total = blocks + count, total + count * result[f"{metric_key_prefix}_{source}_loss"]
        overall = {f"{metric_key_prefix}_loss": total / blocks, f"{metric_key_prefix}_blocks": blocks}
        self.log(overall)
        return {**metrics, **overall}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for key in [k for k in logs if k.endswith("eval_loss") or k.startswith("eval_") and k.endswith("_loss")]:
            logs[key.replace("_loss", "_perplexity")] = math.exp(logs[key]) if logs[key] < 700 else math.inf
        super().log(logs, start_time)


def sample_eval_blocks(by_source: dict, max_blocks: int | None, streaming: bool) -> dict:
    """At most `max_blocks` held-out blocks in all, shared evenly by the sources and spread evenly over each source
    (not its first blocks: a source's first file is not the source)."""
    if max_blocks is None:
        if streaming:
            raise ValueError("--streaming needs --max_eval_blocks (a stream has no end to evaluate up to)")
        return by_source
    per_source = max(1, max_blocks // max(1, len(by_source)))
    if streaming:
        return {name: blocks.take(per_source) for name, blocks in by_source.items()}
    sampled = {}
    for name, blocks in by_source.items():
        picks = sorted({round(i * (len(blocks) - 1) / max(1, per_source - 1)) for i in range(per_source)})
        sampled[name] = blocks.select(picks[: len(blocks)])
    return sampled


def build_trainer(model_args: ModelArguments, data_args: DataArguments,
                  training_args: PretrainTrainingArguments) -> BuiltStage:
    """A random-init PhiForCausalLM, the packed corpus blocks and the Trainer that pretrains it."""
    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps (a stream has no length to count epochs by)")
    set_seed(training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
    config = build_config(model_args.config_name, model_args.config_overrides)
    align_config_with_tokenizer(config, tokenizer, data_args.block_size)

    with training_args.main_process_first(desc="tokenizing and packing"):
        data = build_lm_datasets(
            data_args.train_files, tokenizer, data_args.block_size, data_args.validation_files,
            data_args.validation_split_percentage, parse_source_weights(data_args.source_weights), data_args.mix_by,
            data_args.mixing_stopping_strategy, data_args.streaming, data_args.preprocessing_num_workers,
            data_args.skip_bad_records, data_args.data_cache_dir, training_args.seed, data_args.corpus_dataset,
        )
    if data.skip_report.total:
        logger.warning(data.skip_report.summary())
    eval_by_source = sample_eval_blocks(data.eval_by_source, data_args.max_eval_blocks, data_args.streaming) \
        if data.eval is not None else {}
    eval_dataset = None
    if eval_by_source:  # one source: the plain `eval_loss`; several: also `eval_<source>_loss` each
        parts = list(eval_by_source.values())
        eval_dataset = parts[0] if len(parts) == 1 else (
            datasets.interleave_datasets(parts) if data_args.streaming else datasets.concatenate_datasets(parts))
    if eval_dataset is None:
        training_args.eval_strategy = IntervalStrategy.NO

    config._attn_implementation = model_args.attn_implementation
    model = apply_speed_options(PhiForCausalLM(config), training_args)  # random init (seeded above)
    logger.info("PhiForCausalLM with %.1fM parameters; training sources: %s",
                sum(p.numel() for p in model.parameters()) / 1e6, data.sources or "streamed")

    trainer = PretrainTrainer(
        model=model, args=training_args, train_dataset=data.train, eval_dataset=eval_dataset,
        data_collator=collate_blocks, processing_class=tokenizer, eval_by_source=eval_by_source,
    )
    return BuiltStage(trainer, model, tokenizer, collate_blocks, data.train, eval_dataset, [data.skip_report],
                      [name for name, _ in model.named_parameters()])


def validate_corpus(data_args: DataArguments) -> int:
    """`--validate_data`: read every record of the training and validation files; exit status 0 when all are good."""
    if data_args.dataset_name is not None:
        raise ValueError("--validate_data scans --train_files; a --dataset_name is read by datasets itself")
    status = 0
    for path in [*data_args.train_files, *(data_args.validation_files or [])]:
        report = SkipReport()
        try:
            good = sum(1 for _ in iter_documents(path, True, report, data_args.mix_by))
        except BadRecordError as error:  # a truncated or corrupt archive: nothing after it can be read
            print(error)
            status = 1
            continue
        status = max(status, validation_exit(path, good, report))
    return status


STAGE = Stage("pretrain", (ModelArguments, DataArguments, PretrainTrainingArguments), build_trainer, validate_corpus)
parse_args = STAGE.parse_args
main = STAGE.main

if __name__ == "__main__":
    from mmphi.errors import run_command

    run_command(main)

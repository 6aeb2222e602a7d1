"""Train the tiny default tokenizer: a deterministic byte-level BPE on the demo corpus, saved as a transformers
fast tokenizer (loads with `AutoTokenizer.from_pretrained(dir)`, offline).

GPT-2 style: byte-level pre-tokenizer with GPT-2's split regex, no prefix space, byte-level decoder; one special token
`<|endoftext|>` serves as bos, eos and unk (as in Phi-2). The vocabulary (4000) leaves room under the tiny text
model's 4096 embeddings for the processor's `<image>` and `<pad>`.

Usage:
    python scripts/prepare_corpus.py --output_dir data/corpus
    python scripts/train_tokenizer.py --train_files data/corpus/cc.jsonl data/corpus/c4.jsonl \
        --output_dir mmphi/assets/tiny-tokenizer
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mmphi.data.corpus import iter_jsonl_records

EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4000
DEFAULT_OUTPUT_DIR = "mmphi/assets/tiny-tokenizer"


def iter_texts(files: list[str], skip_bad_records: bool = False) -> Iterator[str]:
    for path in files:
        for record in iter_jsonl_records(path, skip_bad_records=skip_bad_records):
            yield record["text"]


def build_bpe_tokenizer(texts: Iterator[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                        min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE; training is deterministic for a fixed input order (ties break on the pair ordering)."""
    tokenizer = Tokenizer(models.BPE())  # no unk: byte-level covers every input
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is ever unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def wrap_for_transformers(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(train_files: list[str], output_dir: str = DEFAULT_OUTPUT_DIR,
                    vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    hf_tokenizer = wrap_for_transformers(build_bpe_tokenizer(iter_texts(train_files), vocab_size))
    hf_tokenizer.save_pretrained(output_dir)
    return hf_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_files", nargs="+", default=["data/corpus/cc.jsonl", "data/corpus/c4.jsonl"])
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)
    tokenizer = train_tokenizer(args.train_files, args.output_dir, args.vocab_size)
    print(f"saved {type(tokenizer).__name__} with {len(tokenizer)} tokens to {args.output_dir}")


if __name__ == "__main__":
    from mmphi.errors import run_command

    run_command(main)

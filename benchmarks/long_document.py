"""One very long pretraining document through the corpus tokenisation: in pieces (`tokenize_documents`) or in one
tokenizer call, with the time and peak RSS of this process.

    python -m benchmarks.long_document --mode pieces     # and --mode whole, in another process
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time

from transformers import AutoTokenizer

from mmphi import TINY_TOKENIZER
from mmphi.data.corpus import tokenize_documents

WORDS = ["the", "whale", "swam", "across", "a", "grey", "sea", "while", "sailors", "watched", "from", "the", "deck",
         "and", "sang", "of", "home"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["pieces", "whole"], required=True)
    parser.add_argument("--megabytes", type=int, default=30)
    parser.add_argument("--tokenizer", default=TINY_TOKENIZER)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rng = random.Random(0)
    chars = args.megabytes * 1_000_000
    text = " ".join(rng.choice(WORDS) for _ in range(chars // 4))[:chars]
    started = time.perf_counter()
    if args.mode == "whole":
        ids = tokenizer([text], add_special_tokens=False, verbose=False)["input_ids"][0]
    else:
        ids = tokenize_documents({"text": [text]}, tokenizer, tokenizer.eos_token_id)["input_ids"][0][:-1]
    result = {"mode": args.mode, "chars": len(text), "tokens": len(ids),
              "seconds": round(time.perf_counter() - started, 1),
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

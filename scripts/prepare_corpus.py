"""Write a small real English corpus in RedPajama JSONL format for the offline demo and the tiny tokenizer.

Thin command line; the code is mmphi/data/npm_corpus.py (`--help` lists the flags).
"""

from mmphi.data.npm_corpus import main
from mmphi.errors import run_command

if __name__ == "__main__":
    run_command(main)

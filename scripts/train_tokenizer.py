"""Train the tiny default tokenizer: a deterministic byte-level BPE on the demo corpus, saved as a transformers.

Thin command line; the code is mmphi/tokenizer.py (`--help` lists the flags).
"""

from mmphi.errors import run_command
from mmphi.tokenizer import main

if __name__ == "__main__":
    run_command(main)

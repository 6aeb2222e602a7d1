"""Merge an instruct LoRA adapter (with its trained projector) into its base: a full MM-Phi folder.

Thin command line; the code is mmphi/merge.py (`--help` lists the flags).
"""

from mmphi.errors import run_command
from mmphi.merge import main

if __name__ == "__main__":
    run_command(main)

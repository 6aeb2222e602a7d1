"""Evaluate an MM-Phi folder (or a base + PEFT adapter) offline; scores go to a JSON file and stdout.

Thin command line; the code is mmphi/evaluation.py (`--help` lists the flags).
"""

from mmphi.errors import run_command
from mmphi.evaluation import main

if __name__ == "__main__":
    run_command(main)

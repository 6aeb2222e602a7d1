"""Instruct: instruction tuning on LLaVA-Instruct conversations with TRL's SFTTrainer (QLoRA by default).

Thin command line; the code is mmphi/stages/instruct.py (`--help` lists the flags).
"""

from mmphi.errors import run_command
from mmphi.stages.instruct import main

if __name__ == "__main__":
    run_command(main)

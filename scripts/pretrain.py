"""Pretrain: a Phi-2 language model (`PhiForCausalLM`) from random initialisation with HF Trainer.

Thin command line; the code is mmphi/stages/pretrain.py (`--help` lists the flags).
"""

from mmphi.errors import run_command
from mmphi.stages.pretrain import main

if __name__ == "__main__":
    run_command(main)

"""Share an MM-Phi folder on the Hugging Face Hub with a generated model card.

Thin command line; the code is mmphi/hub.py (`--help` lists the flags).
"""

from mmphi.errors import run_command
from mmphi.hub import main

if __name__ == "__main__":
    run_command(main)

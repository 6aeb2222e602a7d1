"""Export an MM-Phi folder as a native transformers Llava checkpoint (no remote code).

Thin command line; the code is mmphi/export.py (`--help` lists the flags).
"""

from mmphi.errors import run_command
from mmphi.export import main

if __name__ == "__main__":
    run_command(main)

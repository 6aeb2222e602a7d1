"""`make demo`: the seed's whole pipeline at tiny scale, offline, on CPU.

Thin command line; the code is mmphi/demo.py (`--help` lists the flags).
"""

from mmphi.demo import main
from mmphi.errors import run_command

if __name__ == "__main__":
    run_command(main)

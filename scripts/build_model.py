"""Build an MM-Phi folder (model + processor + code) from components, or the tiny offline default.

Thin command line; the code is mmphi/build.py (`--help` lists the flags).
"""

from mmphi.build import main
from mmphi.errors import run_command

if __name__ == "__main__":
    run_command(main)

"""Chat with an MM-Phi folder from the command line: one question, an interactive conversation, or a batch file.

Thin command line; the code is mmphi/chat.py (`--help` lists the flags).
"""

from mmphi.chat import main
from mmphi.errors import run_command

if __name__ == "__main__":
    run_command(main)

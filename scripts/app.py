"""A Gradio chat app for an MM-Phi folder: an image, a typed or spoken question (upload or microphone), the.

Thin command line; the code is mmphi/app.py (`--help` lists the flags).
"""

from mmphi.app import main
from mmphi.errors import run_command

if __name__ == "__main__":
    run_command(main)

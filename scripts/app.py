"""A Gradio chat app for an MM-Phi folder: an image, a typed or spoken question (upload or microphone), the.

Thin command line; the code is mmphi/app.py (`--help` lists the flags).
"""

from mmphi.app import main

if __name__ == "__main__":
    main()

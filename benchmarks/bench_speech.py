"""Speech benchmark: transcription time per second of audio, and loading Whisper once vs on every call (the seed's way).

Thin command line; the code is mmphi/bench/speech.py (`--help` lists the flags).
"""

from mmphi.bench.speech import main

if __name__ == "__main__":
    main()

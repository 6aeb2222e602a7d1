"""Chat with an MM-Phi folder from the command line: one question, an interactive conversation, or a batch file.

    python scripts/chat.py --model outputs/mmphi --image cat.jpg "What is the cat doing?"
    python scripts/chat.py --model outputs/mmphi --image shapes.png --audio question.wav
    python scripts/chat.py --model outputs/mmphi --image shapes.png --interactive
    python scripts/chat.py --model outputs/mmphi --batch requests.jsonl --output answers.jsonl

The answer streams as it is generated. With audio, the spoken question is transcribed (Whisper; `--speech_model`) and
the transcript is printed first. Without a prompt, audio or --batch, the chat is interactive; type /help there.
`--batch`: one JSON object per line, {"image": PATH, "audio": PATH, "prompt": TEXT, "id": ANY} (all optional, but a
prompt or audio is needed); answers are written as JSONL (each request's fields plus "transcript" and "answer") to
--output or stdout, generated --batch_size at a time with left-padded batched generation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from transformers import set_seed

from mmphi import inference

HELP = """Commands:
  /image PATH   attach an image to your next message
  /audio PATH   ask your next question by voice (a WAV/MP3/... file); type an extra prompt or just press Enter
  /reset        start a new conversation
  /help         this text
  /quit         leave (or Ctrl-D)"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="", help="the question (omit for the interactive chat)")
    parser.add_argument("--image", help="image for the (first) question")
    parser.add_argument("--audio", help="spoken question for the (first) turn; the transcript is printed")
    parser.add_argument("--interactive", action="store_true", help="keep chatting after the first answer")
    parser.add_argument("--batch", help="JSONL file of requests: {image, audio, prompt, id} per line")
    parser.add_argument("--output", help="with --batch: write the answers here (JSONL) instead of stdout")
    parser.add_argument("--batch_size", type=int, default=8)
    inference.add_model_arguments(parser)
    inference.add_generation_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_stream", action="store_true", help="print each answer when it is complete")
    args = parser.parse_args(argv)
    if args.batch and (args.prompt or args.image or args.audio or args.interactive):
        parser.error("--batch takes its requests from the file: no prompt, --image, --audio or --interactive")
    if args.output and not args.batch:
        parser.error("--output goes with --batch")
    return args


def print_transcript(transcript: str | None) -> None:
    if transcript is not None:
        print(f"Transcript: {transcript or '(no speech detected)'}", flush=True)


def answer_and_print(model, processor, conversation, turn, options, transcriber, stream: bool, prefix="") -> None:
    """Transcribe (if audio), print the transcript, then the answer (streamed token by token unless disabled)."""
    inputs, (transcript,) = inference.prepare_inputs(processor, [conversation], [turn], transcriber)
    print_transcript(transcript)
    print(prefix, end="", flush=True)
    streamer = inference.ConsoleStreamer(processor.tokenizer) if stream else None
    (answer,) = inference.generate_answers(model, processor, inputs, options, streamer=streamer)
    if not stream:
        print(answer, flush=True)
    conversation.commit(turn, transcript, answer)


def run_batch(args, requests, model, processor, options, transcriber) -> None:
    turns = [request.turn for request in requests]
    answers = inference.answer_batch(model, processor, turns, options, transcriber, batch_size=args.batch_size)
    lines = [
        json.dumps({"line": r.line, **r.record, "transcript": a.transcript, "answer": a.text}, ensure_ascii=False)
        for r, a in zip(requests, answers, strict=True)
    ]
    if not args.output:
        print("\n".join(lines), flush=True)
        return
    with open(args.output, "w", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    print(f"wrote {len(answers)} answers to {args.output}", file=sys.stderr)


def interactive(args, model, processor, options, transcriber, first_turn: inference.ChatTurn | None) -> None:
    """A multi-turn chat on stdin/stdout. History goes through the chat template; each /image attaches to the next
    message (earlier images stay in the context)."""
    conversation = inference.Chat()
    image, audio = args.image, args.audio
    print(f"MM-Phi chat ({args.model}). /help for commands.", file=sys.stderr)
    if first_turn is not None:
        print(f"User: {first_turn.prompt}")
        stream = not args.no_stream
        answer_and_print(model, processor, conversation, first_turn, options, transcriber, stream, "Assistant: ")
        image = audio = None
    while True:
        try:
            line = input("User: ").strip()
        except EOFError:
            print()
            return
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/help":
            print(HELP)
            continue
        if command == "/reset":
            conversation.reset()
            image = audio = None
            print("(new conversation)")
            continue
        if command in ("/image", "/audio"):
            path = argument.strip()
            if not os.path.isfile(path):
                print(f"No such file: {path!r}")
                continue
            if command == "/image":
                image = path
            else:
                audio = path
            print(f"({command[1:]} attached to your next message: {path})")
            continue
        if not line and audio is None:
            continue
        try:
            turn = inference.ChatTurn(line, image=image, audio=audio)
            stream = not args.no_stream
            answer_and_print(model, processor, conversation, turn, options, transcriber, stream, "Assistant: ")
        except ValueError as error:  # bad image/audio, context full: report and keep the session
            print(f"\nError: {error}")
            continue
        image = audio = None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    set_seed(args.seed)
    options = inference.generation_options(args)
    options.generate_kwargs()  # fail on bad flags before loading anything
    requests = inference.read_requests(args.batch) if args.batch else None  # bad lines fail before loading
    first_turn = None
    if args.prompt or args.audio:
        first_turn = inference.ChatTurn(args.prompt, image=args.image, audio=args.audio)

    model, processor = inference.load_from_arguments(args)
    transcriber = inference.LazyTranscriber(processor, args.speech_model)

    if args.batch:
        run_batch(args, requests, model, processor, options, transcriber)
    elif first_turn is not None and not args.interactive:
        answer_and_print(model, processor, inference.Chat(), first_turn, options, transcriber,
                         not args.no_stream)
    else:
        interactive(args, model, processor, options, transcriber, first_turn)


if __name__ == "__main__":
    main()

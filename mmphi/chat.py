"""Chat with an MM-Phi folder from the command line: one question, an interactive conversation, or a batch file.

    python scripts/chat.py --model outputs/mmphi --image cat.jpg "What is the cat doing?"
    python scripts/chat.py --model outputs/mmphi --image shapes.png --audio question.wav
    python scripts/chat.py --model outputs/mmphi --image shapes.png --interactive
    python scripts/chat.py --model outputs/mmphi --batch requests.jsonl --output answers.jsonl
    python scripts/chat.py --model you/mmphi --image https://example.com/a.jpg --image b.png "Which is bigger?"
    python scripts/chat.py --model outputs/projector --adapter outputs/instruct --question_file questions.jsonl \
        --image_folder coco/val2014 --answers_file answers.jsonl

The answer streams as it is generated. With audio, the spoken question is transcribed (Whisper; `--speech_model`) and
the transcript is printed first. Without a prompt, audio or --batch, the chat is interactive; type /help there.
`--batch`: one JSON object per line, {"image": PATH, "audio": PATH, "prompt": TEXT, "id": ANY} (all optional, but a
prompt or audio is needed); answers are written as JSONL (each request's fields plus "transcript" and "answer") to
--output or stdout, generated --batch_size at a time with left-padded batched generation.
`--question_file`: LLaVA's question format (`{"question_id", "image", "text"}` per line, images under
--image_folder), answered into --answers_file as LLaVA's `model_vqa` writes it (`{"question_id", "prompt", "text",
"answer_id", "model_id", "metadata"}`). `--model` is a folder or a hub id; `--adapter` runs an instruct LoRA adapter on
top of it unmerged; images are paths or URLs, several per question in order (one `<image>` each).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid

from transformers import set_seed

from mmphi import inference

HELP = """Commands:
  /image PATH   attach an image (a path or URL) to your next message; repeat for several
  /audio PATH   ask your next question by voice (a WAV/MP3/... file); type an extra prompt or just press Enter
  /reset        start a new conversation
  /help         this text
  /quit         leave (or Ctrl-D)"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="", help="the question (omit for the interactive chat)")
    parser.add_argument("--image", action="append", default=[],
                        help="image (path or URL) for the (first) question; repeat for several, in order")
    parser.add_argument("--audio", help="spoken question for the (first) turn; the transcript is printed")
    parser.add_argument("--interactive", action="store_true", help="keep chatting after the first answer")
    parser.add_argument("--batch", help="JSONL file of requests: {image, audio, prompt, id} per line")
    parser.add_argument("--output", help="with --batch: write the answers here (JSONL) instead of stdout")
    parser.add_argument("--question_file", help="LLaVA question file (JSONL: question_id, image, text)")
    parser.add_argument("--image_folder", help="with --question_file: where its images are (default: its folder)")
    parser.add_argument("--answers_file", help="with --question_file: the answers, as LLaVA's model_vqa writes them")
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
    if bool(args.question_file) != bool(args.answers_file):
        parser.error("--question_file and --answers_file go together")
    if args.question_file and (args.batch or args.prompt or args.image or args.audio or args.interactive):
        parser.error("--question_file takes its questions from the file: no prompt, --image, --audio, --batch or "
                     "--interactive")
    if args.image_folder and not args.question_file:
        parser.error("--image_folder goes with --question_file")
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


def run_questions(args, questions, model, processor, options) -> None:
    """LLaVA's model_vqa: one answer line per question, in the question file's order."""
    answers = inference.answer_batch(model, processor, [q.turn for q in questions], options,
                                     batch_size=args.batch_size)
    model_id = os.path.basename(os.path.normpath(args.adapter or args.model))
    os.makedirs(os.path.dirname(os.path.abspath(args.answers_file)), exist_ok=True)
    with open(args.answers_file, "w", encoding="utf-8") as out:
        for question, answer in zip(questions, answers, strict=True):
            out.write(json.dumps({"question_id": question.record["question_id"], "prompt": question.record["text"],
                                  "text": answer.text, "answer_id": uuid.uuid4().hex, "model_id": model_id,
                                  "metadata": {}}, ensure_ascii=False) + "\n")
    print(f"wrote {len(answers)} answers to {args.answers_file}", file=sys.stderr)


def interactive(args, model, processor, options, transcriber, first_turn: inference.ChatTurn | None) -> None:
    """A multi-turn chat on stdin/stdout. History goes through the chat template; each /image attaches to the next
    message, and a message with a new image starts a new conversation (`Chat.needs_new_conversation`)."""
    conversation = inference.Chat()
    images, audio = list(args.image), args.audio
    print(f"MM-Phi chat ({args.model}). /help for commands.", file=sys.stderr)
    if first_turn is not None:
        print(f"User: {first_turn.prompt}")
        stream = not args.no_stream
        answer_and_print(model, processor, conversation, first_turn, options, transcriber, stream, "Assistant: ")
        images, audio = [], None
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
            images, audio = [], None
            print("(new conversation)")
            continue
        if command in ("/image", "/audio"):
            path = argument.strip()
            if not os.path.isfile(path) and not (command == "/image" and path.startswith(inference.URL_PREFIXES)):
                print(f"No such file: {path!r}")
                continue
            if command == "/image":
                images.append(path)
            else:
                audio = path
            print(f"({command[1:]} attached to your next message: {path})")
            continue
        if not line and audio is None:
            continue
        try:
            turn = inference.ChatTurn(line, image=images, audio=audio)
            if conversation.needs_new_conversation(turn):
                conversation.reset()
                print("(new image: a new conversation; the model answers about one image at a time)")
            stream = not args.no_stream
            answer_and_print(model, processor, conversation, turn, options, transcriber, stream, "Assistant: ")
        except ValueError as error:  # bad image/audio, context full: report and keep the session
            print(f"\nError: {error}")
            continue
        images, audio = [], None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    set_seed(args.seed)
    options = inference.generation_options(args)
    options.generate_kwargs()  # fail on bad flags before loading anything
    requests = inference.read_requests(args.batch) if args.batch else None  # bad lines fail before loading
    questions = inference.read_questions(args.question_file, args.image_folder) if args.question_file else None
    first_turn = None
    if args.prompt or args.audio:
        first_turn = inference.ChatTurn(args.prompt, image=args.image, audio=args.audio)

    model, processor = inference.load_from_arguments(args)
    transcriber = inference.LazyTranscriber(processor, args.speech_model)

    if args.batch:
        run_batch(args, requests, model, processor, options, transcriber)
    elif questions:
        run_questions(args, questions, model, processor, options)
    elif first_turn is not None and not args.interactive:
        answer_and_print(model, processor, inference.Chat(), first_turn, options, transcriber,
                         not args.no_stream)
    else:
        interactive(args, model, processor, options, transcriber, first_turn)


if __name__ == "__main__":
    from mmphi.errors import run_command

    run_command(main)

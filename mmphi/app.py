"""A Gradio chat app for an MM-Phi folder: an image, a typed or spoken question (upload or microphone), the
transcript, and the answer streamed into a multi-turn chat.

    python scripts/app.py --model outputs/mmphi                 # http://127.0.0.1:7860
    python scripts/app.py --model outputs/mmphi --host 0.0.0.0 --port 8080 --load_in_4bit

An image stays in the conversation once sent and is shown in the chat; a new image starts a new conversation (the
model answers about one image at a time), and the page says so.
Each spoken question is transcribed by Whisper (`--speech_model`; the offline tiny.en when installed) and the
transcript joins the prompt as text. "Regenerate" answers the last question again (with the current generation
settings), "Undo" takes the last exchange back, "New chat" clears the history; the examples fill in an image and a
question (`--examples FILE.jsonl`, lines `{"image", "prompt"}`; default: two drawn shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass, field

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the app must work offline

import gradio as gr

from mmphi import inference
from mmphi.inference import Chat, ChatTurn, GenerationOptions

EMPTY_ANSWER = "(the model ended its answer without any text)"


@dataclass
class Session:
    """Per-browser-session state: the model-side conversation, the image already sent (not re-sent each turn), and
    the answered questions, each with the image that was current before it (for Regenerate and Undo)."""

    conversation: Chat = field(default_factory=Chat)
    sent_image: str | None = None
    answered: list = field(default_factory=list)  # (ChatTurn, sent_image before it)

    def take_back(self) -> ChatTurn:
        """Forget the last exchange (model history too); returns its question."""
        if not self.answered:
            raise gr.Error("Nothing to take back: ask a question first.")
        turn, self.sent_image = self.answered.pop()
        self.conversation.undo()
        return turn


def default_examples() -> list[list[str]]:
    """Two drawn shapes with a question each (written once to a temporary folder)."""
    from PIL import Image, ImageDraw

    folder = tempfile.mkdtemp(prefix="mmphi-app-examples-")
    examples = []
    for name, colour, shape, question in (("red-circle", "red", "ellipse", "What colour is the shape?"),
                                          ("blue-square", "blue", "rectangle", "What shape is it?")):
        image = Image.new("RGB", (224, 224), "white")
        getattr(ImageDraw.Draw(image), shape)((50, 50, 170, 170), fill=colour)
        path = os.path.join(folder, f"{name}.png")
        image.save(path)
        examples.append([path, question])
    return examples


def read_examples(path: str) -> list[list[str]]:
    """`--examples FILE.jsonl`: `{"image": PATH, "prompt": TEXT}` per line; images relative to the file."""
    base = os.path.dirname(os.path.abspath(path))
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                record = json.loads(line)
                image = os.path.join(base, record["image"])
                if not os.path.isfile(image):
                    raise FileNotFoundError(f"{path}, line {number}: image file not found: {record['image']}")
                examples.append([image, record.get("prompt", "")])
    return examples


NEW_CONVERSATION = "New image: a new conversation (the model answers about one image at a time)."


def user_bubble(turn: ChatTurn, transcript: str | None, image_path: str | None = None):
    """The user's message in the chat: the image it brought (if any), then the question."""
    question = turn.question(transcript) if transcript is not None else turn.prompt
    spoken = "(spoken) " if turn.audio is not None else ""
    text = spoken + (question or "…")
    return [{"path": image_path}, text] if turn.images and image_path else text


def build_app(model, processor, options: GenerationOptions | None = None, speech_model: str | None = None,
              examples: list[list[str]] | None = None):
    """The Blocks app around a loaded model and processor (the speech model loads at the first spoken question)."""
    options = options or GenerationOptions()
    transcriber = inference.LazyTranscriber(processor, speech_model)
    examples = default_examples() if examples is None else examples

    def respond(prompt, image_path, audio_path, history, session, max_new_tokens, do_sample, temperature, top_p):
        new_image = image_path if image_path and image_path != session.sent_image else None
        try:
            turn = ChatTurn(prompt or "", image=new_image, audio=audio_path)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        settings = (max_new_tokens, do_sample, temperature, top_p)
        history = list(history or [])
        if session.conversation.needs_new_conversation(turn):  # the chat restarts, as the model's context does
            session, history = Session(), []
            gr.Info(NEW_CONVERSATION)
        yield from answer(turn, image_path, history, session, settings)

    def answer(turn, image_path, history, session, settings):
        """Stream the answer to `turn` into the chat; record it in the session once complete."""
        max_new_tokens, do_sample, temperature, top_p = settings
        history.append({"role": "user", "content": user_bubble(turn, None, image_path)})
        transcript_box = "(transcribing…)" if turn.audio is not None else ""
        yield history, session, transcript_box, "", None
        turn_options = GenerationOptions(int(max_new_tokens), bool(do_sample), float(temperature), float(top_p))
        try:
            inputs, (transcript,) = inference.prepare_inputs(processor, [session.conversation], [turn], transcriber)
            history[-1]["content"] = user_bubble(turn, transcript, image_path)
            if transcript is not None:
                transcript_box = transcript or "(no speech detected)"
            history.append({"role": "assistant", "content": ""})
            text = ""
            for text in inference.stream_answer(model, processor, inputs, turn_options):
                history[-1]["content"] = text
                yield history, session, transcript_box, "", None
        except ValueError as error:  # unreadable audio/image, full context: shown in the page, session kept
            raise gr.Error(str(error)) from error
        if not text:
            history[-1]["content"] = EMPTY_ANSWER
        session.conversation.commit(turn, transcript, text)
        session.answered.append((turn, session.sent_image))
        session.sent_image = image_path or session.sent_image
        yield history, session, transcript_box, "", None

    def undo(history, session):
        """Take the last exchange back (chat and model history); its image counts as not sent."""
        session.take_back()
        return list(history or [])[:-2], session

    def regenerate(history, session, max_new_tokens, do_sample, temperature, top_p):
        """The last question again, answered with the current generation settings."""
        image = session.sent_image
        turn = session.take_back()
        settings = (max_new_tokens, do_sample, temperature, top_p)
        yield from answer(turn, image, list(history or [])[:-2], session, settings)

    def new_chat():
        return [], Session(), "", "", None, None

    with gr.Blocks(title="MM-Phi", analytics_enabled=False) as app:
        gr.Markdown("## MM-Phi\nAsk about an image by typing or by voice.")
        session = gr.State(Session())
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", format="png", label="Image", elem_id="image")
                audio = gr.Audio(
                    sources=["upload", "microphone"], type="filepath", label="Spoken question", elem_id="audio"
                )
                transcript = gr.Textbox(label="Transcript", interactive=False, elem_id="transcript")
                with gr.Accordion("Generation", open=False):
                    max_new_tokens = gr.Slider(1, 1024, value=options.max_new_tokens, step=1, label="Max new tokens")
                    do_sample = gr.Checkbox(value=options.do_sample, label="Sample (off: greedy)")
                    temperature = gr.Slider(0.05, 2.0, value=options.temperature, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=options.top_p, label="Top-p")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=420)
                prompt = gr.Textbox(
                    label="Question", placeholder="Ask about the image (or record/upload a question)", elem_id="prompt"
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    regenerate_button = gr.Button("Regenerate", elem_id="regenerate")
                    undo_button = gr.Button("Undo", elem_id="undo")
                    clear = gr.Button("New chat", elem_id="new-chat")
                if examples:
                    gr.Examples(examples, inputs=[image, prompt], label="Examples", elem_id="examples")
        settings = [max_new_tokens, do_sample, temperature, top_p]
        inputs = [prompt, image, audio, chatbot, session, *settings]
        outputs = [chatbot, session, transcript, prompt, audio]
        # One generation at a time across the triggers and all sessions: they share one model (and one CPU).
        send.click(respond, inputs, outputs, concurrency_limit=1, concurrency_id="generate")
        prompt.submit(respond, inputs, outputs, concurrency_limit=1, concurrency_id="generate")
        regenerate_button.click(regenerate, [chatbot, session, *settings], outputs, concurrency_limit=1,
                                concurrency_id="generate")
        undo_button.click(undo, [chatbot, session], [chatbot, session])
        clear.click(new_chat, None, [chatbot, session, transcript, prompt, audio, image])
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    inference.add_model_arguments(parser)
    inference.add_generation_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="a public gradio.live link (needs internet)")
    parser.add_argument("--examples", help='JSONL of {"image", "prompt"} examples (default: two drawn shapes)')
    args = parser.parse_args(argv)
    options = inference.generation_options(args)
    options.generate_kwargs()  # fail on bad flags before loading anything
    model, processor = inference.load_from_arguments(args)
    examples = read_examples(args.examples) if args.examples else None
    app = build_app(model, processor, options, args.speech_model, examples)
    app.queue().launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    from mmphi.errors import run_command

    run_command(main)

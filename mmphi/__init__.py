"""MM-Phi's library: everything the stages, the command lines and the demo share (the benchmarks in the repository's
benchmarks/ import it too).

The model files (configuration_mmphi.py, modeling_mmphi.py, processing_mmphi.py, speech_mmphi.py) stay at the top
level of the repository because they travel with the weights (`trust_remote_code`); they import nothing from here.

| module | job |
| --- | --- |
| `errors` | bad input: `BadRecordError`, counted skips (`SkipReport`), the `--validate_data` exit |
| `data` | dataset formats (one registry), images, encoding + collator, feature cache, pretrain corpus, synthetic data |
| `training` | the one stage skeleton (`Stage`), stage defaults, `--config` parsing, the run record |
| `stages` | one module per stage (argument dataclasses, `build_trainer`, `main`); `arguments`: their data flags |
| `recipes` | finds the recipe files (`recipes/<size>/<stage>.yaml`) |
| `build`, `loading` | building an MM-Phi folder; loading one (dtype, quantization, adapter), merging an adapter |
| `inference`, `chat`, `app` | generation, the command-line chat, the Gradio app |
| `evaluation`, `metrics` | scoring a model (VQA, captions, perplexity) |
| `hub`, `plots`, `tokenizer`, `demo` | sharing on the Hub, loss curves, the tiny tokenizer, `make demo` |
"""

import logging
import os
import warnings


class _ExpectedNotice(logging.Filter):
    """Drops one message known to be expected here, nothing else from that logger: bitsandbytes (imported by peft,
    which transformers imports) tries to fetch an optional CPU kernel from the Hub at import and warns when it cannot.
    Offline, or without the `kernels` package, it never can, and its built-in CPU kernel is used instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_ExpectedNotice())


def quiet_library_notices() -> None:
    """Warnings the libraries print at every run that no flag of ours or the user's changes (the command lines and
    the stages call this; a filter set at import would not survive pytest's own warning filters):
    - bitsandbytes' "Paged optimizers are not supported on CPU": the stages' default paged_adamw_8bit (paging matters
      on GPUs) runs as the same 8-bit AdamW unpaged on a CPU;
    - transformers' deprecation of `is_gradient_checkpointing`, which PEFT reads whenever it wraps a model."""
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

TINY_TOKENIZER = os.environ.get(
    "MMPHI_TINY_TOKENIZER", os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny-tokenizer")
)

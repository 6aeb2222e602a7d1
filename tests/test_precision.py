"""Precision by device: bf16 only where the GPU computes it natively (compute capability 8.0+), fp16 on older GPUs
(a T4 or V100 emulates bf16, slowly, and `torch.cuda.is_bf16_supported()` counts that); and an fp16 run stops at a
non-finite training loss instead of going on without learning. The GPU queries are faked; the rest is torch's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainerState

from mmphi.loading import pick_dtype
from mmphi.training import FP16OverflowGuard, StageTrainingArguments, resolve_precision


@pytest.fixture
def fake_gpu(monkeypatch):
    """`fake_gpu(major, minor)`: one CUDA device of that compute capability, on which bf16 emulation would work."""
    def install(major: int, minor: int = 0):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: SimpleNamespace(major=major, minor=minor, name=f"sm_{major}{minor}"))
        monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
        monkeypatch.setattr(torch.version, "hip", None)

    return install


def automatic(use_cpu: bool = False) -> tuple[bool, bool]:
    args = SimpleNamespace(fp16=None, bf16=None, use_cpu=use_cpu)
    resolve_precision(args)
    return args.fp16, args.bf16


@pytest.mark.parametrize("capability, fp16, bf16, dtype", [
    ((8, 0), False, True, torch.bfloat16),  # A100: native bf16
    ((9, 0), False, True, torch.bfloat16),  # H100
    ((7, 5), True, False, torch.float16),  # T4: bf16 only emulated
    ((7, 0), True, False, torch.float16),  # V100
])
def test_bf16_only_where_the_gpu_has_it_natively(fake_gpu, capability, fp16, bf16, dtype):
    fake_gpu(*capability)
    assert torch.cuda.is_bf16_supported()  # what the emulation-counting query says on every one of them
    assert automatic() == (fp16, bf16)
    assert pick_dtype("auto", "cuda") == dtype
    assert automatic(use_cpu=True) == (False, False) and pick_dtype("auto", "cpu") == torch.float32


def test_an_explicit_precision_is_kept(fake_gpu):
    fake_gpu(7, 5)
    args = SimpleNamespace(fp16=None, bf16=True, use_cpu=False)
    resolve_precision(args)
    assert (args.fp16, args.bf16) == (False, True)


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_bf16_on_a_cpu_without_avx512_is_kept_with_a_warning(monkeypatch, caplog, fast_bf16):
    """bf16 on an AVX2-only CPU multiplies in torch's reference GEMM (~180x slower than fp32 in a Phi-2-size
    backward): the user's choice stands, and the log says so and how to train in fp32."""
    import mmphi.training

    monkeypatch.setattr(mmphi.training, "cpu_has_fast_bf16", lambda: fast_bf16)
    args = SimpleNamespace(fp16=None, bf16=True, use_cpu=True)
    with caplog.at_level("WARNING", logger="mmphi.training"):
        resolve_precision(args)
    assert args.bf16 is True
    assert ("train in fp32 here (--bf16 false)" in caplog.text) == (not fast_bf16)


def guard_log(logs: dict, fp16: bool = True, step: int = 30):
    return FP16OverflowGuard().on_log(SimpleNamespace(fp16=fp16), TrainerState(global_step=step), TrainerControl(),
                                      logs=logs)


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), -float("inf")])
def test_fp16_overflow_stops_with_the_step_and_the_way_out(loss):
    with pytest.raises(FloatingPointError, match=r"step 30: the training loss is -?(nan|inf) in fp16") as raised:
        guard_log({"loss": loss, "grad_norm": 1.0})
    assert "--bf16 true" in str(raised.value) and "fp32" in str(raised.value)


def test_fp16_guard_passes_finite_losses_and_other_precisions():
    guard_log({"loss": 2.5})
    guard_log({"eval_loss": float("nan")})  # evaluation logs are not the training loss
    guard_log({"loss": float("nan")}, fp16=False)  # bf16 / fp32: not a float16 overflow


def test_fp16_logs_non_finite_losses_as_they_are(tmp_path):
    """HF's `logging_nan_inf_filter` logs an overflowed step as the mean of the finite ones (a run whose every step
    overflows logs 0.0): off under fp16, so that the guard sees the overflow; on otherwise, and the user's word wins."""
    def filtered(**flags):
        return StageTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **flags).logging_nan_inf_filter

    assert filtered(fp16=True) is False
    assert filtered(fp16=False, bf16=False) is True and filtered(bf16=True) is True
    assert filtered(fp16=True, logging_nan_inf_filter=True) is True

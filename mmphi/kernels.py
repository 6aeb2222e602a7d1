"""`--use_liger_kernel` for Phi and MM-Phi, which Liger's own model patches do not cover (Phi-2 has LayerNorm, a
plain GELU MLP and a biased LM head).

- The loss: a fused linear cross-entropy computes the causal-LM loss from the last hidden states and the LM head
  (its bias included) without materialising the [tokens, vocabulary] logits: Liger's Triton kernel on CUDA, and on a
  CPU (where Triton does not run) the same computation in checkpointed chunks of tokens, in PyTorch. Same shift,
  ignore index and reduction as transformers' `ForCausalLMLoss` (sum / `num_items_in_batch` under gradient
  accumulation, else the mean over the labelled tokens).
- The norms: every `nn.LayerNorm` of the language model becomes Liger's fused `LigerLayerNorm` (CUDA only).

Training forward passes with labels return the loss and no logits; evaluation and generation are untouched.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHUNK_TOKENS = 2048


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               labels: torch.Tensor, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                               use_liger: bool | None = None) -> torch.Tensor:
    """The causal-LM loss of `labels` ([batch, seq]) from `hidden` ([batch, seq, hidden]) through the head
    (`weight`, `bias`): labels shifted by one, `ignore_index` skipped, summed and divided by `num_items_in_batch`
    when given, else averaged over the labelled tokens."""
    inputs = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(inputs.device)
    use_liger = (inputs.is_cuda and liger_available()) if use_liger is None else use_liger
    if use_liger:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        total = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")(
            weight, inputs, targets, bias)
    else:
        total = inputs.new_zeros((), dtype=torch.float32)
        for start in range(0, inputs.shape[0], CHUNK_TOKENS):
            part = slice(start, start + CHUNK_TOKENS)
            total = total + checkpoint(_chunk_loss, inputs[part], weight, bias, targets[part], ignore_index,
                                       use_reentrant=False)
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _chunk_loss(inputs, weight, bias, targets, ignore_index):
    logits = F.linear(inputs, weight, bias).float()  # only this chunk's logits exist, and only until the backward
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def causal_lm_of(model) -> torch.nn.Module:
    """The module with `.model` and `.lm_head` inside a PEFT wrapper (or the model itself)."""
    base = model
    while not (hasattr(base, "lm_head") and hasattr(base, "model")):
        if hasattr(base, "base_model") and base.base_model is not base:
            base = base.base_model
        elif hasattr(base, "model") and base.model is not base:
            base = base.model
        else:
            raise ValueError(f"{type(model).__name__} has no language-model head to fuse the loss into")
    return base


def use_fused_loss(model) -> torch.nn.Module:
    """Patch the causal LM inside `model` so that training forwards with labels compute the fused loss."""
    target = causal_lm_of(model)
    original = target.forward

    @functools.wraps(getattr(original, "__func__", original))  # the signature Trainer inspects for columns
    def forward(self, *args, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None or not self.training or args:
            return original(*args, labels=labels, **kwargs)
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        kwargs.pop("skip_logits", None)  # the trainers' request; this loss never builds the logits either
        outputs = self.model(**kwargs)
        loss = fused_linear_cross_entropy(outputs.last_hidden_state, self.lm_head.weight, self.lm_head.bias, labels,
                                          num_items_in_batch)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(loss=loss, logits=None)

    target.forward = types.MethodType(forward, target)
    return model


def language_model_of(model) -> torch.nn.Module:
    """The decoder stack: MM-Phi's `model.language_model`, a plain Phi's `model` (the frozen vision tower is left
    alone: it runs without autograd, where a fused backward buys nothing)."""
    inner = causal_lm_of(model).model
    return getattr(inner, "language_model", inner)


def use_liger_layer_norms(model) -> int:
    """Swap every `nn.LayerNorm` of the language model for Liger's fused one (same weights); returns how many."""
    from liger_kernel.transformers import LigerLayerNorm

    swapped = 0
    for module in list(language_model_of(model).modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.LayerNorm and child.elementwise_affine:
                fused = LigerLayerNorm(child.normalized_shape[-1], eps=child.eps, bias=child.bias is not None)
                fused.to(device=child.weight.device, dtype=child.weight.dtype)
                fused.load_state_dict(child.state_dict(), strict=False)
                setattr(module, child_name, fused)
                swapped += 1
    return swapped


def apply_liger_kernel(model, device_is_cuda: bool) -> dict:
    """`--use_liger_kernel`: the fused loss (Liger on CUDA, chunked PyTorch elsewhere) and, on CUDA, Liger's
    LayerNorm. Liger is required on CUDA (a clear error when missing); elsewhere it is not used."""
    if device_is_cuda and not liger_available():
        raise ImportError("--use_liger_kernel needs liger-kernel on CUDA: pip install liger-kernel")
    use_fused_loss(model)
    norms = use_liger_layer_norms(model) if device_is_cuda else 0
    applied = {"fused_linear_cross_entropy": "liger" if device_is_cuda else "chunked pytorch", "layer_norms": norms}
    logger.info("--use_liger_kernel: %s", applied)
    return applied

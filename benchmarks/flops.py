"""Model FLOPs for MFU (no recompute): per token 2 per weight for a forward matmul, 4 when the gradient must also flow
to the input through a frozen weight, 6 for a trained weight, plus the attention scores 12 * layers * hidden * seq
(PaLM's 6N + 12LHQT for pretraining); the vision tower, run forward only, costs 2 per weight per patch token."""

from __future__ import annotations

from torch import nn


def linear_weights(module: nn.Module, trainable: bool | None = None) -> int:
    """Weights of the matmuls under `module` (in x out per nn.Linear, 4-bit ones included: their packed storage
    hides the count), optionally only trained (True) or frozen (False) ones."""
    total = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear) and (trainable is None or sub.weight.requires_grad == trainable):
            total += sub.in_features * sub.out_features
    return total


def attention_flops_per_token(config, seq: int) -> float:
    """QK^T and AV (2 * 2 * seq * hidden per layer forward), backward twice that: PaLM's 12 * L * H * T."""
    return 12.0 * config.num_hidden_layers * config.hidden_size * seq


def vision_forward_flops_per_image(vision_config, tower: nn.Module) -> float:
    patches = (vision_config.image_size // vision_config.patch_size) ** 2 + 1  # + CLS
    attention = 4.0 * vision_config.num_hidden_layers * vision_config.hidden_size * patches
    return patches * (2.0 * linear_weights(tower) + attention)

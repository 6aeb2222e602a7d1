"""MM-Phi configuration: a CLIP vision tower, a projector and a Phi language model, composed like transformers' Llava.

With no arguments the config describes the real model (TinyCLIP-ViT-61M/32 + Phi-2), written out so that building it
needs no hub access. `TINY_VISION_CONFIG` / `TINY_TEXT_CONFIG` are the offline tiny default used by tests and the demo.
"""

from __future__ import annotations

from typing import Literal

from transformers import CLIPVisionConfig, PhiConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

# wkcn/TinyCLIP-ViT-61M-32-Text-29M-LAION400M, vision tower: 640-d, patch 32, 224 px -> 7x7 = 49 patch tokens (+ CLS).
# Layers/heads/intermediate are our reading of its size; `from_components` takes the true numbers from the checkpoint.
TINYCLIP_VISION_CONFIG = dict(
    hidden_size=640,
    intermediate_size=2560,
    num_hidden_layers=12,
    num_attention_heads=10,
    image_size=224,
    patch_size=32,
    projection_dim=512,
    hidden_act="quick_gelu",
)

# microsoft/phi-2 (2.7B), as in its config.json.
PHI2_TEXT_CONFIG = dict(
    vocab_size=51200,
    hidden_size=2560,
    intermediate_size=10240,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    hidden_act="gelu_new",
    max_position_embeddings=2048,
    layer_norm_eps=1e-5,
    partial_rotary_factor=0.4,
    rope_theta=10000.0,
    resid_pdrop=0.1,
    embd_pdrop=0.0,
    attention_dropout=0.0,
    qk_layernorm=False,
    tie_word_embeddings=False,
    bos_token_id=50256,
    eos_token_id=50256,
)

# Offline tiny default: a 224 px / patch-32 tower keeps the real 49-token image layout at a CPU-friendly size.
TINY_VISION_CONFIG = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=224,
    patch_size=56,  # 16 image tokens: with the synthetic grid layout an object covers >= 1/16 of them
    projection_dim=64,
    hidden_act="quick_gelu",
)

# The tiny Phi matches mmphi/assets/tiny-tokenizer (4000 BPE entries; the processor adds <image> and <pad>). Hidden 128
# (1.8M parameters): `make demo` fits in 10 minutes on a 2-core AVX2 CPU, where a training step is matmul-bound; hidden
# 256 took twice as long for the same held-out accuracy (BENCHMARKS.md "Demo").
TINY_TEXT_CONFIG = dict(
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    # Phi-2's gelu_new (the tanh approximation) as one fused op: the same function, where gelu_new's eight
    # elementwise ops took 10-16% of a tiny training step on a CPU.
    hidden_act="gelu_pytorch_tanh",
    max_position_embeddings=2048,
    partial_rotary_factor=0.5,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
)

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


def image_seq_length_for(vision_config, vision_feature_select_strategy: str = "default") -> int:
    """Image tokens per image: one per patch, plus CLS unless it is dropped ("default", LLaVA's choice)."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches if vision_feature_select_strategy == "default" else patches + 1


class MMPhiConfig(PretrainedConfig):
    r"""
    Args:
        vision_config (`CLIPVisionConfig` or `dict`): the vision tower (default: TinyCLIP-ViT-61M/32's).
        text_config (`PhiConfig` or `dict`): the language model (default: Phi-2 2.7B).
        projector_type (`str`): `"linear"` (the seed's single Linear(640, 2560)) or `"mlp2x_gelu"` (LLaVA-1.5's).
        projector_hidden_act (`str`): activation between the two layers of `mlp2x_gelu`.
        image_token_index (`int`): id of the `<image>` token (50295: the first id after Phi-2's 50295 tokens).
        image_seq_length (`int`): image tokens per image (49 for 224 px at patch 32 without CLS).
        vision_feature_layer (`int` or `list[int]`): hidden-state index of the tower to use (-1: last, as the seed
            did; -2: LLaVA's penultimate); a list concatenates those layers' features (the projector input widens).
        vision_feature_select_strategy (`str`): `"default"` drops CLS, `"full"` keeps it.
    """

    model_type = "mmphi"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=TINYCLIP_VISION_CONFIG),
        "text_config": SubConfigSpec(config_class=PhiConfig, init_kwargs=PHI2_TEXT_CONFIG),
    }

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    projector_type: Literal["linear", "mlp2x_gelu"] = "linear"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    image_token_index: int = 50295
    image_seq_length: int | None = None
    vision_feature_layer: int | list[int] = -1
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                "vision_feature_select_strategy must be 'default' (drop CLS) or 'full', "
                f"got {self.vision_feature_select_strategy!r}"
            )
        expected = self.expected_image_seq_length()
        if self.image_seq_length is None:
            self.image_seq_length = expected
        elif self.image_seq_length != expected:
            raise ValueError(
                f"image_seq_length={self.image_seq_length} does not match the vision tower: "
                f"{self.vision_config.image_size} px at patch {self.vision_config.patch_size} with strategy "
                f"{self.vision_feature_select_strategy!r} gives {expected} tokens"
            )

    def expected_image_seq_length(self) -> int:
        return image_seq_length_for(self.vision_config, self.vision_feature_select_strategy)

    @classmethod
    def tiny(cls, **overrides) -> MMPhiConfig:
        """The offline tiny default (random init; tokenizer in mmphi/assets/tiny-tokenizer)."""
        kwargs = dict(
            vision_config=CLIPVisionConfig(**TINY_VISION_CONFIG),
            text_config=PhiConfig(**TINY_TEXT_CONFIG),
            image_token_index=4000,
            # keep CLS: a tiny tower gathers the image there (CLIP's contrastive loss reads CLS; a random tower
            # trained in the projector stage learns to); held-out colour is ~13% without it, up to 95% with it
            # (BENCHMARKS.md "Tiny CLIP")
            vision_feature_select_strategy="full",
        )
        kwargs.update(overrides)
        return cls(**kwargs)


__all__ = ["MMPhiConfig", "TINY_TEXT_CONFIG", "TINY_VISION_CONFIG", "PHI2_TEXT_CONFIG", "TINYCLIP_VISION_CONFIG"]

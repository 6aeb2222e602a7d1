"""MM-Phi: a CLIP vision tower -> projector -> Phi, laid out exactly like transformers' Llava.

Parameter names match `LlavaForConditionalGeneration` (`model.vision_tower.*`, `model.multi_modal_projector.linear_1`
[+ `linear_2`], `model.language_model.*`, `lm_head.*`), so Llava tooling, PEFT target names and TRL's trainer work.
Differences from Llava: a `"linear"` projector (the seed's single Linear(640, 2560)), Phi's lm_head bias, and an
optional `vision_features` input so training can reuse cached tower outputs when the tower is frozen, and
`skip_logits` (Liger's name) for a training step that needs only the loss: the LM head runs on the labelled positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPModel, CLIPVisionModel, GenerationMixin, PhiForCausalLM, PhiModel, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

try:
    from .configuration_mmphi import MMPhiConfig
except ImportError:  # imported as a top-level module (repo checkout, tests, scripts)
    from configuration_mmphi import MMPhiConfig

# transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (arguments and output fields); this file runs
# under whichever transformers the user has installed (it travels with the weights), so it uses the installed name.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"



def _cache_argument(past_key_values, kwargs: dict):
    """The KV cache, whichever name the caller used (generate passes `cache` from transformers 5.24 on)."""
    cache = kwargs.pop("cache", None)
    return cache if cache is not None else past_key_values


AUTO_MAP = {
    "AutoConfig": "configuration_mmphi.MMPhiConfig",
    "AutoModel": "modeling_mmphi.MMPhiModel",
    "AutoModelForCausalLM": "modeling_mmphi.MMPhiForCausalLM",
    # the class transformers' image-text-to-text pipeline loads, as for its own Llava
    "AutoModelForImageTextToText": "modeling_mmphi.MMPhiForCausalLM",
}
# Quantizing the language model only: the tower and projector are small and stay in full precision.
QUANTIZATION_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


@dataclass
class MMPhiModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the projected image features ([num_images, image_seq_length, text_hidden])."""

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class MMPhiCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the projected image features."""

    image_hidden_states: torch.FloatTensor | None = None


class MMPhiMultiModalProjector(nn.Module):
    """`linear`: linear_1 only. `mlp2x_gelu`: linear_1 -> act -> linear_2 (LLaVA-1.5; same names as Llava's)."""

    def __init__(self, config: MMPhiConfig):
        super().__init__()
        layers = config.vision_feature_layer
        n_layers = 1 if isinstance(layers, int) else len(layers)
        vision_hidden, text_hidden = config.vision_config.hidden_size * n_layers, config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        if config.projector_type == "mlp2x_gelu":
            self.act = ACT2FN[config.projector_hidden_act]
            self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        hidden_states = self.linear_1(image_features)
        if hasattr(self, "linear_2"):
            hidden_states = self.linear_2(self.act(hidden_states))
        return hidden_states


class MMPhiPreTrainedModel(PreTrainedModel):
    config_class = MMPhiConfig
    config: MMPhiConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["PhiDecoderLayer", "CLIPEncoderLayer"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Every save is a complete model repo: weights, config with an auto_map for all three Auto classes, code."""
        self.config.auto_map = {**AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # bitsandbytes would otherwise quantize the vision tower and projector too (only lm_head is skipped by default).
        quantization_config = kwargs.get("quantization_config")
        if quantization_config is not None and not getattr(quantization_config, "llm_int8_skip_modules", True):
            quantization_config.llm_int8_skip_modules = list(QUANTIZATION_SKIP_MODULES)
        model = super().from_pretrained(*args, **kwargs)
        if quantization_config is not None:
            _disable_bnb_cpu_repacking(model)
        return model


def _disable_bnb_cpu_repacking(model: nn.Module) -> None:
    """bitsandbytes 0.50 repacks 4-bit weights on CPUs with avx512_bf16 at the first no-grad forward, after which
    every training step fails (`a view of a leaf Variable ... in-place`). Keeping the plain path costs little."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


class MMPhiModel(MMPhiPreTrainedModel):
    """Vision tower + projector + `PhiModel`, without the LM head. Returns `MMPhiModelOutputWithPast`."""

    def __init__(self, config: MMPhiConfig):
        super().__init__(config)
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.multi_modal_projector = MMPhiMultiModalProjector(config)
        self.language_model = PhiModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tower hidden states at `vision_feature_layer`, CLS dropped for the "default" strategy: the projector's
        input, and what `--cache_vision_features` stores."""
        tower_dtype = self.vision_tower.get_input_embeddings().weight.dtype
        # A frozen tower runs without autograd: no activations kept, no backward through it, even when a trainer has
        # hooked every input embedding (TRL's enable_input_require_grads hooks CLIP's patch embedding too).
        tower_trains = any(param.requires_grad for param in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trains):
            outputs = self.vision_tower(pixel_values.to(tower_dtype), output_hidden_states=True, return_dict=True)
        layers = self.config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else layers
        features = torch.cat([outputs.hidden_states[layer] for layer in layers], dim=-1)
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return features

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """[num_images, image_seq_length, text_hidden]: projected features from pixels or cached tower features."""
        if vision_features is None:
            vision_features = self.get_vision_features(pixel_values)
        projector_dtype = self.multi_modal_projector.linear_1.weight.dtype
        if projector_dtype not in (torch.float32, torch.float16, torch.bfloat16):  # quantized: keep the input's
            projector_dtype = vision_features.dtype
        return self.multi_modal_projector(vision_features.to(projector_dtype))

    def get_placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, image_features):
        """Boolean mask [batch, seq, 1] of the image-token positions; raises if they don't match the features."""
        if input_ids is None:
            image_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_index, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embedding).all(-1)
        else:
            mask = input_ids == self.config.image_token_index
        n_tokens, n_images, per_image = int(mask.sum()), image_features.shape[0], image_features.shape[1]
        if n_tokens != n_images * per_image:
            raise ValueError(
                f"Image features and image tokens do not match: the text has {n_tokens} image tokens "
                f"(id {self.config.image_token_index}) but {n_images} image(s) x {per_image} features were given. "
                "Each <image> placeholder must be expanded to image_seq_length tokens (the processor does this)."
            )
        return mask.unsqueeze(-1).to(inputs_embeds.device)

    def embed_inputs(self, input_ids=None, pixel_values=None, vision_features=None, inputs_embeds=None):
        """The language model's input embeddings with the projected image features at the image-token positions,
        and those image features (None without an image)."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None and vision_features is None:
            return inputs_embeds, None
        image_features = self.get_image_features(pixel_values=pixel_values, vision_features=vision_features)
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
        return inputs_embeds.masked_scatter(mask, image_features), image_features

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        vision_features: torch.FloatTensor | None = None,
        **kwargs,
    ) -> MMPhiModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        cache = _cache_argument(past_key_values, kwargs)
        has_images = pixel_values is not None or vision_features is not None
        if not has_images and input_ids is not None and cache is None \
                and (input_ids == self.config.image_token_index).any():
            raise ValueError("The text contains image tokens but no pixel_values (or vision_features) were given.")
        inputs_embeds, image_features = self.embed_inputs(input_ids, pixel_values, vision_features, inputs_embeds)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        return MMPhiModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )


class MMPhiForCausalLM(MMPhiPreTrainedModel, GenerationMixin):
    """MM-Phi with Phi's LM head (which has a bias). Image + text -> text."""

    _tied_weights_keys = {}

    def __init__(self, config: MMPhiConfig):
        super().__init__(config)
        self.model = MMPhiModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        vision_features: torch.FloatTensor | None = None,
        skip_logits: bool = False,
        **kwargs,
    ) -> MMPhiCausalLMOutputWithPast:
        """`labels`: -100 where no loss is wanted (prompt, image and padding tokens); shifted inside the loss.
        `skip_logits=True` (with labels; Liger's name): the LM head runs on the labelled positions only and no logits
        are returned. It is the same loss, for what a training step needs: the image and prompt tokens are most of a
        sequence, and each would cost a `[hidden, vocab]` projection, forward and backward."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_cache_argument(past_key_values, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            vision_features=vision_features,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = logits = None
        if skip_logits:
            if labels is None and kwargs.get("shift_labels") is None:
                raise ValueError("skip_logits=True needs labels: it computes the loss without the logits")
            loss = self._labelled_positions_loss(hidden_states, labels, **kwargs)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])
            if labels is not None:
                loss = self.loss_function(
                    logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
                )
        return MMPhiCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )

    def _labelled_positions_loss(self, hidden_states, labels, shift_labels=None, **kwargs) -> torch.Tensor:
        """The causal LM loss (`self.loss_function`, the same reduction) from the LM head applied only where the
        next-token label is not -100. `shift_labels` (already shifted, as under context parallelism) wins."""
        if shift_labels is None:
            shift_labels = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        shift_labels = shift_labels.to(hidden_states.device)  # the last device, when split by device_map
        mask = shift_labels != -100
        logits = self.lm_head(hidden_states[mask])
        return self.loss_function(logits=logits, labels=None, shift_labels=shift_labels[mask],
                                  vocab_size=self.config.text_config.vocab_size, **kwargs)

    @classmethod
    def from_components(
        cls,
        vision_model: str | PreTrainedModel,
        text_model: str | PreTrainedModel,
        dtype: torch.dtype | str | None = "auto",
        **config_overrides,
    ) -> MMPhiForCausalLM:
        """Build MM-Phi from a CLIP checkpoint (`CLIPModel` or `CLIPVisionModel`, e.g.
        `wkcn/TinyCLIP-ViT-61M-32-Text-29M-LAION400M`) and a Phi checkpoint (e.g. `microsoft/phi-2`), keeping their
        weights, in `dtype` (default `"auto"`: the Phi checkpoint's, so Phi-2's bf16 stays bf16 and the whole model
        is saved and reloaded in it). Ids or paths are loaded with `from_pretrained`. The loaded tower, language
        model and head become MM-Phi's own modules (MM-Phi is laid out on the meta device, so a 2.7B model is never
        held twice); the projector is freshly initialised."""
        text = text_model if isinstance(text_model, PreTrainedModel) else PhiForCausalLM.from_pretrained(
            text_model, dtype=dtype
        )
        if not isinstance(text, PhiForCausalLM):
            raise TypeError(f"text_model must be a PhiForCausalLM checkpoint, got {type(text).__name__}")
        if isinstance(dtype, torch.dtype):  # an instance given is cast as a checkpoint would be loaded
            text = text.to(dtype)
        vision = _load_vision_tower(vision_model, text.dtype)
        config = MMPhiConfig(
            vision_config=vision.config.to_dict(), text_config=text.config.to_dict(), **config_overrides
        )
        with torch.device("meta"):
            model = cls(config)
        model.model.vision_tower = vision
        model.model.language_model = text.model
        model.lm_head = text.lm_head
        projector = MMPhiMultiModalProjector(config).to(text.dtype)  # before the init: drawn in the model's dtype
        projector.apply(model._init_weights)
        model.model.multi_modal_projector = projector
        vision.config, text.model.config = config.vision_config, config.text_config  # one config, as saved
        model.config.dtype = text.dtype
        return model


def _load_vision_tower(vision_model: str | PreTrainedModel, dtype: torch.dtype | str | None) -> CLIPVisionModel:
    """A `CLIPVisionModel` from a CLIPVisionModel/CLIPModel instance, or from a checkpoint of either kind."""
    if isinstance(vision_model, str):
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(vision_model).model_type
        loader = CLIPModel if model_type == "clip" else CLIPVisionModel
        vision_model = loader.from_pretrained(vision_model, dtype=dtype)
    if isinstance(vision_model, CLIPModel):  # keep the vision half; the text encoder is not used
        return vision_model.vision_model
    if isinstance(vision_model, CLIPVisionModel):
        return vision_model
    raise TypeError(f"vision_model must be a CLIPModel or CLIPVisionModel, got {type(vision_model).__name__}")


# Registered so that save_pretrained copies the code files next to the weights (trust_remote_code loading).
MMPhiConfig.register_for_auto_class()
MMPhiModel.register_for_auto_class("AutoModel")
MMPhiForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MMPhiPreTrainedModel", "MMPhiModel", "MMPhiForCausalLM", "MMPhiMultiModalProjector"]

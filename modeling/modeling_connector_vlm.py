"""Vision encoder -> connector -> causal LM, composed from Auto classes (any encoder x any LM)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.utils import torch_compilable_check
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_connector_vlm import ConnectorVLMConfig
from .connector_base import Connector


@dataclass
class ConnectorVLMImageOutput(BaseModelOutputWithPooling):
    """`pooler_output`: per-image [Q, D] connector outputs. `aux_loss`: the connector's auxiliary
    training loss (the MoE router's balance + z-loss, already weighted), added to the LM loss."""

    aux_loss: torch.FloatTensor | None = None


class ConnectorVLMPreTrainedModel(PreTrainedModel):
    config_class = ConnectorVLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # no host syncs on the forward path (torch_compilable_check, as LLaVA)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Connector):  # learned queries and other bare parameters
            module.reset_extra_parameters(getattr(self.config.get_text_config(), "initializer_range", 0.02))


class ConnectorVLMModel(ConnectorVLMPreTrainedModel):
    """The vision tower, the connector and the LM body (no LM head)."""

    def __init__(self, config: ConnectorVLMConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.connector = config.connector_class(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def select_vision_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's hidden states of the layers the connector reads, prefix tokens removed under
        the "default" strategy: a list of [B, N, C] tensors."""
        return self._encode(pixel_values)[1]

    def _encode(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None):
        """(the vision tower's output, the selected [B, N, C] hidden states the connector reads)."""
        config = self.config
        expected = config.vision_image_size
        if tuple(pixel_values.shape[-2:]) != expected:
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])} (HxW) but the vision encoder is configured "
                f"for {expected}. Prepare images with this checkpoint's processor (AutoProcessor)."
            )
        layers = config.connector_vision_layers
        # A list asks transformers to keep only those hidden states (the others come back as None);
        # encoders that take a plain flag treat it as True and keep them all.
        extra = {"output_attentions": True} if output_attentions else {}
        outputs = self.vision_tower(pixel_values.to(self.vision_tower.dtype),
                                    output_hidden_states=True if output_hidden_states else list(layers),
                                    return_dict=True, **extra)
        selected = [outputs.hidden_states[i] for i in layers]
        grid_h, grid_w = config.vision_grid
        num_patches, num_prefix = grid_h * grid_w, config.num_vision_prefix_tokens
        seq_len = selected[0].shape[1]
        if seq_len != num_patches + num_prefix:
            raise ValueError(
                f"The vision encoder returned {seq_len} tokens per image; the config expects {num_patches} patches "
                f"({grid_h}x{grid_w}) + {num_prefix} prefix tokens. This encoder's prefix tokens are not known "
                "to connector-vlm: use vision_feature_select_strategy='full' or report the encoder."
            )
        if config.vision_feature_select_strategy == "default" and num_prefix:
            selected = [h[:, num_prefix:] for h in selected]  # [B, prefix + P, C] -> [B, P, C]
        return outputs, selected

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
        output_hidden_states: bool | None = None, output_attentions: bool | None = None, **kwargs
    ) -> ConnectorVLMImageOutput:
        """Encodes images once, as LLaVA does: the vision tower's output (`last_hidden_state`, and its
        `hidden_states` / `attentions` when asked for) with `pooler_output` the per-image [Q, D] connector
        outputs. `vision_features` ([n_images, n_layers, N, C], what `select_vision_features` returns,
        stacked) skips the frozen encoder, e.g. when training from a feature cache: the tower's fields
        are then empty."""
        vision = None
        # unset: what the configs say, as transformers' models do (the tower's config, or the whole model's)
        if output_hidden_states is None:
            output_hidden_states = self.vision_tower.config.output_hidden_states or self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.vision_tower.config.output_attentions or self.config.output_attentions
        if vision_features is not None:
            selected = list(vision_features.to(self.vision_tower.dtype).unbind(1))
        else:
            vision, selected = self._encode(pixel_values, output_hidden_states, output_attentions)
        aux_loss = None
        if self.config.connector_class.returns_aux_loss:  # asked of the class: the module may sit in a wrapper
            features, aux_loss = self.connector(selected, return_aux_loss=True)  # [B, Q, D], []
        else:
            features = self.connector(selected)  # [B, Q, D]
        return ConnectorVLMImageOutput(
            last_hidden_state=None if vision is None else vision.last_hidden_state,
            hidden_states=vision.hidden_states if vision is not None and output_hidden_states else None,
            attentions=vision.attentions if vision is not None and output_attentions else None,
            pooler_output=list(features), aux_loss=aux_loss,
        )

    def merge_image_features(self, input_ids, inputs_embeds, image_features: torch.Tensor) -> torch.Tensor:
        """Writes the [n_images * Q, D] features into the <image> positions (one masked_scatter)."""
        image_token_id = self.config.image_token_id
        if image_token_id is None:
            raise ValueError("The config has no image_token_id, so no prompt position can take image features: set "
                             "config.image_token_id to the tokenizer's <image> id (the processor's image_token_id).")
        if input_ids is None:
            image_embedding = self.get_input_embeddings()(torch.tensor(image_token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == image_embedding).all(-1)
        else:
            mask = input_ids == image_token_id
        n_tokens, n_features = mask.sum(), image_features.shape[0]
        q = self.config.num_image_tokens
        torch_compilable_check(  # a compiler hint, not a host sync, until it fails
            n_tokens == n_features,
            lambda: f"The prompt has {int(n_tokens)} <image> tokens but the images give {n_features} features "
            f"({n_features // max(q, 1)} image(s) x {q} tokens). Likely causes: a prompt without <image> "
            "(use the processor or its chat template), a prompt truncated through the image tokens "
            "(raise max_length), or text expanded by another processor.",
        )
        mask = mask.unsqueeze(-1).to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.device, inputs_embeds.dtype))

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # the name transformers used before 5.24
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        vision_features: torch.Tensor | None = None,
        **kwargs,
    ) -> MultimodalBaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and (pixel_values is not None or vision_features is not None):
            image_outputs = self.get_image_features(pixel_values, vision_features, return_dict=True)
        if image_outputs is not None:
            image_features = torch.cat(list(image_outputs.pooler_output), dim=0)  # n_images x [Q, D] -> [n*Q, D]
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
        if cache is not None:
            kwargs["cache"] = cache
        outputs = self.language_model(
            attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True,
            **kwargs,
        )
        return MultimodalBaseModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
        )


class ConnectorVLMForConditionalGeneration(ConnectorVLMPreTrainedModel, GenerationMixin):
    """The full model: `generate` encodes the image once, at prefill, then decodes with the KV cache."""

    # as LLaVA: under tensor parallelism the head's output is gathered, whether or not it is tied to sharded embeddings
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: ConnectorVLMConfig):
        super().__init__(config)
        self.model = ConnectorVLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        # Tie to whatever the LM calls its input embeddings (embed_tokens, wte, ...).
        embed = self.model.language_model.get_input_embeddings()
        embed_name = next(n for n, m in self.model.language_model.named_modules() if m is embed)
        self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{embed_name}.weight"}
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None, **kwargs
    ) -> ConnectorVLMImageOutput:
        return self.model.get_image_features(pixel_values, vision_features, **kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # the name transformers used before 5.24
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        vision_features: torch.Tensor | None = None,
        **kwargs,
    ) -> MultimodalCausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            vision_features=vision_features,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            # ForCausalLMLoss shifts the labels itself; kwargs carry Trainer's num_items_in_batch.
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
            aux_loss = getattr(outputs.image_outputs, "aux_loss", None)
            if aux_loss is not None:
                loss = loss + aux_loss.to(loss.dtype)
        return MultimodalCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )


__all__ = [
    "ConnectorVLMForConditionalGeneration",
    "ConnectorVLMImageOutput",
    "ConnectorVLMModel",
    "ConnectorVLMPreTrainedModel",
]

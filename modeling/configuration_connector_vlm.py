"""ConnectorVLMConfig: any HF vision encoder + any causal LM + one registered connector."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .connectors import CONNECTORS, get_connector_class

SELECT_STRATEGIES = ("default", "full")

# Tokens a ViT puts before its patch tokens (CLS, registers). Encoders not listed are assumed to
# have one CLS token plus `num_register_tokens` registers; the model checks the count at run time.
_NO_PREFIX_ENCODERS = {"siglip_vision_model", "siglip2_vision_model", "aimv2_vision_model"}


def _as_config(value, default_model_type: str, field: str) -> PreTrainedConfig:
    if value is None:
        return CONFIG_MAPPING[default_model_type]()
    if isinstance(value, dict):
        model_type = value.get("model_type", default_model_type)
        if model_type not in CONFIG_MAPPING:
            raise ValueError(
                f"{field} has model_type={model_type!r}, which this transformers version does not know. "
                "Upgrade transformers or pick an encoder/LM it supports."
            )
        return CONFIG_MAPPING[model_type](**{k: v for k, v in value.items() if k != "model_type"})
    if isinstance(value, PreTrainedConfig):
        return value
    raise ValueError(f"{field} must be a transformers config or a dict, got {type(value).__name__}.")


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class ConnectorVLMConfig(PreTrainedConfig):
    r"""
    Args:
        vision_config: config of any HF vision encoder (a dict with `model_type`, or a config; a full
            CLIP/SigLIP config is reduced to its vision part).
        text_config: config of any HF causal LM.
        connector_type: a name from the connector registry (`cvlm connectors` lists them).
        connector_config: that connector's hyper-parameters; missing ones take the connector's defaults.
        vision_feature_layer: index (or list of indices) into the encoder's hidden states; -2 is the
            penultimate layer, as in LLaVA-1.5. A list concatenates layers along channels.
        vision_feature_select_strategy: "default" drops the encoder's prefix tokens (CLS, registers);
            "full" keeps them.
        image_token_id: id of the `<image>` token in the tokenizer.
        tie_word_embeddings: tie the LM head to the input embeddings (defaults to the text config's value).
    """

    model_type = "connector_vlm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(AutoConfig, model_type="llama"),
    }

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        connector_type: str = "mlp",
        connector_config: dict | None = None,
        vision_feature_layer: int | list[int] = -2,
        vision_feature_select_strategy: str = "default",
        image_token_id: int | None = None,
        tie_word_embeddings: bool | None = None,
        **kwargs,
    ):
        vision_config = _as_config(vision_config, "clip_vision_model", "vision_config")
        vision_config = getattr(vision_config, "vision_config", None) or vision_config
        text_config = _as_config(text_config, "llama", "text_config")
        self.vision_config = vision_config
        self.text_config = text_config
        self.connector_type = connector_type
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token_id = image_token_id
        if tie_word_embeddings is None:
            tie_word_embeddings = bool(getattr(text_config, "tie_word_embeddings", False))
        self.tie_word_embeddings = tie_word_embeddings
        self.connector_config = self._validate(connector_config)
        super().__init__(**kwargs)

    # ---- validation: every bad value fails here, naming the field, the value and what is allowed --
    def _validate(self, connector_config) -> dict:
        connector_cls = get_connector_class(self.connector_type)
        hyper = connector_cls.resolve_hyper(connector_config)
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy={self.vision_feature_select_strategy!r} is invalid. "
                f"Allowed values: {', '.join(SELECT_STRATEGIES)}."
            )
        layer = self.vision_feature_layer
        if not (isinstance(layer, int) or (isinstance(layer, (list, tuple)) and layer and all(isinstance(i, int) for i in layer))):
            raise ValueError(f"vision_feature_layer={layer!r} is invalid: use an int or a non-empty list of ints.")
        if isinstance(layer, tuple):
            self.vision_feature_layer = list(layer)
        num_layers = self.num_encoder_layers
        for index in connector_cls.vision_layers(self.vision_feature_layer, num_layers, **hyper):
            if num_layers is not None and not -(num_layers + 1) <= index <= num_layers:
                where = (f"connector_config layers={hyper['layers']!r}" if index in (hyper.get("layers") or [])
                         else f"vision_feature_layer={self.vision_feature_layer!r}")
                raise ValueError(
                    f"{where}: layer {index} does not exist in a vision "
                    f"encoder with {num_layers} layers. Allowed values: {-(num_layers + 1)}..{num_layers} "
                    "(indices into hidden_states: 0 is the embeddings, -1 the last layer)."
                )
        grid_h, grid_w = self.vision_grid
        if grid_h < 1 or grid_w < 1:
            raise ValueError(
                f"vision_config image_size={self.vision_config.image_size} is smaller than its "
                f"patch_size={self.vision_config.patch_size}: the patch grid would be {grid_h}x{grid_w}. "
                "Use an image size of at least one patch."
            )
        connector_cls.check_grid(grid_h, grid_w, self.num_kept_prefix_tokens, **hyper)
        if self.image_token_id is not None:
            vocab_size = self.text_config.vocab_size
            if not isinstance(self.image_token_id, int) or not 0 <= self.image_token_id < vocab_size:
                raise ValueError(
                    f"image_token_id={self.image_token_id!r} is not a token of the LM's vocabulary "
                    f"(vocab_size={vocab_size}). Allowed values: 0..{vocab_size - 1}; resize the LM's embeddings "
                    "after adding <image> to the tokenizer."
                )
        return hyper

    # ---- derived values: computed, never stored --------------------------------------------------
    @property
    def num_encoder_layers(self) -> int | None:
        return getattr(self.vision_config, "num_hidden_layers", None)

    @property
    def vision_image_size(self) -> tuple[int, int]:
        """(height, width) of the images the encoder takes."""
        if not hasattr(self.vision_config, "image_size") or not hasattr(self.vision_config, "patch_size"):
            raise ValueError(
                f"vision_config ({self.vision_config.model_type}) has no image_size/patch_size: connector-vlm "
                "needs a ViT-style encoder that cuts the image into a grid of patches."
            )
        return _pair(self.vision_config.image_size)

    @property
    def vision_grid(self) -> tuple[int, int]:
        (image_h, image_w), (patch_h, patch_w) = self.vision_image_size, _pair(self.vision_config.patch_size)
        return image_h // patch_h, image_w // patch_w

    @property
    def num_vision_prefix_tokens(self) -> int:
        """Tokens the encoder puts before its patch tokens (CLS, registers)."""
        if self.vision_config.model_type in _NO_PREFIX_ENCODERS:
            return 0
        return 1 + int(getattr(self.vision_config, "num_register_tokens", 0) or 0)

    @property
    def num_kept_prefix_tokens(self) -> int:
        return 0 if self.vision_feature_select_strategy == "default" else self.num_vision_prefix_tokens

    @property
    def connector_class(self):
        return CONNECTORS[self.connector_type]

    @property
    def connector_vision_layers(self) -> list[int]:
        return self.connector_class.vision_layers(
            self.vision_feature_layer, self.num_encoder_layers, **self.connector_config
        )

    @property
    def num_image_tokens(self) -> int:
        """Q: the LM tokens one image becomes, as the connector class answers for this grid."""
        grid_h, grid_w = self.vision_grid
        return self.connector_class.num_tokens(grid_h, grid_w, self.num_kept_prefix_tokens, **self.connector_config)


__all__ = ["ConnectorVLMConfig"]

"""ConnectorVLMConfig: derived token counts, serialisation, and every bad value's message."""

from __future__ import annotations

import pytest
import torch

from cvlm.modeling import CONNECTORS, ConnectorVLMConfig, ConnectorVLMForConditionalGeneration

TINY_VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
               "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
TINY_SIGLIP = {**TINY_VISION, "model_type": "siglip_vision_model", "vision_use_head": False}
TINY_TEXT = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}


def make(**kwargs) -> ConnectorVLMConfig:
    return ConnectorVLMConfig(**{"vision_config": TINY_VISION, "text_config": TINY_TEXT, "image_token_id": 4, **kwargs})


def test_defaults_build_without_arguments():
    config = ConnectorVLMConfig()
    assert config.connector_type == "mlp"
    assert config.connector_config == {"depth": 2, "act": "gelu", "bias": True}
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"


@pytest.mark.parametrize("name", list(CONNECTORS))
def test_num_image_tokens_is_the_connector_class_answer(name):
    config = make(connector_type=name)
    assert config.num_image_tokens == CONNECTORS[name].num_tokens(4, 4, 0, **config.connector_config)


@pytest.mark.parametrize("vision, strategy, expected", [
    (TINY_VISION, "default", 16), (TINY_VISION, "full", 17),  # CLIP: 4x4 patches (+ CLS)
    (TINY_SIGLIP, "default", 16), (TINY_SIGLIP, "full", 16),  # SigLIP has no prefix token
])
def test_select_strategy_drops_prefix_tokens_whatever_the_encoder(vision, strategy, expected):
    config = make(vision_config=vision, vision_feature_select_strategy=strategy)
    assert config.num_image_tokens == expected
    model = ConnectorVLMForConditionalGeneration(config).eval()
    with torch.no_grad():
        features = model.get_image_features(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape) for f in features.pooler_output] == [(expected, 64)] * 2


def test_register_tokens_count_as_prefix_tokens():
    dinov2 = {"model_type": "dinov2_with_registers", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "num_register_tokens": 4}
    default, full = (make(vision_config=dinov2, vision_feature_select_strategy=s) for s in ("default", "full"))
    assert (default.num_image_tokens, full.num_image_tokens) == (16, 21)
    model = ConnectorVLMForConditionalGeneration(default).eval()
    with torch.no_grad():
        selected = model.model.select_vision_features(torch.randn(1, 3, 32, 32))
    assert tuple(selected[0].shape) == (1, 16, 32)


def test_feature_layer_list_concatenates_channels():
    config = make(connector_type="linear", vision_feature_layer=[-2, -1, 1])
    model = ConnectorVLMForConditionalGeneration(config)
    assert model.model.connector.proj.in_features == 3 * 32
    assert config.connector_vision_layers == [-2, -1, 1]


def test_config_round_trips_through_dict_and_json(tmp_path):
    config = make(connector_type="mlp", connector_config={"depth": 3}, vision_feature_layer=[-1, -3])
    config.save_pretrained(tmp_path)
    again = ConnectorVLMConfig.from_pretrained(tmp_path)
    assert again.connector_config == {"depth": 3, "act": "gelu", "bias": True}
    assert again.vision_feature_layer == [-1, -3]
    assert again.vision_config.to_dict() == config.vision_config.to_dict()
    assert again.text_config.to_dict() == config.text_config.to_dict()
    assert again.num_image_tokens == config.num_image_tokens == 16


def test_a_full_clip_config_is_reduced_to_its_vision_tower():
    from transformers import CLIPConfig

    clip = CLIPConfig(vision_config=TINY_VISION, text_config={"hidden_size": 32, "intermediate_size": 64,
                                                               "num_hidden_layers": 1, "num_attention_heads": 2})
    assert make(vision_config=clip).vision_config.model_type == "clip_vision_model"


# ---- every bad value fails at construction with an actionable message ------------------------------
BAD = [
    ({"connector_type": "mlp2x_gelu"},
     "connector_type='mlp2x_gelu' is not a registered connector. Allowed values: " + ", ".join(sorted(CONNECTORS)) + "."),
    ({"connector_config": {"depht": 2}},
     "connector_config has 'depht', which the 'mlp' connector does not take. "
     "Allowed hyper-parameters of 'mlp': act, bias, depth."),
    ({"connector_type": "linear", "connector_config": {"depth": 2}},
     "connector_config has 'depth', which the 'linear' connector does not take. "
     "Allowed hyper-parameters of 'linear': bias."),
    ({"connector_config": {"depth": 0}}, "connector_config depth=0 is invalid for 'mlp': use an integer >= 1."),
    ({"vision_feature_layer": 5},
     "vision_feature_layer=5: layer 5 does not exist in a vision encoder with 4 layers. Allowed values: -5..4 "
     "(indices into hidden_states: 0 is the embeddings, -1 the last layer)."),
    ({"vision_feature_layer": [-1, -6]},
     "vision_feature_layer=[-1, -6]: layer -6 does not exist in a vision encoder with 4 layers. Allowed values: -5..4 "
     "(indices into hidden_states: 0 is the embeddings, -1 the last layer)."),
    ({"vision_feature_layer": []}, "vision_feature_layer=[] is invalid: use an int or a non-empty list of ints."),
    ({"vision_feature_select_strategy": "cls_patch"},
     "vision_feature_select_strategy='cls_patch' is invalid. Allowed values: default, full."),
    ({"vision_config": {**TINY_VISION, "image_size": 4}},
     "vision_config image_size=4 is smaller than its patch_size=8: the patch grid would be 0x0. "
     "Use an image size of at least one patch."),
    ({"image_token_id": 100},
     "image_token_id=100 is not a token of the LM's vocabulary (vocab_size=100). Allowed values: 0..99; "
     "resize the LM's embeddings after adding <image> to the tokenizer."),
    ({"vision_config": {"model_type": "no_such_encoder"}},
     "vision_config has model_type='no_such_encoder', which this transformers version does not know. "
     "Upgrade transformers or pick an encoder/LM it supports."),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[next(iter(k)) + str(i) for i, (k, _) in enumerate(BAD)])
def test_bad_values_fail_at_construction_naming_field_value_and_allowed(kwargs, message):
    with pytest.raises(ValueError) as info:
        make(**kwargs)
    assert str(info.value) == message


def test_bad_activation_lists_the_allowed_ones():
    with pytest.raises(ValueError) as info:
        make(connector_config={"act": "gleu"})
    assert str(info.value).startswith("connector_config act='gleu' is not an activation transformers knows. Allowed values: ")
    assert "gelu" in str(info.value) and "silu" in str(info.value)

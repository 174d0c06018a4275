"""transformers' own common model tests (ModelTesterMixin, ConfigTester) against connector-vlm.

Not collected by this project's pytest run: `run.sh` copies it into the `tests/models/` folder of the
transformers source distribution that matches the installed version, as
`tests/models/connector_vlm/test_modeling_connector_vlm.py`, and runs it there once per connector
(CVLM_CONNECTOR). The tester is shaped like transformers' LLaVA tester: a 2-layer CLIP vision tower on
8-px images (a 4x4 patch grid), a 2-layer Llama, the image token at id 0, prompts that start with the
image's tokens.
"""

import os
import unittest

import torch
from transformers.models.auto import modeling_auto
from transformers.testing_utils import require_torch, torch_device

from cvlm.modeling import ConnectorVLMConfig, ConnectorVLMForConditionalGeneration, ConnectorVLMModel

from ...generation.test_utils import GenerationTesterMixin
from ...test_configuration_common import ConfigTester
from ...test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor

CONNECTOR = os.environ.get("CVLM_CONNECTOR", "mlp")

# transformers' own models sit in its auto-class name tables, which the common tests read to tell base
# models (no loss, no training test) from head models; a Hub model registers at run time instead, so its
# names are added here, where LLaVA's are built in
modeling_auto.MODEL_MAPPING_NAMES["connector_vlm"] = "ConnectorVLMModel"
modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES["connector_vlm"] = "ConnectorVLMForConditionalGeneration"


class ConnectorVLMTester:
    def __init__(self, parent, text_length=7):
        self.parent = parent
        self.text_config = {"model_type": "llama", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 37,
                            "hidden_act": "silu", "max_position_embeddings": 512, "initializer_range": 0.02,
                            "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 3}
        self.vision_config = {"model_type": "clip_vision_model", "image_size": 8, "patch_size": 2, "num_channels": 3,
                              "hidden_size": 32, "projection_dim": 32, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "intermediate_size": 37, "initializer_range": 0.02}
        self.image_token_id, self.pad_token_id = 0, 1
        self.batch_size, self.is_training = 3, True
        self.num_hidden_layers, self.vocab_size, self.hidden_size, self.num_attention_heads = 2, 99, 32, 4
        self.num_image_tokens = self.get_config().num_image_tokens  # Q: the connector's, per image
        self.seq_length = self.encoder_seq_length = text_length + self.num_image_tokens

    def get_config(self):
        return ConnectorVLMConfig(vision_config=self.vision_config, text_config=self.text_config,
                                  connector_type=CONNECTOR, image_token_id=self.image_token_id, vision_feature_layer=-1)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        pixel_values = floats_tensor([self.batch_size, 3, 8, 8])
        input_ids = ids_tensor([self.batch_size, self.seq_length], config.text_config.vocab_size - 2) + 2
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long).to(torch_device)
        input_ids[:, : self.num_image_tokens] = config.image_token_id
        return config, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


@require_torch
class ConnectorVLMModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (ConnectorVLMModel, ConnectorVLMForConditionalGeneration)
    _is_composite = True

    def setUp(self):
        self.model_tester = ConnectorVLMTester(self)
        self.config_tester = ConfigTester(self, config_class=ConnectorVLMConfig, has_text_modality=False,
                                          common_properties=["image_token_id", "vision_feature_layer"])

    def test_config(self):
        self.config_tester.run_common_tests()

    # Skipped as LLaVA's tester skips them, for the same reason: the connector reads an inner layer of the
    # vision tower, so the tower's last layers (post_layernorm) get no gradient, which these checks require
    # of every parameter.
    @unittest.skip(reason="the tower's unread last layers get no gradient (LLaVA's tester skips these too)")
    def test_training_gradient_checkpointing(self):
        pass

    @unittest.skip(reason="the tower's unread last layers get no gradient (LLaVA's tester skips these too)")
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass

    @unittest.skip(reason="the tower's unread last layers get no gradient (LLaVA's tester skips these too)")
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass

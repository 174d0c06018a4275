"""The code that travels inside every connector-vlm checkpoint (torch + transformers only)."""

from .configuration_connector_vlm import ConnectorVLMConfig
from .connectors import CONNECTORS, FAMILIES, Connector, get_connector_class, register_connector
from .modeling_connector_vlm import (
    ConnectorVLMForConditionalGeneration,
    ConnectorVLMModel,
    ConnectorVLMPreTrainedModel,
)
from .processing_connector_vlm import ConnectorVLMProcessor

__all__ = [
    "CONNECTORS",
    "FAMILIES",
    "Connector",
    "ConnectorVLMConfig",
    "ConnectorVLMForConditionalGeneration",
    "ConnectorVLMModel",
    "ConnectorVLMPreTrainedModel",
    "ConnectorVLMProcessor",
    "get_connector_class",
    "register_connector",
]

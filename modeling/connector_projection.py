"""Feature-preserving projections: one LM token per visual token (Q = P)."""

from __future__ import annotations

from torch import nn
from transformers.activations import ACT2FN

from .connector_base import Connector, register_connector


@register_connector("linear")
class LinearConnector(Connector):
    """A single Linear(k*C -> D), the first LLaVA's projector."""

    family = "preserving"
    defaults = {"bias": True}

    def __init__(self, config):
        super().__init__(config)
        in_features = self.vision_hidden_size * len(config.connector_vision_layers)
        self.proj = nn.Linear(in_features, self.text_hidden_size, bias=self.hyper["bias"])

    def forward(self, hidden_states):
        return self.proj(self.concat_channels(hidden_states))  # [B, N, k*C] -> [B, N, D]


@register_connector("mlp")
class MLPConnector(Connector):
    """Linear(k*C -> D) followed by (depth - 1) x [act, Linear(D -> D)].
    depth=2, act="gelu" is LLaVA-1.5's `mlp2x_gelu`."""

    family = "preserving"
    defaults = {"depth": 2, "act": "gelu", "bias": True}

    @classmethod
    def check_hyper(cls, hyper):
        if not isinstance(hyper["depth"], int) or hyper["depth"] < 1:
            raise ValueError(f"connector_config depth={hyper['depth']!r} is invalid for 'mlp': use an integer >= 1.")
        if hyper["act"] not in ACT2FN:
            raise ValueError(
                f"connector_config act={hyper['act']!r} is not an activation transformers knows. "
                f"Allowed values: {', '.join(sorted(ACT2FN))}."
            )

    def __init__(self, config):
        super().__init__(config)
        in_features = self.vision_hidden_size * len(config.connector_vision_layers)
        width, bias = self.text_hidden_size, self.hyper["bias"]
        layers = [nn.Linear(in_features, width, bias=bias)]
        for _ in range(self.hyper["depth"] - 1):
            layers += [ACT2FN[self.hyper["act"]], nn.Linear(width, width, bias=bias)]
        self.layers = nn.Sequential(*layers)

    def forward(self, hidden_states):
        return self.layers(self.concat_channels(hidden_states))  # [B, N, k*C] -> [B, N, D]

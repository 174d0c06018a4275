"""Feature-preserving projections: one LM token per visual token (Q = P)."""

from __future__ import annotations

from torch import nn
from transformers.activations import ACT2FN

from .connector_base import Connector, check_mlp_hyper, check_positive_int, mlp_projection, register_connector


@register_connector("linear")
class LinearConnector(Connector):
    """A single Linear(k*C -> D), the first LLaVA's projector."""

    family = "preserving"
    defaults = {"bias": True}
    source = "LLaVA (arXiv 2304.08485)"

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(self.concat_width, self.text_hidden_size, bias=self.hyper["bias"])

    def forward(self, hidden_states):
        return self.proj(self.concat_channels(hidden_states))  # [B, N, k*C] -> [B, N, D]


@register_connector("mlp")
class MLPConnector(Connector):
    """Linear(k*C -> D) followed by (depth - 1) x [act, Linear(D -> D)].
    depth=2, act="gelu" is LLaVA-1.5's `mlp2x_gelu`."""

    family = "preserving"
    defaults = {"depth": 2, "act": "gelu", "bias": True}
    source = "LLaVA-1.5 (arXiv 2310.03744)"

    @classmethod
    def check_hyper(cls, hyper):
        check_mlp_hyper(cls.name, hyper)

    def __init__(self, config):
        super().__init__(config)
        self.layers = mlp_projection(self.concat_width, self.text_hidden_size, **self.hyper)

    def forward(self, hidden_states):
        return self.layers(self.concat_channels(hidden_states))  # [B, N, k*C] -> [B, N, D]


@register_connector("lowrank")
class LowRankConnector(Connector):
    """Linear(k*C -> r, no bias) then [act] then Linear(r -> D): r(kC + D) parameters instead of kC*D."""

    family = "preserving"
    defaults = {"rank": 256, "act": None}
    source = "low-rank factorisation of the linear projector"

    @classmethod
    def check_hyper(cls, hyper):
        check_positive_int(cls.name, "rank", hyper["rank"])
        if hyper["act"] is not None and hyper["act"] not in ACT2FN:
            raise ValueError(
                f"connector_config act={hyper['act']!r} is not an activation transformers knows (or null). "
                f"Allowed values: {', '.join(sorted(ACT2FN))}."
            )

    def __init__(self, config):
        super().__init__(config)
        self.down = nn.Linear(self.concat_width, self.hyper["rank"], bias=False)
        self.act = ACT2FN[self.hyper["act"]] if self.hyper["act"] else nn.Identity()
        self.up = nn.Linear(self.hyper["rank"], self.text_hidden_size)

    def forward(self, hidden_states):
        return self.up(self.act(self.down(self.concat_channels(hidden_states))))  # [B, N, kC] -> [B, N, r] -> [B, N, D]

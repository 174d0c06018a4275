"""Dense Connector (arXiv 2405.13800): multi-layer features of the frozen encoder, then the mlp.

"Which features" is a parameter-free fusion of hidden states (STI / SCI / DCI); "how to map them"
is the ordinary `mlp` projection. Layer indices are indices into the encoder's `hidden_states`
(0 = embeddings, k = output of layer k); by default the shallow layers sit at 1/3 and 2/3 of the
depth (layers 8 and 16 of a 24-layer ViT, the paper's choice), and the final layer is the
config's `vision_feature_layer`.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .connector_base import Connector, check_mlp_hyper, check_positive_int, mlp_projection, register_connector


class DenseConnector(Connector):
    family = "preserving"
    source = "Dense Connector (arXiv 2405.13800)"

    @classmethod
    def check_hyper(cls, hyper):
        check_mlp_hyper(cls.name, hyper)
        layers = hyper.get("layers")
        if layers is not None and not (isinstance(layers, list) and layers and all(isinstance(i, int) for i in layers)):
            raise ValueError(f"connector_config layers={layers!r} is invalid for {cls.name!r}: use a non-empty list of ints or null.")

    @staticmethod
    def final_layer(vision_feature_layer, name: str) -> int:
        if not isinstance(vision_feature_layer, int):
            raise ValueError(
                f"vision_feature_layer={vision_feature_layer!r}: the {name!r} connector fuses layers itself and takes "
                "one final layer; pass an int and list the other layers in connector_config 'layers'."
            )
        return vision_feature_layer

    @classmethod
    def shallow_layers(cls, num_encoder_layers: int | None, layers) -> list[int]:
        if layers is not None:
            return list(layers)
        if num_encoder_layers is None:
            raise ValueError(f"The encoder does not say its depth: set connector_config 'layers' for {cls.name!r}.")
        return [round(num_encoder_layers / 3), round(2 * num_encoder_layers / 3)]

    @classmethod
    def vision_layers(cls, vision_feature_layer, num_encoder_layers, **hyper):
        return [cls.final_layer(vision_feature_layer, cls.name)] + cls.shallow_layers(num_encoder_layers, hyper["layers"])


@register_connector("dense_sti")
class DenseSTIConnector(DenseConnector):
    """Sparse Token Integration: the final tokens plus each shallow layer's tokens average-pooled
    in runs of `stride` along the (row-major) token axis, appended along the token axis."""

    defaults = {"layers": None, "stride": 8, "depth": 2, "act": "gelu"}
    formula = "P + n·⌊P/8⌋"

    @classmethod
    def check_hyper(cls, hyper):
        super().check_hyper(hyper)
        check_positive_int(cls.name, "stride", hyper["stride"])

    @classmethod
    def num_tokens(cls, grid_h, grid_w, num_prefix_tokens=0, **hyper):
        n = 2 if hyper["layers"] is None else len(hyper["layers"])  # two shallow layers by default
        tokens = grid_h * grid_w + num_prefix_tokens
        return tokens + n * (tokens // hyper["stride"])

    def __init__(self, config):
        super().__init__(config)
        self.layers = mlp_projection(self.vision_hidden_size, self.text_hidden_size, self.hyper["depth"], self.hyper["act"])

    def forward(self, hidden_states):
        final, *shallow = hidden_states
        stride = self.hyper["stride"]
        pooled = [F.avg_pool1d(h.transpose(1, 2), stride, stride).transpose(1, 2) for h in shallow]  # [B, N//s, C]
        return self.layers(torch.cat([final, *pooled], dim=1))  # [B, N + n*(N//s), C] -> [..., D]


@register_connector("dense_sci")
class DenseSCIConnector(DenseConnector):
    """Sparse Channel Integration: the final features concatenated along channels with the
    shallow layers' features ((n+1)*C channels)."""

    defaults = {"layers": None, "depth": 2, "act": "gelu"}

    def __init__(self, config):
        super().__init__(config)
        self.layers = mlp_projection(self.concat_width, self.text_hidden_size, self.hyper["depth"], self.hyper["act"])

    def forward(self, hidden_states):
        return self.layers(torch.cat(hidden_states, dim=-1))  # [B, N, (n+1)C] -> [B, N, D]


@register_connector("dense_dci")
class DenseDCIConnector(DenseConnector):
    """Dense Channel Integration: the outputs of all L layers split into `groups` contiguous
    groups, each averaged, concatenated with the final features along channels ((G+1)*C)."""

    defaults = {"groups": 2, "depth": 2, "act": "gelu"}

    @classmethod
    def check_hyper(cls, hyper):
        check_mlp_hyper(cls.name, hyper)
        check_positive_int(cls.name, "groups", hyper["groups"])

    @classmethod
    def vision_layers(cls, vision_feature_layer, num_encoder_layers, **hyper):
        final = cls.final_layer(vision_feature_layer, cls.name)
        if num_encoder_layers is None:
            raise ValueError("The encoder does not say its depth (num_hidden_layers); 'dense_dci' needs it.")
        if hyper["groups"] > num_encoder_layers:
            raise ValueError(
                f"connector_config groups={hyper['groups']} is more than the encoder's {num_encoder_layers} layers "
                f"for 'dense_dci': pick groups in 1..{num_encoder_layers}."
            )
        return [final] + list(range(1, num_encoder_layers + 1))

    def __init__(self, config):
        super().__init__(config)
        in_features = self.vision_hidden_size * (self.hyper["groups"] + 1)
        self.layers = mlp_projection(in_features, self.text_hidden_size, self.hyper["depth"], self.hyper["act"])

    def forward(self, hidden_states):
        final, *all_layers = hidden_states
        n, g = len(all_layers), self.hyper["groups"]
        bounds = [i * (n // g) + min(i, n % g) for i in range(g + 1)]  # contiguous, the first n % g one longer
        means = [torch.stack(all_layers[a:b]).mean(0) for a, b in zip(bounds, bounds[1:])]  # G x [B, N, C]
        return self.layers(torch.cat([final, *means], dim=-1))  # [B, N, (G+1)C] -> [B, N, D]

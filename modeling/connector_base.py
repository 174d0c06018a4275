"""The connector contract and its registry.

A connector maps the vision encoder's hidden states to Q tokens of the language model's width.
Each connector class answers, without being built, three questions the rest of the family asks:
its `family` ("preserving": one token per patch, or "compressing": fewer), which encoder layers
it reads (`vision_layers`) and how many tokens it emits for a patch grid (`num_tokens`). The
config exposes that answer as `num_image_tokens`; the processor and the model both read it.
"""

from __future__ import annotations

import torch
from torch import nn

CONNECTORS: dict[str, type["Connector"]] = {}
FAMILIES = ("preserving", "compressing")


def register_connector(name: str):
    """Class decorator: registers a connector under its exact name."""

    def wrap(cls):
        if name in CONNECTORS:
            raise ValueError(f"A connector named {name!r} is already registered ({CONNECTORS[name].__name__}).")
        if cls.family not in FAMILIES:
            raise ValueError(f"Connector {name!r} declares family={cls.family!r}; allowed: {', '.join(FAMILIES)}.")
        cls.name = name
        CONNECTORS[name] = cls
        return cls

    return wrap


def get_connector_class(name: str) -> type["Connector"]:
    if name not in CONNECTORS:
        raise ValueError(
            f"connector_type={name!r} is not a registered connector. "
            f"Allowed values: {', '.join(sorted(CONNECTORS))}."
        )
    return CONNECTORS[name]


class Connector(nn.Module):
    """Base class. Subclasses set `family`, `defaults` (hyper-parameter name -> default value) and
    implement `forward(hidden_states) -> [batch, Q, text_hidden]`, where `hidden_states` is the
    list of `[batch, N, vision_hidden]` tensors of the layers `vision_layers` returned, in that
    order, with the encoder's prefix tokens already removed under the "default" strategy."""

    name: str = ""
    family: str = "preserving"
    defaults: dict = {}

    def __init__(self, config):
        super().__init__()
        self.hyper = config.connector_config
        self.vision_hidden_size = config.vision_config.hidden_size
        self.text_hidden_size = config.text_config.hidden_size
        self.grid = config.vision_grid

    # ---- questions answered from the config alone (no module is built) -------------------------
    @classmethod
    def resolve_hyper(cls, hyper: dict | None) -> dict:
        """The full hyper-parameter dict: the defaults updated by `hyper`, validated."""
        hyper = dict(hyper or {})
        unknown = sorted(set(hyper) - set(cls.defaults))
        if unknown:
            allowed = ", ".join(sorted(cls.defaults)) or "none"
            raise ValueError(
                f"connector_config has {', '.join(repr(k) for k in unknown)}, which the {cls.name!r} connector "
                f"does not take. Allowed hyper-parameters of {cls.name!r}: {allowed}."
            )
        resolved = {**cls.defaults, **hyper}
        cls.check_hyper(resolved)
        return resolved

    @classmethod
    def check_hyper(cls, hyper: dict) -> None:
        """Raise ValueError naming the hyper-parameter, its value and the allowed values."""

    @classmethod
    def vision_layers(cls, vision_feature_layer: int | list[int], num_encoder_layers: int, **hyper) -> list[int]:
        """Indices into the encoder's `hidden_states` (embeddings output first, then each layer)."""
        if isinstance(vision_feature_layer, int):
            return [vision_feature_layer]
        return list(vision_feature_layer)

    @classmethod
    def num_tokens(cls, grid_h: int, grid_w: int, num_prefix_tokens: int = 0, **hyper) -> int:
        """Q for a `grid_h` x `grid_w` patch grid (plus `num_prefix_tokens` kept by the "full" strategy)."""
        return grid_h * grid_w + num_prefix_tokens

    @classmethod
    def check_grid(cls, grid_h: int, grid_w: int, num_prefix_tokens: int = 0, **hyper) -> None:
        """Raise ValueError when this connector cannot handle the grid."""

    # ---- helpers for subclasses ------------------------------------------------------------------
    @staticmethod
    def concat_channels(hidden_states: list[torch.Tensor]) -> torch.Tensor:
        # k x [B, N, C] -> [B, N, k*C] (LLaVA's multi-layer features)
        return hidden_states[0] if len(hidden_states) == 1 else torch.cat(hidden_states, dim=-1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

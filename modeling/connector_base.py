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
from transformers.activations import ACT2FN

CONNECTORS: dict[str, type["Connector"]] = {}
FAMILIES = ("preserving", "compressing")
# Upper bounds of integer hyper-parameters, far above any published connector: a typo such as
# depth=100000000 fails at once instead of building modules for hours.
HYPER_LIMITS = {"depth": 64, "mlp_depth": 64, "num_layers": 64, "num_experts": 256, "top_k": 256, "num_queries": 16384,
                "hidden_size": 65536, "num_heads": 1024, "rank": 65536, "groups": 1024, "stride": 4096, "scale": 64}


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
    formula: str = "P"  # Q in terms of P patches (h x w grid), for the docs table
    source: str = ""  # the paper or project the connector comes from
    needs_grid: bool = False  # True: reshapes tokens to the h x w patch grid (no prefix tokens)
    # True: `forward(hidden_states, return_aux_loss=True)` returns (features, auxiliary training loss)
    returns_aux_loss: bool = False

    def __init__(self, config):
        super().__init__()
        self.hyper = config.connector_config
        self.vision_hidden_size = config.vision_config.hidden_size
        self.text_hidden_size = config.text_config.hidden_size
        self.grid = config.vision_grid
        # width of `concat_channels(hidden_states)`: C times the number of layers read
        self.concat_width = self.vision_hidden_size * len(config.connector_vision_layers)

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
        for key, limit in HYPER_LIMITS.items():
            value = resolved.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > limit:
                raise ValueError(f"connector_config {key}={value!r} is invalid for {cls.name!r}: use at most {limit}.")
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
        if cls.needs_grid and num_prefix_tokens:
            raise ValueError(
                f"The {cls.name!r} connector works on the patch grid and cannot take the encoder's "
                f"{num_prefix_tokens} prefix token(s): use vision_feature_select_strategy='default'."
            )

    # ---- helpers for subclasses ------------------------------------------------------------------
    @staticmethod
    def concat_channels(hidden_states: list[torch.Tensor]) -> torch.Tensor:
        # k x [B, N, C] -> [B, N, k*C] (LLaVA's multi-layer features)
        return hidden_states[0] if len(hidden_states) == 1 else torch.cat(hidden_states, dim=-1)

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        # [B, h*w, C] -> [B, C, h, w] (row-major patches)
        grid_h, grid_w = self.grid
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid_h, grid_w)

    @staticmethod
    def from_grid(grid: torch.Tensor) -> torch.Tensor:
        # [B, C, h, w] -> [B, h*w, C]
        return grid.flatten(2).transpose(1, 2)

    def reset_extra_parameters(self, std: float) -> None:
        """Initialise parameters that are not inside Linear/Conv/Norm modules (e.g. learned queries)."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def hyper_for_grid(cls, grid_h: int, grid_w: int) -> dict:
        """Hyper-parameters this connector needs at a patch grid when none are given: {} when its Q
        follows the grid by itself (every connector but those with a fixed token count)."""
        return {}

    def token_cells(self) -> tuple[int, int] | None:
        """The (rows, cols) grid of image cells its output tokens cover, one token per cell (what the
        Space draws); None when tokens are not tied to cells (learned queries)."""
        return tuple(self.grid)

    @classmethod
    def count_parameters(cls, config) -> int:
        """The parameter count of this connector for `config`, counted on the meta device (nothing allocated)."""
        with torch.device("meta"):
            return cls(config).num_parameters()


def mlp_projection(in_features: int, out_features: int, depth: int = 2, act: str = "gelu", bias: bool = True):
    """Linear(in -> out) followed by (depth - 1) x [act, Linear(out -> out)] (LLaVA-1.5's mlp2x_gelu at depth 2)."""
    layers = [nn.Linear(in_features, out_features, bias=bias)]
    for _ in range(depth - 1):
        layers += [ACT2FN[act], nn.Linear(out_features, out_features, bias=bias)]
    return nn.Sequential(*layers)


def check_mlp_hyper(name: str, hyper: dict) -> None:
    """Validates the `depth` / `act` hyper-parameters shared by every connector with an MLP."""
    if not isinstance(hyper["depth"], int) or hyper["depth"] < 1:
        raise ValueError(f"connector_config depth={hyper['depth']!r} is invalid for {name!r}: use an integer >= 1.")
    if hyper["act"] not in ACT2FN:
        raise ValueError(
            f"connector_config act={hyper['act']!r} is not an activation transformers knows. "
            f"Allowed values: {', '.join(sorted(ACT2FN))}."
        )


def check_positive_int(name: str, key: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"connector_config {key}={value!r} is invalid for {name!r}: use an integer >= {minimum}.")


def pooled_grid(name: str, grid_h: int, grid_w: int, hyper: dict) -> tuple[int, int]:
    """The output grid of a pooling connector, from `output_grid` (an int for a square, or [h, w])
    or `stride` (the grid divided by it); with neither, half the patch grid each way (Q = P/4)."""
    value, stride = hyper.get("output_grid"), hyper.get("stride")
    if value is not None and stride is not None:
        raise ValueError(f"connector_config sets both output_grid={value!r} and stride={stride!r} for {name!r}: set one.")
    if stride is not None:
        check_positive_int(name, "stride", stride)
        if grid_h % stride or grid_w % stride:
            raise ValueError(
                f"connector_config stride={stride} does not divide the {grid_h}x{grid_w} patch grid for {name!r}: "
                f"use a stride that divides both sides, or output_grid."
            )
        return grid_h // stride, grid_w // stride
    if value is None:
        return max(1, grid_h // 2), max(1, grid_w // 2)
    out = (value, value) if isinstance(value, int) else tuple(value)
    if len(out) != 2 or not all(isinstance(v, int) and v >= 1 for v in out):
        raise ValueError(f"connector_config output_grid={value!r} is invalid for {name!r}: use an int, [h, w] or null.")
    if out[0] > grid_h or out[1] > grid_w:
        raise ValueError(
            f"connector_config output_grid={value!r} is larger than the {grid_h}x{grid_w} patch grid: "
            f"{name!r} compresses, so pick at most {grid_h}x{grid_w}."
        )
    return out

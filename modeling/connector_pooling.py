"""Feature-compressing connectors that work on the h x w patch grid (Q < P)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

from .connector_base import Connector, check_mlp_hyper, check_positive_int, mlp_projection, pooled_grid, register_connector


class GridConnector(Connector):
    """A compressing connector that pools the patch grid to `pooled_grid`."""

    family = "compressing"
    needs_grid = True
    formula = "h'·w' (default ⌊h/2⌋·⌊w/2⌋ ≈ P/4)"

    @classmethod
    def num_tokens(cls, grid_h, grid_w, num_prefix_tokens=0, **hyper):
        out_h, out_w = pooled_grid(cls.name, grid_h, grid_w, hyper)
        return out_h * out_w

    @classmethod
    def check_grid(cls, grid_h, grid_w, num_prefix_tokens=0, **hyper):
        super().check_grid(grid_h, grid_w, num_prefix_tokens, **hyper)
        pooled_grid(cls.name, grid_h, grid_w, hyper)

    @property
    def out_grid(self) -> tuple[int, int]:
        return pooled_grid(self.name, *self.grid, self.hyper)

    def token_cells(self) -> tuple[int, int]:
        return self.out_grid


@register_connector("avgpool")
class AvgPoolConnector(GridConnector):
    """2-D average pooling of the patch grid (adaptive, to `output_grid`, or by `stride`), then the mlp."""

    defaults = {"output_grid": None, "stride": None, "depth": 2, "act": "gelu"}
    source = "average pooling (MoE-LLaVA's pool_mlp2x_gelu; 2410.06765)"

    @classmethod
    def check_hyper(cls, hyper):
        check_mlp_hyper(cls.name, hyper)

    def __init__(self, config):
        super().__init__(config)
        self.layers = mlp_projection(self.concat_width, self.text_hidden_size, self.hyper["depth"], self.hyper["act"])

    def forward(self, hidden_states):
        grid = self.to_grid(self.concat_channels(hidden_states))  # [B, kC, h, w]
        pooled = F.adaptive_avg_pool2d(grid, self.out_grid)  # [B, kC, h', w']
        return self.layers(self.from_grid(pooled))  # [B, h'w', D]


@register_connector("pixel_shuffle")
class PixelShuffleConnector(Connector):
    """Space-to-depth by `scale` s: each s x s block of patches becomes one token of s*s*C channels,
    ordered (row in block, column in block, channel) — nanoVLM's order; Idefics3 and InternVL
    order channels differently, so their weights do not transfer as is. Then the mlp (depth=1 is
    nanoVLM's single Linear)."""

    family = "compressing"
    needs_grid = True
    defaults = {"scale": 2, "depth": 2, "act": "gelu"}
    formula = "P/s² (s=2: P/4)"
    source = "pixel shuffle (nanoVLM, Idefics3, InternVL)"

    def token_cells(self) -> tuple[int, int]:
        return self.grid[0] // self.hyper["scale"], self.grid[1] // self.hyper["scale"]

    @classmethod
    def check_hyper(cls, hyper):
        check_mlp_hyper(cls.name, hyper)
        check_positive_int(cls.name, "scale", hyper["scale"])

    @classmethod
    def num_tokens(cls, grid_h, grid_w, num_prefix_tokens=0, **hyper):
        return (grid_h // hyper["scale"]) * (grid_w // hyper["scale"])

    @classmethod
    def check_grid(cls, grid_h, grid_w, num_prefix_tokens=0, **hyper):
        super().check_grid(grid_h, grid_w, num_prefix_tokens, **hyper)
        s = hyper["scale"]
        if grid_h % s or grid_w % s:
            allowed = [d for d in range(1, min(grid_h, grid_w) + 1) if grid_h % d == 0 and grid_w % d == 0]
            raise ValueError(
                f"connector_config scale={s} does not divide the {grid_h}x{grid_w} patch grid for 'pixel_shuffle'. "
                f"Allowed scales for this grid: {', '.join(map(str, allowed))}."
            )

    def __init__(self, config):
        super().__init__(config)
        s = self.hyper["scale"]
        in_features = self.concat_width * s * s
        self.layers = mlp_projection(in_features, self.text_hidden_size, self.hyper["depth"], self.hyper["act"])

    def forward(self, hidden_states):
        x = self.concat_channels(hidden_states)  # [B, h*w, C]
        (h, w), s, (b, _, c) = self.grid, self.hyper["scale"], x.shape
        x = x.reshape(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5)  # [B, h/s, w/s, s, s, C]
        return self.layers(x.reshape(b, (h // s) * (w // s), s * s * c))  # [B, P/s², s²C] -> [B, P/s², D]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    def __init__(self, width: int, act: str, gate: str = "sigmoid", ratio: float = 0.25):
        super().__init__()
        reduced = max(1, int(width * ratio))
        self.reduce, self.act = nn.Conv2d(width, reduced, 1), ACT2FN[act]
        self.expand, self.gate = nn.Conv2d(reduced, width, 1), (torch.sigmoid if gate == "sigmoid" else F.hardsigmoid)

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))


class ResBlock(nn.Module):
    """RegNet-Y-style bottleneck (1x1, 3x3, squeeze-excite, 1x1) with a residual, as in Honeybee's
    RegStage (written with plain convolutions and LayerNorm2d; group width 1)."""

    def __init__(self, in_width: int, width: int, act: str):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(in_width, width, 1, bias=False), LayerNorm2d(width)
        self.conv2, self.norm2 = nn.Conv2d(width, width, 3, padding=1, bias=False), LayerNorm2d(width)
        self.se = SqueezeExcite(width, act)
        self.conv3, self.norm3 = nn.Conv2d(width, width, 1, bias=False), LayerNorm2d(width)
        self.shortcut = nn.Identity() if in_width == width else nn.Sequential(
            nn.Conv2d(in_width, width, 1, bias=False), LayerNorm2d(width))
        self.act = ACT2FN[act]

    def forward(self, x):
        r = self.act(self.norm1(self.conv1(x)))
        r = self.se(self.act(self.norm2(self.conv2(r))))
        return self.act(self.shortcut(x) + self.norm3(self.conv3(r)))


@register_connector("cabstractor")
class CAbstractorConnector(GridConnector):
    """Honeybee's C-Abstractor (§3.2): `depth` residual conv blocks on the patch grid, adaptive
    average pooling to the output grid, `depth` more blocks, then an MLP readout. With depth=0 it
    is average pooling + MLP. `hidden_size` null means the encoder's width (1024 for CLIP-L, as
    Honeybee)."""

    defaults = {"output_grid": None, "depth": 3, "hidden_size": None, "mlp_depth": 2, "act": "silu"}
    source = "Honeybee C-Abstractor (arXiv 2312.06742)"

    @classmethod
    def check_hyper(cls, hyper):
        check_mlp_hyper(cls.name, {"depth": hyper["mlp_depth"], "act": hyper["act"]})
        check_positive_int(cls.name, "depth", hyper["depth"], minimum=0)
        if hyper["hidden_size"] is not None:
            check_positive_int(cls.name, "hidden_size", hyper["hidden_size"])

    def __init__(self, config):
        super().__init__(config)
        h = self.hyper
        in_width = self.concat_width
        width = h["hidden_size"] or in_width
        self.before = nn.Sequential(*(ResBlock(in_width if i == 0 else width, width, h["act"]) for i in range(h["depth"])))
        self.after = nn.Sequential(*(ResBlock(width, width, h["act"]) for _ in range(h["depth"])))
        readout_width = width if h["depth"] else in_width
        self.readout = mlp_projection(readout_width, self.text_hidden_size, h["mlp_depth"], h["act"])

    def forward(self, hidden_states):
        grid = self.before(self.to_grid(self.concat_channels(hidden_states)))  # [B, H, h, w]
        grid = self.after(F.adaptive_avg_pool2d(grid, self.out_grid))  # [B, H, h', w']
        return self.readout(self.from_grid(grid))  # [B, h'w', D]


class InvertedResidual(nn.Module):
    """MobileNetV3 block with expansion 1: depthwise 3x3 (stride 1 or 2), norm, hardswish,
    squeeze-excite (hardsigmoid), pointwise 1x1, norm; residual at stride 1."""

    def __init__(self, width: int, stride: int):
        super().__init__()
        self.depthwise = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=width, bias=False)
        self.norm1, self.act = LayerNorm2d(width), nn.Hardswish()
        self.se = SqueezeExcite(width, "relu", gate="hardsigmoid")
        self.pointwise, self.norm2 = nn.Conv2d(width, width, 1, bias=False), LayerNorm2d(width)
        self.stride = stride

    def forward(self, x):
        y = self.norm2(self.pointwise(self.se(self.act(self.norm1(self.depthwise(x))))))
        return x + y if self.stride == 1 else y


@register_connector("ldp")
class LDPConnector(GridConnector):
    """MobileVLM's lightweight downsample projector. version 2 (default, LDPv2): MLP C -> D -> D,
    adaptive average pooling to the output grid, and a depthwise 3x3 conv positional block with a
    residual. version 1 (LDP): MLP, then inverted residual blocks at stride 1 and 2 (Q = ⌈h/2⌉·⌈w/2⌉)."""

    defaults = {"version": 2, "output_grid": None, "act": "gelu"}
    source = "MobileVLM LDP / LDPv2 (arXiv 2312.16886, 2402.03766)"

    @classmethod
    def check_hyper(cls, hyper):
        check_mlp_hyper(cls.name, {"depth": 2, "act": hyper["act"]})
        if hyper["version"] not in (1, 2):
            raise ValueError(f"connector_config version={hyper['version']!r} is invalid for 'ldp'. Allowed values: 1, 2.")
        if hyper["version"] == 1 and hyper["output_grid"] is not None:
            raise ValueError("connector_config output_grid is for ldp version 2; version 1 always halves the grid (stride 2).")

    @classmethod
    def num_tokens(cls, grid_h, grid_w, num_prefix_tokens=0, **hyper):
        if hyper["version"] == 1:
            return math.ceil(grid_h / 2) * math.ceil(grid_w / 2)
        return super().num_tokens(grid_h, grid_w, num_prefix_tokens, **hyper)

    def __init__(self, config):
        super().__init__(config)
        width = self.text_hidden_size
        self.mlp = mlp_projection(self.concat_width, width, 2, self.hyper["act"])
        if self.hyper["version"] == 1:
            self.blocks = nn.Sequential(InvertedResidual(width, 1), InvertedResidual(width, 2))
        else:
            self.peg = nn.Conv2d(width, width, 3, padding=1, groups=width)

    def forward(self, hidden_states):
        grid = self.to_grid(self.mlp(self.concat_channels(hidden_states)))  # [B, D, h, w]
        if self.hyper["version"] == 1:
            grid = self.blocks(grid)  # [B, D, ⌈h/2⌉, ⌈w/2⌉]
        else:
            grid = F.adaptive_avg_pool2d(grid, self.out_grid)  # [B, D, h', w']
            grid = grid + self.peg(grid)
        return self.from_grid(grid)  # [B, Q, D]

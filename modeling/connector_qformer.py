"""Attention pooling: learned queries read the visual features (BLIP-2 Q-Former / Perceiver style)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.activations import ACT2FN

from .connector_base import Connector, check_positive_int, register_connector


class Attention(nn.Module):
    def __init__(self, width: int, kv_width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.o = nn.Linear(width, width), nn.Linear(width, width)
        self.k, self.v = nn.Linear(kv_width, width), nn.Linear(kv_width, width)

    def forward(self, x, context, return_weights: bool = False):
        b, n, width = x.shape
        heads = lambda t: t.reshape(b, t.shape[1], self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q(x)), heads(self.k(context)), heads(self.v(context))  # [B, heads, len, width/heads]
        if return_weights:  # explicit softmax, to show what each query looks at
            weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
            return self.o((weights @ v).transpose(1, 2).reshape(b, n, width)), weights
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, n, width))


class QFormerLayer(nn.Module):
    """Pre-norm: self-attention among the queries, cross-attention to the image, feed-forward."""

    def __init__(self, width: int, kv_width: int, num_heads: int, act: str):
        super().__init__()
        self.norm_self, self.self_attn = nn.LayerNorm(width), Attention(width, width, num_heads)
        self.norm_cross, self.cross_attn = nn.LayerNorm(width), Attention(width, kv_width, num_heads)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), ACT2FN[act], nn.Linear(4 * width, width))

    def forward(self, x, image, return_weights: bool = False):
        h = self.norm_self(x)
        x = x + self.self_attn(h, h)
        cross = self.cross_attn(self.norm_cross(x), image, return_weights)
        cross, weights = cross if return_weights else (cross, None)
        x = x + cross
        return x + self.ffn(self.norm_ffn(x)), weights


@register_connector("qformer")
class QFormerConnector(Connector):
    """`num_queries` learned queries through `num_layers` Q-Former layers over the (layer-normed)
    visual features, then Linear(width -> D). `hidden_size` null means min(D, 768) (BLIP-2's width);
    `num_heads` null means width // 64 (at least 1)."""

    family = "compressing"
    defaults = {"num_queries": 64, "num_layers": 2, "hidden_size": None, "num_heads": None, "act": "gelu"}
    formula = "num_queries (default 64)"
    source = "BLIP-2 Q-Former (arXiv 2301.12597) / Perceiver resampler"

    @classmethod
    def hyper_for_grid(cls, grid_h: int, grid_w: int) -> dict:
        # a fixed Q must still compress at every grid: P/4 queries, the 2x2 pools' count
        return {"num_queries": max(1, grid_h * grid_w // 4)}

    def token_cells(self) -> None:
        return None  # each query attends to every patch (the Space draws that attention)

    @classmethod
    def check_hyper(cls, hyper):
        for key in ("num_queries", "num_layers"):
            check_positive_int(cls.name, key, hyper[key])
        for key in ("hidden_size", "num_heads"):
            if hyper[key] is not None:
                check_positive_int(cls.name, key, hyper[key])
        if hyper["act"] not in ACT2FN:
            raise ValueError(f"connector_config act={hyper['act']!r} is not an activation transformers knows.")
        if hyper["hidden_size"] and hyper["num_heads"] and hyper["hidden_size"] % hyper["num_heads"]:
            raise ValueError(
                f"connector_config hidden_size={hyper['hidden_size']} is not divisible by num_heads={hyper['num_heads']} "
                "for 'qformer'."
            )

    @classmethod
    def num_tokens(cls, grid_h, grid_w, num_prefix_tokens=0, **hyper):
        return hyper["num_queries"]

    def __init__(self, config):
        super().__init__(config)
        h = self.hyper
        width = h["hidden_size"] or min(self.text_hidden_size, 768)
        num_heads = h["num_heads"] or max(1, width // 64)
        if width % num_heads:
            raise ValueError(f"qformer width {width} is not divisible by num_heads={num_heads}: set num_heads.")
        kv_width = self.concat_width
        self.queries = nn.Parameter(torch.empty(h["num_queries"], width))
        self.image_norm = nn.LayerNorm(kv_width)
        self.layers = nn.ModuleList(QFormerLayer(width, kv_width, num_heads, h["act"]) for _ in range(h["num_layers"]))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, self.text_hidden_size)
        self.reset_extra_parameters(0.02)

    def reset_extra_parameters(self, std):
        init.normal_(self.queries, std=std)  # respects weights already loaded from a checkpoint

    def forward(self, hidden_states, return_attentions: bool = False):
        image = self.image_norm(self.concat_channels(hidden_states))  # [B, N, kC]
        x = self.queries.unsqueeze(0).expand(image.shape[0], -1, -1)  # [B, Q, width]
        attentions = []
        for layer in self.layers:
            x, weights = layer(x, image, return_attentions)
            attentions.append(weights)
        out = self.proj(self.norm(x))  # [B, Q, D]
        return (out, attentions) if return_attentions else out

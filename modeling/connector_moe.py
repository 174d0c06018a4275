"""Mixture-of-experts projector (CuMo, arXiv 2405.05949): top-k token routing over MLP experts."""

from __future__ import annotations

import torch
from torch import nn

from .connector_base import Connector, check_mlp_hyper, check_positive_int, mlp_projection, register_connector


@register_connector("moe")
class MoEConnector(Connector):
    """E expert MLPs (each shaped like the `mlp` connector) and a linear router. Each token goes to
    its top-k experts, weighted by the router's softmax renormalised over those k.

    After each forward: `aux_loss` = balance_loss_coef * load-balancing loss + router_z_loss_coef *
    router z-loss (the model adds it to the training loss), and `expert_load` = the fraction of
    routed (token, expert) assignments each expert received."""

    family = "preserving"
    defaults = {"num_experts": 4, "top_k": 2, "depth": 2, "act": "gelu", "balance_loss_coef": 0.1,
                "router_z_loss_coef": 0.01}
    source = "CuMo (arXiv 2405.05949)"

    @classmethod
    def check_hyper(cls, hyper):
        check_mlp_hyper(cls.name, hyper)
        check_positive_int(cls.name, "num_experts", hyper["num_experts"])
        check_positive_int(cls.name, "top_k", hyper["top_k"])
        if hyper["top_k"] > hyper["num_experts"]:
            raise ValueError(
                f"connector_config top_k={hyper['top_k']} is larger than num_experts={hyper['num_experts']} "
                f"for 'moe': pick top_k in 1..{hyper['num_experts']}."
            )

    def __init__(self, config):
        super().__init__(config)
        h = self.hyper
        self.router = nn.Linear(self.concat_width, h["num_experts"], bias=False)
        self.experts = nn.ModuleList(
            mlp_projection(self.concat_width, self.text_hidden_size, depth=h["depth"], act=h["act"])
            for _ in range(h["num_experts"])
        )
        self.aux_loss = None
        self.expert_load = None

    def forward(self, hidden_states):
        x = self.concat_channels(hidden_states)  # [B, N, kC]
        tokens = x.reshape(-1, x.shape[-1])  # [T, kC]
        logits = self.router(tokens).float()  # [T, E], routed in fp32
        probs = logits.softmax(-1)
        weights, chosen = probs.topk(self.hyper["top_k"], dim=-1)  # [T, k]
        weights = weights / weights.sum(-1, keepdim=True)
        out = tokens.new_zeros(tokens.shape[0], self.text_hidden_size)
        for e, expert in enumerate(self.experts):
            token_idx, slot = (chosen == e).nonzero(as_tuple=True)
            if token_idx.numel():
                out.index_add_(0, token_idx, expert(tokens[token_idx]) * weights[token_idx, slot, None].to(out.dtype))
        num_experts = len(self.experts)
        # Switch/CuMo balance loss: E * sum_e (fraction of tokens whose top-1 is e) * (mean router prob of e).
        top1_fraction = torch.bincount(chosen[:, 0], minlength=num_experts).float() / chosen.shape[0]
        balance = num_experts * (top1_fraction * probs.mean(0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        self.aux_loss = self.hyper["balance_loss_coef"] * balance + self.hyper["router_z_loss_coef"] * z_loss
        self.expert_load = torch.bincount(chosen.flatten(), minlength=num_experts).float() / chosen.numel()
        return out.reshape(*x.shape[:-1], self.text_hidden_size)  # [B, N, D]

    @torch.no_grad()
    def upcycle(self, mlp_connector: nn.Module) -> None:
        """Initialises every expert from a trained `mlp` connector of the same shape (co-upcycling)."""
        source = mlp_connector.layers.state_dict()
        for expert in self.experts:
            missing, unexpected = expert.load_state_dict(source, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"Cannot upcycle: the mlp connector's layers do not match the experts "
                    f"(missing {missing}, unexpected {unexpected}); use the same depth, act and widths."
                )

"""Mixture-of-experts projector (CuMo, arXiv 2405.05949): top-k token routing over MLP experts."""

from __future__ import annotations

import torch
from torch import nn

from .connector_base import Connector, check_mlp_hyper, check_positive_int, mlp_projection, register_connector


@register_connector("moe")
class MoEConnector(Connector):
    """E expert MLPs (each shaped like the `mlp` connector) and a linear router. Each token goes to
    its top-k experts, weighted by the router's softmax renormalised over those k.

    `forward(h, return_aux_loss=True)` also returns the auxiliary loss, balance_loss_coef * load-balancing
    loss + router_z_loss_coef * router z-loss, which the model adds to the training loss (returned, as
    transformers' MoE models return their router logits, never kept on the module)."""

    returns_aux_loss = True
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

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [T, E] (fp32), the top-k weights renormalised over k and the chosen experts [T, k]."""
        logits = self.router(tokens).float()
        weights, chosen = logits.softmax(-1).topk(self.hyper["top_k"], dim=-1)
        return logits, weights / weights.sum(-1, keepdim=True), chosen

    def forward(self, hidden_states, return_aux_loss: bool = False):
        x = self.concat_channels(hidden_states)  # [B, N, kC]
        tokens = x.reshape(-1, x.shape[-1])  # [T, kC]
        logits, weights, chosen = self.route(tokens)  # [T, E], [T, k], [T, k]
        # Every expert runs on every token, weighted by a dense [T, E] matrix that is zero off the top-k:
        # no data-dependent shapes, so the model compiles as one graph (E small: the cost is E MLPs).
        dense = torch.zeros_like(logits).scatter(-1, chosen, weights).to(tokens.dtype)  # [T, E]
        out = sum(expert(tokens) * dense[:, e, None] for e, expert in enumerate(self.experts))  # [T, D]
        out = out.reshape(*x.shape[:-1], self.text_hidden_size)  # [B, N, D]
        return (out, self.auxiliary_loss(logits, chosen)) if return_aux_loss else out

    def auxiliary_loss(self, logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        num_experts = logits.shape[-1]
        # Switch/CuMo balance loss: E * sum_e (fraction of tokens whose top-1 is e) * (mean router prob of e).
        top1_fraction = nn.functional.one_hot(chosen[:, 0], num_experts).float().mean(0)  # [E], no dynamic shape
        balance = num_experts * (top1_fraction * logits.softmax(-1).mean(0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return self.hyper["balance_loss_coef"] * balance + self.hyper["router_z_loss_coef"] * z_loss

    @torch.no_grad()
    def expert_load(self, hidden_states) -> torch.Tensor:
        """The fraction of routed (token, expert) assignments each expert receives [E]."""
        x = self.concat_channels(hidden_states)
        _, _, chosen = self.route(x.reshape(-1, x.shape[-1]))
        return nn.functional.one_hot(chosen.flatten(), len(self.experts)).float().mean(0)

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

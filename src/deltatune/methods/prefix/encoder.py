"""What produces the flat prefix table ``[num_virtual_tokens, num_layers * 2 * token_dim]``."""

from __future__ import annotations

import torch
from torch import nn


class PrefixProjection(nn.Module):
    """Li & Liang's reparameterisation: a ``[tokens, token_dim]`` embedding through
    Linear-Tanh-Linear up to the flat prefix width (PEFT's ``PrefixEncoder`` shapes)."""

    def __init__(self, tokens: int, token_dim: int, hidden: int, out_width: int, zero_init: bool = False,
                 device=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": torch.float32}
        self.embedding = nn.Embedding(tokens, token_dim, **kw)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden, **kw), nn.Tanh(),
                                       nn.Linear(hidden, out_width, **kw))
        if zero_init:
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)

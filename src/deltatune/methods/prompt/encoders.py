"""Modules that produce a table of virtual-token vectors: a plain trainable table (prompt tuning,
and any folded encoder) and P-tuning's prompt encoder. Each returns ``[rows, width]`` from
``forward()``; the caller expands it over the batch."""

from __future__ import annotations

import torch
from torch import nn


class SoftPrompt(nn.Module):
    """A trainable ``[rows, width]`` table that is itself the output."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(values)

    def forward(self) -> torch.Tensor:
        return self.weight


class PromptEncoder(nn.Module):
    """P-tuning's reparameterisation: trainable input embeddings through an MLP
    (Linear-ReLU-Linear-ReLU-Linear), or through a bidirectional LSTM and a two-layer MLP head.

    Layer shapes and default initialisations are PEFT's ``PromptEncoder``'s, so parameter counts
    agree.
    """

    def __init__(self, rows: int, width: int, hidden: int, kind: str = "MLP", lstm_layers: int = 2,
                 dropout: float = 0.0, device=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": torch.float32}
        self.kind = kind
        self.embedding = nn.Embedding(rows, width, **kw)
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(width, hidden, num_layers=lstm_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(),
                                          nn.Linear(2 * hidden, width, **kw))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(width, hidden, **kw), nn.ReLU(), nn.Linear(hidden, hidden, **kw),
                                          nn.ReLU(), nn.Linear(hidden, width, **kw))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.kind == "LSTM":
            # the LSTM reads the virtual tokens as one sequence, so each output sees all of them
            x = self.lstm_head(x.unsqueeze(0))[0].squeeze(0)
        return self.mlp_head(x)


def folded(source: nn.Module) -> SoftPrompt:
    """``source`` (an encoder or reparameterisation MLP) replaced by a plain table of its current
    output, trainable if the encoder was; a table is returned as it is."""
    if isinstance(source, SoftPrompt):
        return source
    trainable = any(p.requires_grad for p in source.parameters())
    with torch.no_grad():
        values = source().detach().clone()
    table = SoftPrompt(values)
    table.weight.requires_grad_(trainable)
    return table

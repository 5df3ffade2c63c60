"""Choosing each next token (greedy, or temperature / top-k / top-p sampling with a seed) and
turning tokens into text that stops at the first stop string.

Everything here is per sequence, so requests with different settings share one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltatune.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when it stops."""

    max_tokens: int = 16  #: new tokens at most (finish reason "length")
    temperature: float = 0.0  #: 0: greedy (the most probable token every step)
    top_p: float = 1.0  #: sample from the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  #: sample from the k most probable tokens; 0: all
    seed: int | None = None  #: the same seed, prompt and adapter give the same text
    stop: tuple[str, ...] = ()  #: the text ends before the first of these (finish reason "stop")

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"temperature ({self.temperature}) must be >= 0, top_p ({self.top_p}) in (0, 1], "
                              f"top_k ({self.top_k}) >= 0")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")


class TokenChooser:
    """Picks one sequence's next tokens from its logits, with its own random generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def choose(self, logits: torch.Tensor) -> int:
        """The next token for a 1-D row of logits."""
        p = self.params
        if self.generator is None:
            return int(torch.argmax(logits))
        scores = logits.float().cpu() / p.temperature
        if 0 < p.top_k < scores.numel():
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1:
            ordered, order = torch.sort(scores, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            # drop a token when the more probable ones before it already reach top_p (the first always stays)
            drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
            scores = scores.scatter(0, order[drop], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class TextStream:
    """The text of one sequence's new tokens, released piece by piece: a piece is held back while it
    may still be the start of a stop string or ends in an incomplete character."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.tokens: list[int] = []
        self.sent = ""  #: the text released so far
        self.stopped = False  #: a stop string was met; the text ends before it

    def push(self, token: int) -> str:
        """Add ``token``; returns the text that can be released now (may be empty)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(text[:cut])
        safe = len(text.rstrip("\ufffd"))
        held = max((n for s in self.stop for n in range(1, min(len(s), safe + 1))
                    if text[safe - n:safe] == s[:n]), default=0)  # a tail that may grow into a stop string
        return self._release(text[:safe - held])

    def finish(self) -> str:
        """The rest of the text once the sequence ends without a stop string."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _release(self, text: str) -> str:
        if not text.startswith(self.sent):  # a tokenizer re-spaced earlier text: never take back what was sent
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

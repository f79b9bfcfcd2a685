"""The controller of the search (Zoph & Le, ICLR 2017): an LSTM emitting one token per decision."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..rl.policies import masked_logits
from .rules import Rule
from .space import SearchSpace

__all__ = ["Controller"]


class Controller(nn.Module):
    """LSTM controller emitting one token per decision (Zoph & Le 2017).

    Autoregressive: step ``t`` is fed the embedding of token ``t-1`` (a learned start vector at
    ``t = 0``), so later decisions can depend on earlier ones. ``faithful=True`` reproduces the
    reference code: a single LSTM step on a constant zero input shared by independent heads.
    """

    def __init__(self, space: SearchSpace, hidden: int = 100, embed: int = 32, faithful: bool = False):
        super().__init__()
        self.space, self.faithful = space, faithful
        sizes = space.n_choices()
        if faithful:
            self.lstm = nn.LSTM(input_size=1, hidden_size=hidden, batch_first=True)
        else:
            self.cell = nn.LSTMCell(embed, hidden)
            self.start = nn.Parameter(torch.zeros(embed))
            self.embeds = nn.ModuleList(nn.Embedding(n, embed) for n in sizes)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in sizes)

    def _faithful_hidden(self, batch: int) -> torch.Tensor:
        out, _ = self.lstm(torch.zeros(batch, 1, 1))
        return out[:, -1]

    def step_logits(self, prev: torch.Tensor | None, state, t: int, batch: int):
        """Logits of token ``t`` given the previous token indices ``prev`` (B,) and LSTM ``state``."""
        if self.faithful:
            h = state if state is not None else self._faithful_hidden(batch)
            return self.heads[t](h), h
        x = self.start.expand(batch, -1) if t == 0 else self.embeds[t - 1](prev)
        h, c = self.cell(x, state)
        return self.heads[t](h), (h, c)

    def sample(self, n: int, rules: Sequence[str | Rule] = (), generator: torch.Generator | None = None):
        """Sample ``n`` architectures. Returns (indices (n, T), log_prob (n,), entropy (n,)), with grad."""
        rules = self.space.parse_rules(rules)
        idx = torch.zeros(n, len(self.space.tokens), dtype=torch.long)
        log_prob, entropy = torch.zeros(n), torch.zeros(n)
        state, prev = None, None
        for t in range(len(self.space.tokens)):
            logits, state = self.step_logits(prev, state, t, n)
            masks = torch.stack([self.space.mask(rules, idx[i, :t].tolist()) for i in range(n)])
            dist = torch.distributions.Categorical(logits=masked_logits(logits, masks))
            cdf = dist.probs.detach().cumsum(1)
            u = torch.rand(n, 1, generator=generator) * cdf[:, -1:]
            last_allowed = (masks.long() * torch.arange(masks.shape[1])).max(1).values
            a = torch.minimum((cdf < u).sum(1), last_allowed)  # never a masked index, even on rounding
            idx[:, t] = a
            log_prob = log_prob + dist.log_prob(a)
            entropy = entropy + dist.entropy()
            prev = a
        return idx, log_prob, entropy

    def log_prob(self, indices: torch.Tensor, rules: Sequence[str | Rule] = ()) -> torch.Tensor:
        """Log-probability of given token sequences (teacher forcing, masks as in sampling)."""
        rules = self.space.parse_rules(rules)
        n = indices.shape[0]
        total = torch.zeros(n)
        state, prev = None, None
        for t in range(indices.shape[1]):
            logits, state = self.step_logits(prev, state, t, n)
            if rules:
                masks = torch.stack([self.space.mask(rules, indices[i, :t].tolist()) for i in range(n)])
                logits = masked_logits(logits, masks)
            total = total + torch.log_softmax(logits, 1).gather(1, indices[:, t:t + 1]).squeeze(1)
            prev = indices[:, t]
        return total

    @torch.no_grad()
    def marginals(self, rules: Sequence[str | Rule] = (), candidates: list[tuple[int, ...]] | None = None) -> dict[str, float]:
        """Exact probability of each (layer, decision, value) under the controller, by enumeration."""
        rules = self.space.parse_rules(rules)
        cands = candidates if candidates is not None else self.space.all_indices(rules)
        idx = torch.tensor(cands, dtype=torch.long)
        p = self.log_prob(idx, rules).exp()
        out = {}
        for t, (layer, name) in enumerate(self.space.tokens):
            for v_i, value in enumerate(self.space.decisions[name]):
                key = f"p/{name}={value}" if self.space.layers == 1 else f"p/l{layer}.{name}={value}"
                out[key] = float(p[idx[:, t] == v_i].sum())
        return out

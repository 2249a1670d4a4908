"""Sampling the next token of every sequence in a step, on the whole batch where possible.

Greedy rows (temperature 0) take the argmax. Other rows divide by their temperature, keep the
smallest top-p nucleus, and draw with the sequence's own `torch.Generator`, seeded from the
request's seed: the same seed gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import torch

from .sequence import Sequence


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits [V] -> logits with everything outside the top-p nucleus set to -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    cum = probs.cumsum(-1)
    drop = (cum - probs) > top_p  # keep the token that crosses top_p
    sorted_logits[drop] = float("-inf")
    return torch.empty_like(logits).scatter_(0, idx, sorted_logits)


def sample(
    logits: torch.Tensor,
    seqs: list[Sequence],
    generators: dict[int, torch.Generator],
    greedy: torch.Tensor | None = None,
) -> list[int]:
    """logits [B, V] float32 (row i for seqs[i]) -> next token id per sequence.

    `greedy` [B] is `logits.argmax(-1)` when the caller has it already (from its finiteness check).
    """
    tokens = (logits.argmax(-1) if greedy is None else greedy).tolist()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.temperature <= 0:
            continue
        row = top_p_filter(logits[i] / p.temperature, p.top_p)
        probs = row.softmax(-1).cpu()
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[seq.seq_id]).item())
    return tokens

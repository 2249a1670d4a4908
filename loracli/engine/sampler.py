"""Sampling the next token of every sequence in a step, on the whole batch where possible.

Each step, in this order (vLLM's):
1. `logit_bias` is added to the raw logits;
2. `min_tokens`: until a sequence has that many output tokens, its EOS ids (unless `ignore_eos`)
   and its `stop_token_ids` are set to -inf;
3. penalties, as vLLM (and, for the two additive ones, OpenAI) define them: `repetition_penalty`
   r over every token of prompt + output (a positive logit divided by r, a negative one
   multiplied by r), then `frequency_penalty` f and `presence_penalty` p over the output tokens
   (logit -= f * count + p * [count > 0]);
4. greedy rows (temperature 0) take the argmax of what steps 1-3 left;
5. sampled rows divide by their temperature, drop tokens below `min_p` x the top token's
   probability, keep their `top_k` best tokens and then the smallest `top_p` nucleus of those,
   and draw with the sequence's own `torch.Generator`, seeded from the request's seed.
Every step is a row-wise tensor op over just the rows that use it (none at all when no row of
the step does), so a row's result never depends on the other rows: the same seed gives the same
tokens whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import torch

from .sequence import Sequence

NEG_INF = float("-inf")


def truncate(logits: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> torch.Tensor:
    """logits [R, V] (temperature applied) -> logits [R, V] with the dropped tokens at -inf.

    Row i: tokens whose probability is below min_p[i] x the row's top probability go; then all
    but the top_k[i] best (0 = no limit); then all outside the smallest set of those best tokens
    whose probability (renormalised after top-k) reaches top_p[i] (the token crossing it is kept).
    """
    r, v = logits.shape
    out = logits.clone()
    if any(m > 0 for m in min_p):
        probs = out.softmax(-1)
        floor = torch.tensor(min_p, dtype=probs.dtype)[:, None] * probs.max(-1, keepdim=True).values  # [R, 1]
        out = out.masked_fill(probs < floor, NEG_INF)
    sorted_logits, idx = torch.sort(out, dim=-1, descending=True, stable=True)  # [R, V]
    ranks = torch.arange(v)[None, :]
    k = torch.tensor([kk if kk > 0 else v for kk in top_k])[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, NEG_INF)
    if any(p < 1.0 for p in top_p):
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # [R, V] mass of the better tokens
        sorted_logits = sorted_logits.masked_fill(before > torch.tensor(top_p)[:, None], NEG_INF)
    return torch.empty_like(out).scatter_(1, idx, sorted_logits)


def add_logit_bias(logits: torch.Tensor, rows: list[int], biases: list[dict[int, float]]) -> None:
    """logits [B, V] += biases[j] at row rows[j], in place."""
    at = [(row, tok, b) for row, bias in zip(rows, biases, strict=True) for tok, b in bias.items()]
    r, t, b = zip(*at, strict=True)
    logits.index_put_((torch.tensor(r), torch.tensor(t)), torch.tensor(b, dtype=logits.dtype), accumulate=True)


def mask_tokens(logits: torch.Tensor, rows: list[int], banned: list[Iterable[int]]) -> None:
    """logits [B, V]: row rows[j] gets -inf at every token of banned[j], in place."""
    at = [(row, tok) for row, toks in zip(rows, banned, strict=True) for tok in toks]
    if at:
        r, t = zip(*at, strict=True)
        logits[torch.tensor(r), torch.tensor(t)] = NEG_INF


def _padded(lists: list[list[int]], pad: int) -> torch.Tensor:
    width = max(map(len, lists), default=0)
    return torch.tensor([x + [pad] * (width - len(x)) for x in lists], dtype=torch.int64).reshape(len(lists), width)


def apply_penalties(
    logits: torch.Tensor,
    prompts: list[list[int]],
    outputs: list[list[int]],
    repetition: list[float],
    frequency: list[float],
    presence: list[float],
) -> torch.Tensor:
    """logits [R, V] -> penalised logits [R, V] (row i: prompts[i], outputs[i] and its penalties;
    semantics in the module doc)."""
    r, v = logits.shape
    counts = torch.zeros(r, v + 1, dtype=logits.dtype)  # column v: padding
    out_ids = _padded(outputs, v)
    counts.scatter_add_(1, out_ids, torch.ones(out_ids.shape, dtype=logits.dtype))
    counts = counts[:, :v]  # [R, V] times each token was generated
    seen = torch.zeros(r, v + 1, dtype=torch.bool)
    seen.scatter_(1, _padded(prompts, v), True)
    seen = seen[:, :v] | (counts > 0)  # [R, V] in prompt or output
    rep = torch.tensor(repetition, dtype=logits.dtype)[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - torch.tensor(frequency, dtype=logits.dtype)[:, None] * counts
    return logits - torch.tensor(presence, dtype=logits.dtype)[:, None] * (counts > 0).to(logits.dtype)


def process(logits: torch.Tensor, seqs: list[Sequence], eos_ids: Collection[int]) -> tuple[torch.Tensor, bool]:
    """Steps 1-3 of the module doc on logits [B, V]; returns (logits [B, V], whether any row changed)."""
    biased = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    early = [i for i, s in enumerate(seqs) if s.num_output < s.params.min_tokens]
    penalised = [i for i, s in enumerate(seqs) if s.params.penalized]
    if not (biased or early or penalised):
        return logits, False
    logits = logits.clone()
    if biased:
        add_logit_bias(logits, biased, [seqs[i].params.logit_bias for i in biased])
    if early:
        mask_tokens(logits, early, [_stop_ids(seqs[i].params, eos_ids) for i in early])
    if penalised:
        ps = [seqs[i] for i in penalised]
        logits[penalised] = apply_penalties(
            logits[penalised],
            [s.token_ids[: s.num_prompt] for s in ps],
            [s.output_ids for s in ps],
            [s.params.repetition_penalty for s in ps],
            [s.params.frequency_penalty for s in ps],
            [s.params.presence_penalty for s in ps],
        )
    return logits, True


def _stop_ids(params, eos_ids: Collection[int]) -> set[int]:
    """The tokens `min_tokens` holds back: the stop token ids, and EOS unless it is ignored."""
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))


def draw(logits: torch.Tensor, seqs: list[Sequence], generators: dict[int, torch.Generator]) -> list[int]:
    """Step 5 of the module doc for sampled rows: logits [R, V] (row i for seqs[i]) -> one token each."""
    temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype)[:, None]
    scaled = logits / temps  # [R, V]
    if any(s.params.truncates for s in seqs):
        ps = [s.params for s in seqs]
        scaled = truncate(scaled, [p.top_k for p in ps], [p.top_p for p in ps], [p.min_p for p in ps])
    probs = scaled.softmax(-1).cpu()
    return [int(torch.multinomial(probs[i], 1, generator=generators[s.seq_id]).item()) for i, s in enumerate(seqs)]


def sample(
    logits: torch.Tensor,
    seqs: list[Sequence],
    generators: dict[int, torch.Generator],
    greedy: torch.Tensor | None = None,
    eos_ids: Collection[int] = (),
) -> list[int]:
    """logits [B, V] float32 (row i for seqs[i]) -> next token id per sequence.

    `greedy` [B] is `logits.argmax(-1)` when the caller has it already (from its finiteness check);
    `eos_ids` are the tokens `min_tokens` masks (with each request's `stop_token_ids`).
    """
    logits, changed = process(logits, seqs, eos_ids)
    tokens = (logits.argmax(-1) if greedy is None or changed else greedy).tolist()
    hot = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
    if hot:
        drawn = draw(logits[hot], [seqs[i] for i in hot], generators)
        for i, tok in zip(hot, drawn, strict=True):
            tokens[i] = tok
    return tokens

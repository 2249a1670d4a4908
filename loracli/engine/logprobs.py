"""Logprobs of generated and prompt tokens, for the requests that ask (`SamplingParams.logprobs`,
`prompt_logprobs`).

Which values: log_softmax of the logits the model gave for that position, in float32, taken after
the grammar mask of a structured request (as vLLM v1 masks before its sampler: a forbidden
token's logprob is -inf) and before everything else the sampler does (logit_bias, min_tokens,
penalties, temperature, top-k / top-p / min-p). That is vLLM's default, `logprobs_mode =
"raw_logprobs"`: for a plain request they are exactly the model's log-probabilities, whatever the
sampling settings. Each row is computed alone (one log_softmax per row), so deterministic mode
gives a request the same values whatever else is in its batch.

- `capture(logits, seqs)`: before sampling, the log-softmax rows of the sequences that ask;
  `record(captured, seqs, tokens)` after it appends each sampled token's entry (logprob, rank
  among all tokens, the top N) to its sequence.
- `prompt_entries(logits, token_ids, n)`: logits [P, V] at every prompt position -> entry j for
  prompt token j given the tokens before it (the first token: None).
- `TokenText`: the text and exact bytes of a token id, as entries carry them.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..results import TokenLogprob
from .sequence import Sequence

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_table() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-in character for each byte -> that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenText:
    """Token id -> (text, bytes), cached: byte-level BPE tokens through the GPT-2 byte table,
    SentencePiece `<0xNN>` byte tokens as that byte, other tokens as their decoded text."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = decoder is not None and "ByteLevel" in repr(decoder)
        self.table = _byte_level_table()
        self.special = set(getattr(tokenizer, "all_special_ids", []))
        self.cache: dict[int, tuple[str, tuple[int, ...]]] = {}

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if token_id not in self.special:
            if self.byte_level and all(c in self.table for c in piece):
                return bytes(self.table[c] for c in piece)
            byte = _BYTE_TOKEN.match(piece)
            if byte:
                return bytes([int(byte.group(1), 16)])
        if token_id in self.special:
            return piece.encode()
        return self.tokenizer.convert_tokens_to_string([piece]).encode()

    def __call__(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        found = self.cache.get(token_id)
        if found is None:
            raw = self._bytes(token_id)
            found = self.cache[token_id] = (raw.decode("utf-8", errors="replace"), tuple(raw))
        return found


def _entry(row: torch.Tensor, token: int, n: int, text: TokenText) -> TokenLogprob:
    """row [V] log-probabilities -> the entry of `token`, with the top `n`."""
    value = row[token]
    rank = int((row > value).sum()) + 1
    top: tuple[TokenLogprob, ...] = ()
    if n:
        values, ids = row.topk(n)
        top = tuple(
            TokenLogprob(i, *text(i), v, k + 1)
            for k, (i, v) in enumerate(zip(ids.tolist(), values.tolist(), strict=True))
        )
    return TokenLogprob(token, *text(token), float(value), rank, top)


def capture(logits: torch.Tensor, seqs: list[Sequence]) -> dict[int, torch.Tensor]:
    """logits [B, V] (row i for seqs[i]) -> {row: log-probabilities [V]} for the rows that ask."""
    return {
        i: torch.log_softmax(logits[i].float(), dim=-1) for i, seq in enumerate(seqs) if seq.params.logprobs is not None
    }


def record(captured: dict[int, torch.Tensor], seqs: list[Sequence], tokens: list[int], text: TokenText) -> None:
    """Append the entry of each captured row's sampled token to its sequence's `logprobs`."""
    for i, row in captured.items():
        seq = seqs[i]
        seq.logprobs.append(_entry(row, tokens[i], seq.params.logprobs or 0, text))


def prompt_entries(logits: torch.Tensor, token_ids: list[int], n: int, text: TokenText) -> list[TokenLogprob | None]:
    """logits [P, V] after each of the P prompt tokens -> entry j of prompt token j given tokens
    0..j-1 (j >= 1) with the top `n`; entry 0 is None (nothing comes before the first token)."""
    out: list[TokenLogprob | None] = [None]
    for j in range(1, len(token_ids)):
        row = torch.log_softmax(logits[j - 1].float(), dim=-1)  # [V]
        out.append(_entry(row, token_ids[j], n, text))
    return out

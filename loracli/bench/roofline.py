"""The roofline: what this device's matmuls achieve, and what a generated token costs in FLOPs.

`matmul_rate(m, k, n)` times `[m x k] @ [k x n]` in the bench dtype and thread count (repeated
for at least `seconds`, best of 3 rounds) and returns FLOP/s = 2 m k n / time. `probe(spec)`
does it for the model's MLP shape `[M x hidden] @ [hidden x intermediate]` at M = 64 (a decode
batch) and M = 256 (a prefill chunk).

`flops_per_token(spec, context, lora_rank)`: the FLOPs of one generated (decode) token,

    dense     = 2 * layers * (hidden*(q + 2 kv) + q*hidden + 3 hidden*intermediate)   q/kv = heads*head_dim
    lm_head   = 2 * hidden * vocab
    attention = 4 * layers * heads * head_dim * context        (q.k scores and the weighted sum of v)
    lora      = 2 * layers * sum over targets of r * (in + out) (shrink and expand), times the share
                of requests that name an adapter

where `context` is the mean number of positions attended (mean prompt length + (mean output + 1) / 2).
This per-token figure leaves prefill out; it is kept for the report's breakdown.

`request_flops(spec, prompt_len, output_len, lora_params)` / `run_flops(spec, requests)`: the FLOPs of
a whole run, prefill included, summed exactly over the requests (P prompt tokens, O output tokens,
`lora_params` the request's LoRA parameters per layer: `lora_params_per_layer`, a mix's parts summed):

    prefill = P * (dense + lora) + lm_head + 4 * layers * heads * head_dim * P (P + 1) / 2
              (every prompt token through every layer, each attending to itself and the tokens before it;
              lm_head at the last prompt position only, which gives the first output token)
    decode  = (O - 1) * (dense + lora + lm_head) + 4 * layers * heads * head_dim * ((O - 1) P + O (O - 1) / 2)
              (decode step k = 1..O-1 feeds output token k at a context of P + k positions)

with dense, lm_head and lora per token as above (lora without the adapter share: each request counts
its own). Norms, RoPE, SiLU, softmax and sampling are left out (a few percent at most). A system's
arithmetic rate over the run is `RunFlops.total` / its timed wall seconds, and its fraction of the
roofline that over the best probed matmul rate; the `base` system runs no LoRA, so it is credited
`total - lora`. These are the workload's FLOPs, the same for every system: work a system avoids
(prompt blocks reused by prefix caching) is credited as done, so such a run's rate is an effective
one and can exceed what its matmuls computed. O is the request's `max_tokens` (exact with
ignore-eos, an upper bound without).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, astuple, dataclass

from ..model.spec import ModelSpec

PROBE_ROWS = (64, 256)


def matmul_rate(m: int, k: int, n: int, dtype, device: str = "cpu", seconds: float = 0.3) -> float:
    import torch

    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    torch.matmul(a, b)
    best = 0.0
    for _ in range(3):
        reps, t0 = 0, time.perf_counter()
        while True:
            torch.matmul(a, b)
            reps += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds / 3:
                break
        best = max(best, 2 * m * k * n * reps / elapsed)
    return best


def probe(spec: ModelSpec, dtype, device: str = "cpu", seconds: float = 0.3) -> list[dict]:
    return [
        {
            "shape": f"[{m}x{spec.hidden}]x[{spec.hidden}x{spec.intermediate}]",
            "flops_per_s": matmul_rate(m, spec.hidden, spec.intermediate, dtype, device, seconds),
        }
        for m in PROBE_ROWS
    ]


@dataclass(frozen=True)
class TokenFlops:
    dense: float
    lm_head: float
    attention: float
    lora: float
    context: float

    @property
    def total(self) -> float:
        return self.dense + self.lm_head + self.attention + self.lora

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def lora_params_per_layer(spec: ModelSpec, rank: float, targets) -> float:
    return sum(rank * sum(spec.module_shape(t)) for t in targets)


def flops_per_token(
    spec: ModelSpec, context: float, lora_rank: float = 0.0, targets=(), adapter_share: float = 1.0
) -> TokenFlops:
    q = spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    per_layer = spec.hidden * (q + 2 * kv) + q * spec.hidden + 3 * spec.hidden * spec.intermediate
    return TokenFlops(
        dense=2.0 * spec.num_layers * per_layer,
        lm_head=2.0 * spec.hidden * spec.vocab_size,
        attention=4.0 * spec.num_layers * q * context,
        lora=2.0 * spec.num_layers * lora_params_per_layer(spec, lora_rank, targets) * adapter_share,
        context=context,
    )


@dataclass(frozen=True)
class RunFlops:
    """The FLOPs of a whole run: every request's prefill and decode (see the module docstring)."""

    prefill: float  # LoRA included
    decode: float  # LoRA included
    lora: float  # the LoRA part of prefill + decode
    prefill_tokens: int  # prompt tokens through the model
    decode_tokens: int  # tokens fed by decode steps (output tokens but each request's first)

    @property
    def total(self) -> float:
        return self.prefill + self.decode

    def __add__(self, other: RunFlops) -> RunFlops:
        return RunFlops(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def request_flops(spec: ModelSpec, prompt_len: int, output_len: int, lora_params: float = 0.0) -> RunFlops:
    """One request's prefill and decode FLOPs; `lora_params` = its LoRA parameters per layer."""
    per_token = flops_per_token(spec, 0.0)  # dense and lm_head; attention depends on the position
    attention = 4.0 * spec.num_layers * spec.num_heads * spec.head_dim  # per attended position
    lora = 2.0 * spec.num_layers * lora_params
    P, steps = prompt_len, max(0, output_len - 1)
    prefill = P * (per_token.dense + lora) + per_token.lm_head + attention * P * (P + 1) / 2
    decode = steps * (per_token.dense + lora + per_token.lm_head) + attention * (steps * P + steps * (steps + 1) / 2)
    return RunFlops(prefill, decode, lora * (P + steps), P, steps)


def run_flops(spec: ModelSpec, requests: Iterable[tuple[int, int, float]]) -> RunFlops:
    """The sum of `request_flops` over (prompt_len, output_len, lora_params) triples."""
    total = RunFlops(0.0, 0.0, 0.0, 0, 0)
    for prompt_len, output_len, lora_params in requests:
        total = total + request_flops(spec, prompt_len, output_len, lora_params)
    return total

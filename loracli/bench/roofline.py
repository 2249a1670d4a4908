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
Norms, RoPE, SiLU, softmax and sampling are left out (a few percent at most); prefill work is not
counted, so the achieved rate below is a slight underestimate. The achieved FLOP/s of a system is
tokens/s x `total`; its fraction of the roofline is that over the best probed matmul rate.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

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

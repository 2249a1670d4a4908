"""Sparse mixture-of-experts MLP blocks (Mixtral, Qwen2-MoE, Qwen3-MoE), as transformers computes them.

`MoeSpec.from_hf_config(config)` (`moe_spec.py`) reads the MoE shape of a config (None for a dense model);
`MoeBlock(spec, w, layer, n_slots, max_rank, dense)` holds one sparse layer's weights, and calling it
(`block(h, lora, dense, act, deterministic)`) maps the post-attention hidden states `h [T, H]` to the
block's output `[T, H]`:

    logits  = h @ router.T                                    [T, E]  (the model dtype)
    probs   = softmax(float32(logits))                        [T, E]
    w, idx  = topk(probs, k)                                  [T, k]  (descending: rank 0 = most probable)
    w       = w / sum(w)     if `renormalize` (Mixtral always; Qwen: `norm_topk_prob`)
    y_r     = expert_{idx[:, r]}(h)                           [T, H]  expert(x) = down @ (silu(x @ gate.T) * (x @ up.T))
    c_r     = round(float32(y_r) * w[:, r])      (Mixtral: weights stay float32, product rounded once)
            = y_r * round(w[:, r])                (Qwen: weights rounded to the model dtype first)
    out     = c_0 + c_1 + ... + c_{k-1}           (summed in rank order, in the model dtype)
    out    += sigmoid(h @ shared_gate.T) * shared_expert(h)   (Qwen2-MoE only; [T, 1] * [T, H]; LoRA served)

Each expert runs once per step on the group of tokens routed to it (any rank), its outputs written
to those tokens' rank positions `c [T, k, H]` and summed per token in rank order: a token's result
never depends on which other tokens share its batch or its experts' groups. Every GEMM goes through
the caller's `dense` (`F.linear`, or `kernels.invariant.linear` in deterministic mode: row-padded, so
an expert's group size does not change a row's bits) and the activation is the caller's `act`; the
softmax, top-k and renormalisation work within a token's row, and in deterministic mode the shared
gate's sigmoid is `fixed_sigmoid` (one formula for every element).

Weights are read from a checkpoint layer's tensors in either layout transformers uses: one tensor per
expert (`experts.{e}.gate_proj|up_proj|down_proj`, Mixtral's `block_sparse_moe.experts.{e}.w1|w3|w2`)
or fused 3D tensors (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`). Experts are
stored fused: `gate_up [E, 2I, H]`, `down [E, H, I]`.

The shared expert's linears are `MultiLoraLinear`s (LoRA targets `shared_expert.gate_proj|up_proj|down_proj`,
PEFT's module names under `mlp.`), so each token adds its adapter's term there as on any linear; the
router and the experts take no LoRA (adapters with LoRA there are refused, `adapters.py`).
On the CPU this loop over experts is exact but not fast: a step costs one small GEMM pair per expert hit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ModelError
from ..kernels import LoraMeta
from .lora_linear import Dense, MultiLoraLinear
from .moe_spec import SHARED_EXPERT_TARGETS, MoeSpec

Act = Callable[[torch.Tensor], torch.Tensor]


def route(h: torch.Tensor, router: torch.Tensor, spec: MoeSpec, dense: Dense) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k], experts [T, k] int64) of each token, rank 0 the most probable expert."""
    probs = torch.softmax(dense(h, router).float(), dim=-1)  # [T, E] float32
    weights, experts = torch.topk(probs, spec.top_k, dim=-1)  # [T, k]
    if spec.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights if spec.float_weights else weights.to(h.dtype)), experts


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, dense: Dense, act: Act) -> torch.Tensor:
    """x [n, H], gate_up [2I, H], down [H, I] -> down @ (act(gate) * up) [n, H]."""
    gu = dense(x, gate_up)  # [n, 2I]
    half = gu.shape[-1] // 2
    return dense(act(gu[:, :half]) * gu[:, half:], down)


def fixed_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """1 / (1 + exp(-x)) in float32, one formula for every element (torch.sigmoid's vectorized and scalar
    loops differ, and which elements take which depends on the tensor's size), returned in x's dtype."""
    return torch.exp(-x.float()).add_(1).reciprocal_().to(x.dtype)


def _need(w: dict[str, torch.Tensor], key: str, layer: int) -> torch.Tensor:
    """Tensor `key` of a layer's checkpoint tensors; `ModelError` naming it when missing."""
    if key not in w:
        raise ModelError(f"the checkpoint lacks model.layers.{layer}.{key}")
    return w[key]


def block_prefix(w: dict[str, torch.Tensor]) -> str:
    """Where a layer's MoE block sits in the checkpoint: "block_sparse_moe." (Mixtral as saved) or "mlp."."""
    return "block_sparse_moe." if "block_sparse_moe.gate.weight" in w else "mlp."


def expert_weights(w: dict[str, torch.Tensor], spec: MoeSpec, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [E, 2I, H], down [E, H, I]) of a layer's experts, from the per-expert or fused layout."""
    p = block_prefix(w) + "experts."
    if p + "gate_up_proj" in w:
        return w[p + "gate_up_proj"], _need(w, p + "down_proj", layer)
    gate, up, down = ("w1", "w3", "w2") if p + "0.w1.weight" in w else ("gate_proj", "up_proj", "down_proj")
    experts = range(spec.num_experts)
    gate_up = [torch.cat([_need(w, f"{p}{e}.{n}.weight", layer) for n in (gate, up)]) for e in experts]  # [2I, H] each
    downs = [_need(w, f"{p}{e}.{down}.weight", layer) for e in experts]
    return torch.stack(gate_up), torch.stack(downs)


class MoeBlock:
    """One sparse layer's router, experts and (Qwen2-MoE) shared expert; see the module docstring."""

    def __init__(
        self, spec: MoeSpec, w: dict[str, torch.Tensor], layer: int, n_slots: int, max_rank: int, dense: Dense
    ):
        p = block_prefix(w)
        self.spec = spec
        self.router = _need(w, p + "gate.weight", layer)  # [E, H]
        self.gate_up, self.down = expert_weights(w, spec, layer)  # [E, 2I, H], [E, H, I]
        self.shared: tuple[MultiLoraLinear, MultiLoraLinear] | None = None  # (gate|up, down), with LoRA slots
        if spec.shared_intermediate:
            gate, up, down = SHARED_EXPERT_TARGETS
            h, s = self.router.shape[1], spec.shared_intermediate
            gate_up = torch.cat([_need(w, f"{p}{n}.weight", layer) for n in (gate, up)])  # [2S, H]
            self.shared = (
                MultiLoraLinear(gate_up, None, [s, s], [gate, up], h, n_slots, max_rank, dense),
                MultiLoraLinear(_need(w, f"{p}{down}.weight", layer), None, [h], [down], s, n_slots, max_rank, dense),
            )
            self.shared_gate = _need(w, p + "shared_expert_gate.weight", layer)  # [1, H]

    def tensors(self) -> list[torch.Tensor]:
        """The block's weights outside its `linears` (for memory accounting)."""
        return [self.router, self.gate_up, self.down] + ([self.shared_gate] if self.shared is not None else [])

    def linears(self) -> list[MultiLoraLinear]:
        """The shared expert's LoRA linears (gate|up, down); none without a shared expert."""
        return list(self.shared) if self.shared is not None else []

    def __call__(
        self, h: torch.Tensor, lora: LoraMeta | None, dense: Dense, act: Act, deterministic: bool = False
    ) -> torch.Tensor:
        """h [T, H] (post-attention-normed) -> [T, H]; `deterministic`: the shared gate's sigmoid is `fixed_sigmoid`."""
        weights, experts = route(h, self.router, self.spec, dense)  # [T, k] each
        c = h.new_empty(h.shape[0], self.spec.top_k, h.shape[1])  # [T, k, H]: each rank's weighted output
        for e in torch.unique(experts).tolist():
            rows, ranks = (experts == e).nonzero(as_tuple=True)  # [n] each: tokens routed to e, at which rank
            y = expert_mlp(h[rows], self.gate_up[e], self.down[e], dense, act)  # [n, H]
            c[rows, ranks] = (y * weights[rows, ranks, None]).to(h.dtype)
        out = c[:, 0]
        for r in range(1, self.spec.top_k):
            out = out + c[:, r]
        if self.shared is not None:
            gate_up, down = self.shared
            gu = gate_up(h, lora)  # [T, 2S]
            half = gu.shape[1] // 2
            shared = down(act(gu[:, :half]) * gu[:, half:], lora)  # [T, H]
            sigmoid = fixed_sigmoid if deterministic else torch.sigmoid
            out = out + sigmoid(dense(h, self.shared_gate)) * shared  # [T, 1] * [T, H]
        return out

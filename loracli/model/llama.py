"""The decoder (Llama / Mistral / Qwen2) over a paged KV cache, with multi-LoRA linears.

One call runs one engine step over a flat batch of T tokens:

    forward(input_ids[T], positions[T], attn: AttnMeta, lora: LoraMeta | None) -> hidden[T, H]
    logits(hidden[B, H]) -> float32 [B, V]

Prefill steps hold whole sequences (attention over their own tokens, causal); decode steps
hold one token per sequence (attention over its cached tokens). K/V of every token are
written to the cache at `attn.slot_mapping`. The math follows transformers' modeling code
(RMSNorm in float32, rotate-half RoPE from transformers' own rotary classes, SwiGLU, GQA),
so outputs match it token for token.

`deterministic=True` makes every token's logits a function of its own sequence only (batch
size, batch mix, slot placement, prefill or decode): the linears, lm_head and LoRA ops run on
row-padded GEMMs (`loracli.kernels.invariant`, `LoraMeta.invariant`), SiLU uses one formula for
every element, and attention is `fixed_attention` (fixed reduction order, the same for prefill
and decode; decode keys padded to a multiple of `key_tile`). Every other op of the forward is
elementwise or reduces within one row (RMSNorm's mean), so it is batch-invariant as it stands.
Off, the fastest kernels run (F.linear, SDPA, the cost-modelled LoRA strategy), whose last bits
depend on the batch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import LoraMeta, invariant
from . import fixed_attention
from .lora_linear import Dense, MultiLoraLinear
from .spec import ModelSpec


@dataclass
class AttnMeta:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] int64: flat KV-cache row of each token
    seq_lens: list[int]  # prefill: tokens per sequence (python, sums to T)
    gather_index: torch.Tensor | None = None  # decode: [B, L] flat KV rows, masked positions -> zero_row
    key_mask: torch.Tensor | None = None  # decode: [B, 1, 1, L] bool, True = attend
    fixed_keys: fixed_attention.DecodeKeys | None = None  # decode, deterministic: built at the first layer


def rotary_tables(config, spec: ModelSpec, max_len: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, head_dim], computed by transformers' rotary class for this model type."""
    mt = spec.model_type
    mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding") and n.lower().startswith(mt))
    rope = cls(config)
    pos = torch.arange(max_len).unsqueeze(0)
    cos, sin = rope(torch.zeros(1, dtype=dtype), pos)
    return cos[0].to(device), sin[0].to(device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class Layer:
    def __init__(self, spec: ModelSpec, w: dict[str, torch.Tensor], n_slots: int, max_rank: int, dense: Dense):
        h, q, kv = spec.hidden, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.input_norm = w["input_layernorm.weight"]
        self.post_norm = w["post_attention_layernorm.weight"]
        qkv_b = None
        if spec.qkv_bias:
            qkv_b = torch.cat([w["self_attn.q_proj.bias"], w["self_attn.k_proj.bias"], w["self_attn.v_proj.bias"]])
        self.qkv = MultiLoraLinear(
            torch.cat([w["self_attn.q_proj.weight"], w["self_attn.k_proj.weight"], w["self_attn.v_proj.weight"]]),
            qkv_b,
            [q, kv, kv],
            ["q_proj", "k_proj", "v_proj"],
            h,
            n_slots,
            max_rank,
            dense,
        )
        self.o = MultiLoraLinear(
            w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"), [h], ["o_proj"], q, n_slots, max_rank, dense
        )
        gu_b = None
        if spec.mlp_bias:
            gu_b = torch.cat([w["mlp.gate_proj.bias"], w["mlp.up_proj.bias"]])
        self.gate_up = MultiLoraLinear(
            torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]]),
            gu_b,
            [spec.intermediate, spec.intermediate],
            ["gate_proj", "up_proj"],
            h,
            n_slots,
            max_rank,
            dense,
        )
        self.down = MultiLoraLinear(
            w["mlp.down_proj.weight"],
            w.get("mlp.down_proj.bias"),
            [h],
            ["down_proj"],
            spec.intermediate,
            n_slots,
            max_rank,
            dense,
        )

    def linears(self) -> list[MultiLoraLinear]:
        return [self.qkv, self.o, self.gate_up, self.down]


class CausalLM:
    """Weights, KV cache and forward pass. Plain tensors; no autograd."""

    def __init__(
        self,
        config,
        spec: ModelSpec,
        state: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype,
        device: torch.device,
        n_slots: int,
        max_rank: int,
        max_len: int,
        deterministic: bool = False,
    ):
        self.spec, self.dtype, self.device, self.max_rank = spec, dtype, device, max_rank
        self.deterministic = deterministic
        self.dense: Dense = invariant.linear if deterministic else F.linear
        self.silu = invariant.silu if deterministic else F.silu
        self.key_tile = fixed_attention.KV_CHUNK if deterministic else 1  # decode pads its keys to a multiple

        def take(name: str) -> torch.Tensor:
            return state.pop(name).to(device=device, dtype=dtype).contiguous()

        self.embed = take("model.embed_tokens.weight")
        self.layers = []
        for i in range(spec.num_layers):
            prefix = f"model.layers.{i}."
            w = {k[len(prefix) :]: take(k) for k in [k for k in state if k.startswith(prefix)]}
            self.layers.append(Layer(spec, w, n_slots, max_rank, self.dense))
        self.norm = take("model.norm.weight")
        self.lm_head = self.embed if spec.tie_embeddings or "lm_head.weight" not in state else take("lm_head.weight")
        self.cos, self.sin = rotary_tables(config, spec, max_len, dtype, device)
        self.scale = spec.head_dim**-0.5
        self.kv: list[torch.Tensor] = []

    def allocate_kv(self, num_rows: int) -> None:
        """KV cache: per layer [2, num_rows + 1, kv_heads, head_dim] (rows = blocks * block_size).

        Left uninitialised (no zero-fill pass; on CPU, pages are touched only as blocks get used),
        except the extra last row, `zero_row`, kept zero: decode attention reads it in place of every
        masked position, so stale or never-written rows are never read (a NaN there, times a zero
        attention weight, would still be NaN).
        """
        s = self.spec
        self.kv = []  # release the old cache before allocating the new one
        self.kv = [
            torch.empty(2, num_rows + 1, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device)
            for _ in range(s.num_layers)
        ]
        for kv in self.kv:
            kv[:, num_rows].zero_()
        self.zero_row = num_rows

    def resize_kv(self, num_rows: int, blocks: dict[int, int], block_size: int) -> None:
        """Reallocate the cache at `num_rows` rows, layer by layer (one old layer alive at a time).

        `blocks` maps every block in use, old -> new; only their rows are copied (free rows are
        garbage by contract, and copying them would make untouched pages resident).
        """
        s = self.spec

        def rows(ids) -> torch.Tensor:
            return torch.tensor(
                [b * block_size + i for b in ids for i in range(block_size)], dtype=torch.int64, device=self.device
            )

        src, dst = rows(blocks), rows(blocks.values())
        for layer in range(s.num_layers):
            old = self.kv[layer]
            new = torch.empty(2, num_rows + 1, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device)
            if blocks:
                new[:, dst] = old[:, src]
            new[:, num_rows].zero_()
            self.kv[layer] = new
            del old
        self.zero_row = num_rows

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)

    def weight_bytes(self) -> int:
        seen: dict[int, int] = {}
        tensors = [self.embed, self.norm, self.lm_head, self.cos, self.sin]
        for layer in self.layers:
            tensors += [layer.input_norm, layer.post_norm]
            tensors += [t for lin in layer.linears() for t in (lin.weight, lin.bias) if t is not None]
        for t in tensors:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    def slot_bytes(self) -> int:
        """Bytes of one adapter slot across every LoRA linear (A and B at max rank)."""
        return self.spec.slot_bytes(self.max_rank, self.dtype.itemsize)

    def resize_slots(self, n_slots: int, keep: list[int]) -> None:
        for _, lin in self.linears():
            lin.resize(n_slots, keep)

    def kv_bytes_per_row(self) -> int:
        s = self.spec
        return 2 * s.num_layers * s.num_kv_heads * s.head_dim * torch.finfo(self.dtype).bits // 8

    def linears(self) -> list[tuple[int, MultiLoraLinear]]:
        return [(i, lin) for i, layer in enumerate(self.layers) for lin in layer.linears()]

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttnMeta, lora: LoraMeta | None
    ) -> torch.Tensor:
        s = self.spec
        x = self.embed[input_ids]  # [T, H]
        cos, sin = self.cos[positions], self.sin[positions]  # [T, D]
        for layer, kv in zip(self.layers, self.kv, strict=True):
            h = rms_norm(x, layer.input_norm, s.rms_eps)
            qkv = layer.qkv(h, lora)  # [T, (Hq + 2 Hkv) D]
            q_n, kv_n = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
            q = apply_rope(qkv[:, :q_n].view(-1, s.num_heads, s.head_dim), cos, sin)
            k = apply_rope(qkv[:, q_n : q_n + kv_n].view(-1, s.num_kv_heads, s.head_dim), cos, sin)
            v = qkv[:, q_n + kv_n :].view(-1, s.num_kv_heads, s.head_dim)
            kv[0].index_copy_(0, attn.slot_mapping, k)
            kv[1].index_copy_(0, attn.slot_mapping, v)
            a = self._prefill_attention(q, k, v, attn) if attn.is_prefill else self._decode_attention(q, kv, attn)
            x = x + layer.o(a, lora)
            h = rms_norm(x, layer.post_norm, s.rms_eps)
            gu = layer.gate_up(h, lora)  # [T, 2I]
            x = x + layer.down(self.silu(gu[:, : s.intermediate]) * gu[:, s.intermediate :], lora)
        return rms_norm(x, self.norm, s.rms_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense(hidden, self.lm_head).float()

    def _prefill_attention(self, q, k, v, attn: AttnMeta) -> torch.Tensor:
        """Causal attention within each sequence: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq*D]."""
        if self.deterministic:
            return fixed_attention.prefill(q, k, v, attn.seq_lens, self.scale, self.spec.sliding_window)
        outs, start, window = [], 0, self.spec.sliding_window
        for n in attn.seq_lens:
            qs, ks, vs = (t[start : start + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            if window is not None and n > window:
                i = torch.arange(n, device=q.device)
                mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale, enable_gqa=True)
            else:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=True)
            outs.append(o[0].transpose(0, 1).reshape(n, -1))
            start += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _decode_attention(self, q, kv: torch.Tensor, attn: AttnMeta) -> torch.Tensor:
        """One query per sequence over its cached keys: q [B, Hq, D] -> [B, Hq*D]."""
        if self.deterministic:
            if attn.fixed_keys is None:
                keys = fixed_attention.DecodeKeys.of(attn.gather_index, attn.key_mask[:, 0, 0], self.spec.num_kv_heads)
                attn.fixed_keys = keys
            return fixed_attention.decode(q, kv, attn.fixed_keys, self.scale)
        keys = kv[0][attn.gather_index].transpose(1, 2)  # [B, Hkv, L, D]
        vals = kv[1][attn.gather_index].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, vals, attn_mask=attn.key_mask, scale=self.scale, enable_gqa=True
        )  # [B, Hq, 1, D]
        return o.reshape(q.shape[0], -1)

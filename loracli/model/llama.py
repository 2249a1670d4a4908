"""The decoder of every family (`families.FAMILIES`, dense and MoE) over a paged KV cache, with multi-LoRA linears.

One call runs one engine step over a flat batch of T tokens:

    forward(input_ids[T], positions[T], attn: AttnMeta, lora: LoraMeta | None, vocab_slots: [T] | None) -> hidden[T, H]
    logits(hidden[B, H], slots: [B] | None) -> float32 [B, V]

`vocab_slots` / `slots` are each row's real adapter slot (-1: base model), for the adapters'
parts on the embedding and lm_head (`vocab_adapters.VocabAdapters`, `CausalLM.vocab`); they
apply even while the adapter is merged into the layers' weights (its LoRA meta slot is then -1).

Prefill steps hold whole sequences (attention over their own tokens, causal), or the tokens
after a cached prefix (`AttnMeta.context_lens`: attention also over the prefix's cached keys); decode steps
hold one token per sequence (attention over its cached tokens); a mixed step holds a prefill's
tokens, then one token per decoding sequence (`AttnMeta.decode`, `attention.step`). K/V of every token are
written to the cache at `attn.slot_mapping`. The math follows transformers' modeling code
(RMSNorm in float32, rotate-half RoPE from transformers' own rotary classes, gated MLP, GQA),
so outputs match it token for token. One layer, with the family's options (`ModelSpec.family`):

    h = norm(x) [* sqrt(H) on the embedding: Gemma]; q|k|v = qkv(h) (fused q|k|v linear or Phi-3's qkv_proj)
    q, k = rope(qk_norm(q), qk_norm(k))               (q/k norm per head: Qwen3, Gemma 3)
    a = o(attention(q, k, v; the layer's window, scale, soft cap))     (`attention`)
    x = x + [post_attention_norm](a)                   (Gemma: a norm on the attention output)
    g|u = gate_up(mlp_norm(x)); x = x + [post_ff_norm](down(act(g) * u))
                                                       (a MoE layer: x = x + moe(mlp_norm(x)), `moe.MoeBlock`)
    logits = lm_head(norm(x)) [-> cap * tanh(logits / cap): Gemma 2]

Few small ops per layer (each costs a dispatch on a [T, H] tensor): q and k are rotated in one
`apply_rope` call where they are adjacent in the qkv output (no q/k norm), the residual adds and
the gate's product are in place, and the RoPE lookup is done once per step: the same bits as the
plain expressions above.

`deterministic=True` makes every token's logits a function of its own sequence only (batch
size, batch mix, slot placement, prefill or decode): the linears, lm_head and LoRA ops run on
row-padded GEMMs (`loracli.kernels.invariant`, `LoraMeta.invariant`), SiLU, GELU and tanh use
one formula for every element (`pointwise`), and attention is `fixed_attention` (fixed reduction
order, the same for prefill and decode; decode keys padded to a multiple of `key_tile`). Every
other op of the forward is elementwise or reduces within one row (RMSNorm's mean), so it is
batch-invariant as it stands. Off, the fastest kernels run (F.linear, SDPA, the cost-modelled LoRA
strategy), whose last bits depend on the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import LoraMeta, invariant
from . import attention, fixed_attention
from .attention import AttnMeta, LayerAttn
from .lora_linear import Dense, MultiLoraLinear
from .moe import MoeBlock
from .pointwise import NORMS, activation, rms_norm, softcap, tanh_fn
from .rope import RopeTables, apply_rope, step_ends
from .spec import ModelSpec
from .vocab_adapters import VocabAdapters

__all__ = ["AttnMeta", "CausalLM", "Layer", "rms_norm"]


class Layer:
    """One decoder layer's weights: its four multi-LoRA linears, norms, window and rotary kind.

    `w` holds the layer's checkpoint tensors without the `model.layers.N.` prefix. The q|k|v and
    gate|up linears are one fused `MultiLoraLinear` each: three / two sub-projections (LoRA targets
    q_proj, k_proj, v_proj / gate_proj, up_proj), or one (Phi-3's qkv_proj / gate_up_proj).
    """

    def __init__(self, spec: ModelSpec, index: int, w: dict[str, torch.Tensor], n_slots: int, max_rank: int, dense):
        fam = spec.family
        h, inter = spec.hidden, spec.intermediate
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.window = spec.layer_windows[index] if spec.layer_windows else spec.sliding_window
        self.rope_kind = spec.rope_kinds[index] if spec.rope_kinds else "default"
        self.input_norm = w["input_layernorm.weight"]
        if fam.sandwich_norms:  # Gemma: post_attention_layernorm is on the attention output
            self.attn_out_norm = w["post_attention_layernorm.weight"]
            self.mlp_norm = w["pre_feedforward_layernorm.weight"]
            self.mlp_out_norm = w["post_feedforward_layernorm.weight"]
        else:
            self.attn_out_norm, self.mlp_norm, self.mlp_out_norm = None, w["post_attention_layernorm.weight"], None
        self.q_norm = w["self_attn.q_norm.weight"] if fam.qk_norm else None
        self.k_norm = w["self_attn.k_norm.weight"] if fam.qk_norm else None

        def linear(names: list[str], parent: str, splits: list[int], fan_in: int) -> MultiLoraLinear:
            weight = torch.cat([w[f"{parent}.{n}.weight"] for n in names])
            biases = [w.get(f"{parent}.{n}.bias") for n in names]
            bias = torch.cat(biases) if all(b is not None for b in biases) else None
            return MultiLoraLinear(weight, bias, splits, names, fan_in, n_slots, max_rank, dense)

        if fam.fused_qkv:
            self.qkv = linear(["qkv_proj"], "self_attn", [q + 2 * kv], h)
        else:
            self.qkv = linear(["q_proj", "k_proj", "v_proj"], "self_attn", [q, kv, kv], h)
        self.o = linear(["o_proj"], "self_attn", [h], q)
        moe = spec.moe if spec.is_sparse(index) else None
        self.moe = MoeBlock(moe, w, index, n_slots, max_rank, dense) if moe is not None else None
        if self.moe is not None:  # a MoE layer: no gated MLP (LoRA targets: the shared expert's, if any)
            return
        if fam.fused_gate_up:
            self.gate_up = linear(["gate_up_proj"], "mlp", [2 * inter], h)
        else:
            self.gate_up = linear(["gate_proj", "up_proj"], "mlp", [inter, inter], h)
        self.down = linear(["down_proj"], "mlp", [h], inter)

    def norms(self) -> list[torch.Tensor]:
        return [t for t in (self.input_norm, self.attn_out_norm, self.mlp_norm, self.mlp_out_norm) if t is not None]

    def linears(self) -> list[MultiLoraLinear]:
        mlp = self.moe.linears() if self.moe is not None else [self.gate_up, self.down]
        return [self.qkv, self.o, *mlp]


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
        self.act = activation(spec.activation, deterministic)  # SiLU or tanh-GELU
        self.tanh = tanh_fn(deterministic)
        self.norm_fn = NORMS[spec.family.norm]
        self.key_tile = fixed_attention.KV_CHUNK if deterministic else 1  # decode pads its keys to a multiple

        def take(name: str) -> torch.Tensor:
            return state.pop(name).to(device=device, dtype=dtype).contiguous()

        self.embed = take("model.embed_tokens.weight")
        self.layers = []
        for i in range(spec.num_layers):
            prefix = f"model.layers.{i}."
            w = {k[len(prefix) :]: take(k) for k in [k for k in state if k.startswith(prefix)]}
            self.layers.append(Layer(spec, i, w, n_slots, max_rank, self.dense))
        self.norm = take("model.norm.weight")
        self.lm_head = self.embed if spec.tie_embeddings or "lm_head.weight" not in state else take("lm_head.weight")
        self.vocab = VocabAdapters(n_slots)  # per-slot embedding / lm_head parts of the adapters that have them
        self.rope = RopeTables(config, spec, max_len, dtype, device)
        # Gemma: the embedding times sqrt(hidden), the factor rounded to the model dtype as transformers does
        self.embed_scale = torch.tensor(spec.hidden**0.5).to(dtype) if spec.family.embed_scale else None
        self.attn = [
            LayerAttn(spec.scale, layer.window, spec.attn_softcap, self.tanh, spec.num_kv_heads)
            for layer in self.layers
        ]
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
        tensors = [self.embed, self.norm, self.lm_head, *self.rope.tensors()]
        for layer in self.layers:
            tensors += layer.norms() + [t for t in (layer.q_norm, layer.k_norm) if t is not None]
            tensors += layer.moe.tensors() if layer.moe is not None else []
            tensors += [t for lin in layer.linears() for t in (lin.weight, lin.bias) if t is not None]
        for t in tensors:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    def slot_bytes(self) -> int:
        """Bytes of one adapter slot across every LoRA linear (A, B at max rank; the DoRA and bias tables)."""
        return self.spec.slot_bytes(self.max_rank, self.dtype.itemsize)

    def resize_slots(self, n_slots: int, keep: list[int]) -> None:
        for _, lin in self.linears():
            lin.resize(n_slots, keep)
        self.vocab.resize(n_slots, keep)

    def kv_bytes_per_row(self) -> int:
        s = self.spec
        return 2 * s.num_layers * s.num_kv_heads * s.head_dim * torch.finfo(self.dtype).bits // 8

    def linears(self) -> list[tuple[int, MultiLoraLinear]]:
        return [(i, lin) for i, layer in enumerate(self.layers) for lin in layer.linears()]

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttnMeta,
        lora: LoraMeta | None,
        vocab_slots: list[int] | None = None,
    ) -> torch.Tensor:
        s = self.spec
        x = self.vocab.embed(input_ids, vocab_slots, self.embed, self.dense)  # [T, H]
        if self.embed_scale is not None:
            x = x * self.embed_scale
        norm, eps = self.norm_fn, s.rms_eps
        ends = step_ends(positions, attn.token_counts(), attn.is_prefill) if self.rope.switch is not None else None
        tables = self.rope.lookup(positions, ends)  # kind -> cos, signed sin [T, 1, R]
        hq, hkv, qk_n = s.num_heads, s.num_kv_heads, (s.num_heads + s.num_kv_heads) * s.head_dim
        for layer, kv, layer_attn in zip(self.layers, self.kv, self.attn, strict=True):
            qkv = layer.qkv(norm(x, layer.input_norm, eps), lora)  # [T, (Hq + 2 Hkv) D]
            qk = qkv[:, :qk_n].view(-1, hq + hkv, s.head_dim)  # q | k heads, adjacent in each row
            v = qkv[:, qk_n:].view(-1, hkv, s.head_dim)
            cos, sin = tables[layer.rope_kind]
            if layer.q_norm is None:  # one RoPE call over q and k
                qk = apply_rope(qk, cos, sin)
                q, k = qk[:, :hq], qk[:, hq:]
            else:  # per head norms, before RoPE
                q = apply_rope(norm(qk[:, :hq], layer.q_norm, eps), cos, sin)
                k = apply_rope(norm(qk[:, hq:], layer.k_norm, eps), cos, sin)
            kv[0].index_copy_(0, attn.slot_mapping, k)
            kv[1].index_copy_(0, attn.slot_mapping, v)
            a = layer.o(attention.step(q, k, v, kv, attn, layer_attn, self.deterministic), lora)
            x.add_(a if layer.attn_out_norm is None else norm(a, layer.attn_out_norm, eps))  # x: new this step
            m = self._mlp(layer, norm(x, layer.mlp_norm, eps), lora)
            x.add_(m if layer.mlp_out_norm is None else norm(m, layer.mlp_out_norm, eps))
        return norm(x, self.norm, eps)

    def _mlp(self, layer: Layer, h: torch.Tensor, lora: LoraMeta | None) -> torch.Tensor:
        """The gated MLP: down(act(gate) * up), h [T, H] -> [T, H]; or the layer's MoE block (no LoRA)."""
        if layer.moe is not None:
            return layer.moe(h, lora, self.dense, self.act, self.deterministic)
        gu = layer.gate_up(h, lora)  # [T, 2I]: gate | up
        inter = self.spec.intermediate
        return layer.down(self.act(gu[:, :inter]).mul_(gu[:, inter:]), lora)  # act's output is a new tensor

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, slots: list[int] | None = None) -> torch.Tensor:
        out = self.vocab.logits(hidden, slots, self.lm_head, self.dense)
        return out if self.spec.final_softcap is None else softcap(out, self.spec.final_softcap, self.tanh)

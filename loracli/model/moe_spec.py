"""`MoeSpec`: the mixture-of-experts shape of a Mixtral / Qwen2-MoE / Qwen3-MoE config (torch-free).

`MoeSpec.from_hf_config(config)` is None for any other model type. `sparse[i]` says whether layer i's
MLP is a MoE block (`moe.MoeBlock`) or a dense gated MLP: Mixtral's are all sparse; Qwen's follow
transformers' rule, sparse unless i is in `mlp_only_layers`, and only when `(i + 1) % decoder_sparse_step == 0`.
A sparse layer's LoRA targets are its attention linears and, on Qwen2-MoE, its shared expert's
(`SHARED_EXPERT_TARGETS`); the router and the experts take none.
"""

from __future__ import annotations

from dataclasses import dataclass

MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
# Qwen2-MoE's shared expert: LoRA targets of its sparse layers, named by their path under `mlp.` (PEFT's names)
SHARED_EXPERT_TARGETS = ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj")


@dataclass(frozen=True)
class MoeSpec:
    num_experts: int
    top_k: int
    renormalize: bool  # divide the top-k probabilities by their sum
    float_weights: bool  # routing weights stay float32 when applied (Mixtral), else rounded to the model dtype
    expert_intermediate: int
    shared_intermediate: int  # 0: no shared expert
    sparse: tuple[bool, ...]  # per layer: a MoE block (True) or a dense MLP (False)

    @classmethod
    def from_hf_config(cls, config) -> MoeSpec | None:
        """The MoE shape of a Mixtral / Qwen2-MoE / Qwen3-MoE config; None for any other model type."""
        mt = getattr(config, "model_type", None)
        if mt not in MOE_TYPES:
            return None
        n = config.num_hidden_layers
        if mt == "mixtral":
            return cls(
                num_experts=config.num_local_experts,
                top_k=config.num_experts_per_tok,
                renormalize=True,
                float_weights=True,
                expert_intermediate=config.intermediate_size,
                shared_intermediate=0,
                sparse=(True,) * n,
            )
        only_dense = set(getattr(config, "mlp_only_layers", None) or [])
        step = config.decoder_sparse_step
        return cls(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            renormalize=bool(config.norm_topk_prob),
            float_weights=False,
            expert_intermediate=config.moe_intermediate_size,
            shared_intermediate=getattr(config, "shared_expert_intermediate_size", 0) if mt == "qwen2_moe" else 0,
            sparse=tuple(i not in only_dense and config.num_experts > 0 and (i + 1) % step == 0 for i in range(n)),
        )

    def working_width(self, hidden: int) -> int:
        """Values per token a MoE block holds beyond a dense MLP's: the routed outputs [k, H], an expert's and
        the shared expert's gate|up [2I], [2S], the router's probabilities [E] (an upper bound)."""
        return self.top_k * hidden + 2 * self.expert_intermediate + 2 * self.shared_intermediate + self.num_experts

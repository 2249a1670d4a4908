"""MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers + PEFT, float32.

Each family: a tiny random model built from its own transformers config class (2 layers, hidden 64, top-2 of 4
or 8 experts; the Qwen ones with a dense MLP in layer 0, `mlp_only_layers`; Qwen2-MoE with its shared expert,
renormalised top-k; Qwen3-MoE with q/k norm and no renormalisation), two random PEFT adapters (attention;
Qwen2-MoE: + the dense layer's MLP and the shared expert), and a mixed batch of raw and chat prompts with
base-model requests among them: greedy tokens equal PEFT's, each adapter alone, and the last-step logits
within 1e-4 relative. Deterministic mode gives the same tokens at max_num_seqs 1 and 8 (float32 and bfloat16);
a merged adapter gives the unmerged logits; a checkpoint with fused 3D expert tensors loads as the per-expert
one; memory accounting counts every expert. LoRA on the experts, the router or the shared expert's gate is
refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from runs import tiny_engine
from test_engine_vs_peft import assert_matches_peft
from test_merge import assert_merge_matches_the_lora_path
from tiny import make_adapter, make_config_model

from loracli.adapters import load_adapter
from loracli.errors import AdapterError
from loracli.model.loader import load_config
from loracli.model.moe import MoeSpec
from loracli.requests import Request

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]
ADAPTERS = ["attn4", "mlp8", None]
PROMPTS = [
    {"prompt": "the quick brown fox"},
    {"messages": [{"role": "user", "content": "what is the capital of france?"}]},
    {"prompt": "tell me a story about a robot who learns to paint and"},
    {"messages": [{"role": "user", "content": "hello"}]},
]
MAX_TOKENS = 8


def make_moe_model(folder, family: str):
    qwen = dict(moe_intermediate_size=32, mlp_only_layers=[0], decoder_sparse_step=1)
    own = {
        "mixtral": ("MixtralConfig", dict(num_local_experts=4)),
        "qwen2_moe": (
            "Qwen2MoeConfig",
            dict(num_experts=4, norm_topk_prob=True, shared_expert_intermediate_size=48, **qwen),
        ),
        "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, norm_topk_prob=False, head_dim=16, **qwen)),
    }
    cls_name, extra = own[family]
    biases_and_norms = ("q_proj.bias", "k_proj.bias", "v_proj.bias", "norm.weight")
    noise = (lambda name: name.endswith(biases_and_norms), 0.2)  # make biases and q/k norms matter
    return make_config_model(folder, cls_name, 3, noise, num_experts_per_tok=2, tie_word_embeddings=False, **extra)


def make_moe_adapter(model_dir, out, *, r, targets, layers=None, seed):
    """A PEFT LoRA adapter with random non-zero A and B on `targets` of `layers` (None: all)."""
    return make_adapter(model_dir, out, r=r, targets=targets, seed=seed, layers_to_transform=layers)


@pytest.fixture(scope="module", params=FAMILIES)
def moe(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_dir = make_moe_model(root / "model", request.param)
    adapters = root / "adapters"
    make_moe_adapter(model_dir, adapters / "attn4", r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=11)
    # Qwen2-MoE: the dense layer 0's MLP and layer 1's shared expert. On Qwen3-MoE, PEFT 0.21 turns gate_proj /
    # up_proj / down_proj (names or a regex) into `target_parameters` on the fused experts (refused: the last test)
    # and drops the dense layer's MLP, so there (as on Mixtral, which has no dense MLP) it is attention only.
    if request.param == "qwen2_moe":
        make_moe_adapter(
            model_dir, adapters / "mlp8", r=8, targets=("v_proj", "gate_proj", "up_proj", "down_proj"), seed=12
        )
    else:
        make_moe_adapter(model_dir, adapters / "mlp8", r=8, targets=("q_proj", "v_proj"), layers=[0], seed=12)
    return request.param, model_dir, adapters


def requests_for(adapters, prompts) -> list[Request]:
    params = {"max_tokens": MAX_TOKENS, "ignore_eos": True}
    return [Request(id=f"{a}-{i}", adapter=a, params=params, **p) for a in adapters for i, p in enumerate(prompts)]


def test_spec_reads_the_moe_shape(moe):
    family, model_dir, _ = moe
    _, spec = load_config(model_dir)
    m = spec.moe
    assert isinstance(m, MoeSpec)
    assert (m.num_experts, m.top_k) == ({"mixtral": 4, "qwen2_moe": 4, "qwen3_moe": 8}[family], 2)
    assert m.sparse == ((True, True) if family == "mixtral" else (False, True))
    assert m.renormalize == (family != "qwen3_moe")
    assert m.shared_intermediate == (48 if family == "qwen2_moe" else 0)


def test_sparse_layers_follow_mlp_only_layers_and_decoder_sparse_step():
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3], num_experts=4)
    assert MoeSpec.from_hf_config(config).sparse == (False, True, False, False, False, True)


def _fused_checkpoint(model_dir, out_dir, family: str):
    """A copy of the model folder with each layer's experts as transformers 5 holds them in memory: fused 3D
    `mlp.experts.gate_up_proj [E, 2I, H]` (gate rows first) and `mlp.experts.down_proj [E, H, I]`, router `mlp.gate`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    fused = {}
    for layer in range(2):
        old = f"model.layers.{layer}.{'block_sparse_moe' if family == 'mixtral' else 'mlp'}."
        new = f"model.layers.{layer}.mlp."
        experts = sorted(
            {int(k[len(old + "experts.") :].split(".")[0]) for k in state if k.startswith(old + "experts.")}
        )
        if not experts:
            continue
        parts = [[state.pop(f"{old}experts.{e}.{n}.weight") for e in experts] for n in names]
        fused[new + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([g, u]) for g, u in zip(parts[0], parts[1], strict=True)]
        )
        fused[new + "experts.down_proj"] = torch.stack(parts[2])
        fused[new + "gate.weight"] = state.pop(old + "gate.weight")
    save_file({**state, **fused}, str(out_dir / "model.safetensors"))
    return out_dir


def test_fused_expert_checkpoint_gives_the_same_logits(moe, tmp_path):
    family, model_dir, adapters = moe
    fused_dir = _fused_checkpoint(model_dir, tmp_path / "fused", family)
    ids = [5, 17, 42, 99, 7]
    for adapter in ADAPTERS:
        per_expert = tiny_engine(model_dir, adapters, deterministic=True).next_token_logits(adapter, ids)
        assert torch.equal(
            tiny_engine(fused_dir, adapters, deterministic=True).next_token_logits(adapter, ids), per_expert
        )


def test_memory_accounting_counts_experts_and_only_real_lora_targets(moe):
    from safetensors import safe_open

    _, model_dir, adapters = moe
    engine = tiny_engine(model_dir, adapters)
    model = engine.model
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        checkpoint = sum(torch.Size(f.get_slice(k).get_shape()).numel() * 4 for k in f.keys())  # float32
    rope = sum(t.numel() * t.element_size() for t in model.rope.tensors())
    assert model.weight_bytes() == checkpoint + rope  # every expert, router and shared-expert tensor counted
    allocated = sum(lin.buffer_bytes() for _, lin in model.linears())
    assert model.slot_bytes() * engine.slots.n_slots == allocated  # a MoE slot holds its attention targets only


def test_greedy_tokens_and_logits_match_peft(moe):
    _, model_dir, adapters = moe
    engine = tiny_engine(model_dir, adapters, max_loras=2)
    reqs = requests_for(ADAPTERS, PROMPTS)
    results = {r.id: r for r in engine.generate(reqs)}
    assert len(results) == len(reqs)
    assert {engine.tokenize(r)[0] for r in reqs if r.messages} == {engine.tokenizer.bos_token_id}  # chat form used
    for req in reqs:
        assert_matches_peft(engine, model_dir, adapters, req, results[req.id], MAX_TOKENS)
    per_adapter = {a: tuple(results[f"{a}-0"].token_ids) for a in ADAPTERS}
    assert len(set(per_adapter.values())) == len(ADAPTERS), per_adapter  # the adapters change the output


def test_merged_adapter_gives_the_unmerged_logits(moe):
    _, model_dir, adapters = moe
    assert_merge_matches_the_lora_path(tiny_engine(model_dir, adapters, max_loras=2), "mlp8")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moe_block_gives_a_row_the_same_bits_in_any_batch(moe, dtype):
    _, model_dir, _ = moe
    model = tiny_engine(model_dir, deterministic=True, dtype=dtype).model
    block = next(layer.moe for layer in model.layers if layer.moe is not None)
    torch.manual_seed(0)
    h = torch.randn(70, 64).to(model.dtype)  # [T, H]; 70 rows: whole 16-row tiles and a padded rest
    full = block(h, None, model.dense, model.act, True)
    for a, b in [(0, 1), (3, 5), (10, 13), (20, 37), (0, 64)]:
        assert torch.equal(block(h[a:b], None, model.dense, model.act, True), full[a:b]), (a, b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_deterministic_same_tokens_at_any_batch_size(moe, dtype):
    _, model_dir, adapters = moe
    reqs = requests_for(ADAPTERS, PROMPTS * 2)
    runs = []
    for n in (1, 8):
        # merge_policy "never": a merged adapter's tokens may differ in bfloat16 (README), and at one
        # sequence per step the queue of one adapter would get it merged
        engine = tiny_engine(model_dir, adapters, deterministic=True, max_num_seqs=n, dtype=dtype, merge_policy="never")
        runs.append({r.id: (r.token_ids, r.error) for r in engine.generate(reqs)})
    assert runs[0] == runs[1]
    assert len(runs[0]) == len(reqs) and all(error is None for _, error in runs[0].values())


def _add_tensors(adapter_dir, shapes: dict[str, tuple[int, ...]], out_dir, targets: list[str], **config):
    """A copy of an adapter with random tensors of `shapes` added, `targets` added to its target_modules
    and `config`'s fields set."""
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    tensors.update({name: torch.randn(shape) for name, shape in shapes.items()})
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["target_modules"] = sorted(set(cfg["target_modules"]) | set(targets))
    cfg.update(config)
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg))
    return out_dir


def test_lora_on_experts_or_router_is_refused_in_one_line(moe, tmp_path):
    family, model_dir, adapters = moe
    _, spec = load_config(model_dir)
    moe_block = "block_sparse_moe" if family == "mixtral" else "mlp"
    expert = "w1" if family == "mixtral" else "gate_proj"
    cases = {
        f"{moe_block}.experts.3.{expert}": ("expert", (4, 64), [expert]),
        f"{moe_block}.gate": ("router", (4, 64), ["gate"]),
    }
    if family == "qwen2_moe":
        cases["mlp.shared_expert_gate"] = ("shared expert gate", (4, 64), ["shared_expert_gate"])
    for i, (module, (kind, shape, targets)) in enumerate(cases.items()):
        key = f"base_model.model.model.layers.1.{module}.lora_A.weight"
        bad = _add_tensors(adapters / "attn4", {key: shape}, tmp_path / f"bad{i}", targets)
        with pytest.raises(AdapterError) as e:
            load_adapter(bad, spec)
        message = str(e.value)
        assert "\n" not in message and str(bad) in message and f"layers.1.{module}" in message, message
        assert f"LoRA on the {kind}" in message and "not served" in message, message
    if family != "mixtral":  # the sparse layer has no dense MLP: a gate_proj pair there is refused
        key = "base_model.model.model.layers.1.mlp.gate_proj.lora_"
        pair = {key + "A.weight": (8, 64), key + "B.weight": (96, 8)}
        bad = _add_tensors(adapters / "mlp8", pair, tmp_path / "sparse_mlp", ["gate_proj"], layers_to_transform=None)
        with pytest.raises(
            AdapterError, match=r"layer 1 gate_proj: layer 1 is a MoE layer: it has no gate_proj \(LoRA"
        ):
            load_adapter(bad, spec)


def test_target_parameters_adapter_is_refused_through_the_engine(moe, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, model_dir, adapters = moe
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    cfg = LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"], task_type="CAUSAL_LM")
    folder = tmp_path / "adapters"
    get_peft_model(base, cfg).save_pretrained(str(folder / "fused"))
    engine = tiny_engine(model_dir, folder)
    [res] = engine.generate([Request(id="x", adapter="fused", prompt="hello", params={"max_tokens": 2})])
    assert res.error is not None and "target_parameters" in res.error.message, res.error
    assert "\n" not in res.error.message

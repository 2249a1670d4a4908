"""Every dense family against transformers + PEFT, prompt by prompt, float32 (issue 19).

For Qwen3 (q/k norm), Gemma 2 (1 + w norms, tanh-GELU, sandwich norms, scaled embedding,
query_pre_attn_scalar, attention and final soft-capping, alternating sliding window 8), Gemma 3 text
(q/k norm, local RoPE base on sliding layers), Phi-3 (fused qkv_proj / gate_up_proj checkpoint tensors
and LoRA targets, LongRoPE) and Llama with rope scaling (llama3, yarn, linear, dynamic): a tiny random
model built here from the family's own config class, random PEFT adapters of different ranks on every
linear the family has, and a mixed batch of raw and chat prompts with base-model requests through the
engine; each request's greedy tokens equal PEFT's for its adapter alone, and its last-step logits are
within 1e-4 relative. Prompts plus generation run past the sliding window. Also: deterministic mode
gives Gemma 2 the same tokens at max_num_seqs 1 and 8; merge/unmerge and dynamic slots on Phi-3's
fused targets; an unknown model type is refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from runs import tiny_engine
from test_engine_vs_peft import assert_close_logits, greedy
from test_merge import assert_merge_matches_the_lora_path
from tiny import make_adapter, make_config_model

from loracli.errors import ModelError
from loracli.model.spec import ModelSpec
from loracli.requests import Request
from loracli.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_TOKENS = 10
PROMPTS = [
    "tell me a story about a robot who learns to paint and the sea",
    [{"role": "user", "content": "what is the capital of france? tell me"}],
    "hello",
]
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.5],
    "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 9.0],
    "original_max_position_embeddings": 64,
}
CASES = {
    "qwen3": ("Qwen3Config", {}, ATTN + MLP),
    "gemma2": (
        "Gemma2Config",
        dict(sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=3.0, final_logit_softcapping=4.0),
        ATTN + MLP,
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16),
        ATTN + MLP,
    ),
    "phi3": ("Phi3Config", dict(rope_parameters=LONGROPE, original_max_position_embeddings=64), FUSED),
    "llama3": (
        "LlamaConfig",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
        ATTN + MLP,
    ),
    "yarn": (
        "LlamaConfig",
        dict(
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
        ATTN + MLP,
    ),
    "linear": (
        "LlamaConfig",
        dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        ATTN,
    ),
    "dynamic": (
        "LlamaConfig",
        dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
        MLP,
    ),
}


def make_family_model(folder, case: str):
    cls_name, extra, _ = CASES[case]
    noise = (lambda name: "norm" in name, 0.3)  # norms away from their init (1 or 0), so a wrong norm formula shows
    return make_config_model(folder, cls_name, list(CASES).index(case), noise, head_dim=16, **extra)


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    case = request.param
    root = tmp_path_factory.mktemp(case)
    model_dir = make_family_model(root / "model", case)
    targets = CASES[case][2]
    adapters = root / "adapters"
    make_adapter(model_dir, adapters / "low", r=4, targets=targets, seed=21)
    make_adapter(model_dir, adapters / "high", r=16, alpha=8, rslora=True, targets=targets, seed=22)
    return case, model_dir, adapters


class Reference:
    """transformers (+ PEFT) greedy tokens and per-step logits, one model per adapter, loaded once."""

    def __init__(self, model_dir, adapters_dir):
        self.model_dir, self.adapters_dir, self.models = model_dir, adapters_dir, {}

    def model(self, adapter):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if adapter not in self.models:
            m = AutoModelForCausalLM.from_pretrained(str(self.model_dir), torch_dtype=torch.float32)
            if adapter is not None:
                m = PeftModel.from_pretrained(m, str(self.adapters_dir / adapter))
            self.models[adapter] = m.eval()
        return self.models[adapter]

    def generate(self, adapter, prompt_ids):
        tokens, logits = greedy(self.model(adapter), prompt_ids, MAX_TOKENS)
        return tokens, logits[-1]


def requests(adapters=(None, "low", "high")) -> list[Request]:
    reqs = []
    for i, (a, p) in enumerate((a, p) for p in PROMPTS for a in adapters):
        form = {"messages": p} if isinstance(p, list) else {"prompt": p}
        reqs.append(Request(id=f"{a}-{i}", adapter=a, params={"max_tokens": MAX_TOKENS, "ignore_eos": True}, **form))
    return reqs


@pytest.mark.parametrize("family", list(CASES), indirect=True)
def test_family_matches_transformers_and_peft(family):
    case, model_dir, adapters = family
    engine = tiny_engine(model_dir, adapters, max_num_seqs=8)
    results = {r.id: r for r in engine.generate(requests())}
    ref = Reference(model_dir, adapters)
    longest = 0
    for req in requests():
        res = results[req.id]
        assert res.error is None, res.error
        prompt_ids = engine.tokenize(req)
        longest = max(longest, len(prompt_ids) + MAX_TOKENS)
        tokens, last_logits = ref.generate(req.adapter, prompt_ids)
        assert res.token_ids == tokens, (case, req.id, res.token_ids, tokens)
        ours = engine.next_token_logits(req.adapter, prompt_ids + res.token_ids[:-1])
        assert_close_logits(ours, last_logits, (case, req.id))
    window = engine.spec.sliding_window
    assert window is None or longest > 2 * window  # the window really cuts keys off


@pytest.mark.parametrize("family", ["gemma2"], indirect=True)
def test_deterministic_mode_gives_the_same_tokens_at_any_batch_size(family):
    _, model_dir, adapters = family
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    got = {}
    for seqs in (1, 8):
        engine = tiny_engine(model_dir, adapters, max_num_seqs=seqs, deterministic=True)
        got[seqs] = {r.id: r.token_ids for r in engine.generate(requests(), params)}
    assert got[1] == got[8] and len(got[1]) == len(requests())
    plain = {r.id: r.token_ids for r in tiny_engine(model_dir, adapters).generate(requests(), params)}
    assert plain == got[1]  # and they are the right tokens (the float32 path equals PEFT above)


@pytest.mark.parametrize("family", ["phi3", "gemma2"], indirect=True)
def test_merged_logits_match_the_unmerged_lora_path(family):
    _, model_dir, adapters = family
    assert_merge_matches_the_lora_path(tiny_engine(model_dir, adapters, max_loras=2), "high")


@pytest.mark.parametrize("family", ["phi3"], indirect=True)
def test_dynamic_slots_give_the_tokens_of_fixed_slots(family):
    _, model_dir, adapters = family
    names = ["low"] * 4 + [None, "high", "low", "high", None, "low"] + ["high"] * 4
    reqs = [Request(f"r{i}", a, f"the quick brown fox {'jumps ' * (i % 3)}{i}") for i, a in enumerate(names)]
    params = SamplingParams(max_tokens=5, ignore_eos=True)

    def outputs(engine):
        return {r.id: r.token_ids for r in engine.generate(reqs, params)}

    fixed = outputs(tiny_engine(model_dir, adapters, max_loras=2))
    dyn = tiny_engine(model_dir, adapters, max_loras=2, min_loras=1, verify_slots=True)
    assert outputs(dyn) == fixed and len(fixed) == len(reqs)
    assert any(e["to"] > e["from"] for e in dyn.resizer.report()["timeline"])


@pytest.mark.parametrize("family", ["phi3"], indirect=True)
def test_fused_targets_have_the_fused_shapes_and_split_names_are_refused(family):
    from loracli.adapters import check_tensors, read_adapter_config

    _, model_dir, adapters = family
    spec = ModelSpec.from_hf_config(type("C", (), json.loads((model_dir / "config.json").read_text()))())
    assert spec.target_modules == FUSED
    assert spec.module_shape("qkv_proj") == (64, 4 * 16 + 2 * 2 * 16)
    assert spec.module_shape("gate_up_proj") == (64, 2 * 96)
    cfg = read_adapter_config(adapters / "low")
    shapes = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 64)}
    shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = (64, 4)
    cfg.target_modules = ["q_proj"]
    problems = check_tensors(cfg, shapes, spec, 16).problems
    assert any("'q_proj' is not a supported target (qkv_proj, o_proj, gate_up_proj, down_proj)" in p for p in problems)


def test_an_unknown_model_type_is_refused_in_one_line():
    with pytest.raises(ModelError) as e:
        ModelSpec.from_hf_config(type("C", (), {"model_type": "falcon"})())
    assert str(e.value).startswith("model type 'falcon' is not supported (supported: llama, mistral, qwen2, qwen3,")
    assert "\n" not in str(e.value)

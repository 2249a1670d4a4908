"""DoRA adapters and LoRA biases (lora_bias, bias "all" / "lora_only") against HF transformers + PEFT.

Adapters are built with PEFT on the tiny Llama (untied, no biases) and Qwen2 (q/k/v bias) models,
with random A, B, lora_B biases, trained base biases and DoRA magnitudes away from the weight norms
(so g != 1). A mixed batch (DoRA + plain LoRA + bias adapters + the base model, raw prompts and
chat) through the engine gives each request PEFT's greedy tokens and float32 logits (each adapter
alone in PEFT); a merged DoRA adapter gives PEFT's `merge_and_unload()` logits and unmerging
restores the base bit for bit; deterministic mode keeps a DoRA request's tokens whatever its batch;
bad vectors and PEFT's refused combinations are one-line `AdapterError`s; inspect-adapter reports
the vectors and their slot cost.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_engine_vs_peft import assert_close_logits, assert_matches_peft, make_engine

from loracli.adapters import load_adapter
from loracli.errors import AdapterError
from loracli.model.loader import load_config
from loracli.requests import Request

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_TOKENS = 8
ADAPTERS = {  # name -> LoraConfig fields
    "dora": dict(r=4, lora_alpha=8, target_modules=list(ALL), use_dora=True),
    "plain": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lorabias": dict(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj", "up_proj"], lora_bias=True),
    "biasall": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], bias="all"),
    "biaslora": dict(r=4, lora_alpha=8, target_modules=["k_proj", "gate_proj"], bias="lora_only"),
}
PROMPTS = [
    {"prompt": "the quick brown fox"},
    {"messages": [{"role": "user", "content": "what is the capital of france?"}]},
    {"prompt": "tell me a story about a robot"},
]


def peft_adapter(model_dir: Path, out: Path, seed: int, **fields) -> Path:
    """A PEFT adapter with random LoRA weights, lora_B biases, DoRA magnitudes at 0.7-1.3 times the
    weight norm, and (bias "all" / "lora_only") trained biases moved off the base ones."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.7, 1.3))
            elif "lora_" in name:
                p.normal_(0, 0.3)
            elif name.endswith(".bias") and p.requires_grad:  # a trained base bias (bias "all" / "lora_only")
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(str(out))
    return out


def adapters_for(model_dir: Path, root: Path) -> Path:
    from tiny import make_adapter

    for i, (name, fields) in enumerate(ADAPTERS.items()):
        if name == "plain":
            make_adapter(model_dir, root / name, r=8, targets=tuple(fields["target_modules"]), seed=40)
        else:
            peft_adapter(model_dir, root / name, seed=30 + i, **fields)
    return root


@pytest.fixture(scope="module")
def llama_extra(llama_dir, tmp_path_factory):
    return llama_dir, adapters_for(llama_dir, tmp_path_factory.mktemp("llama_extra"))


@pytest.fixture(scope="module")
def qwen_extra(qwen_dir, tmp_path_factory):
    return qwen_dir, adapters_for(qwen_dir, tmp_path_factory.mktemp("qwen_extra"))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request):
    return request.getfixturevalue("llama_extra" if request.param == "llama" else "qwen_extra")


def requests_for(names) -> list[Request]:
    params = {"max_tokens": MAX_TOKENS, "ignore_eos": True}
    return [Request(id=f"{a}-{i}", adapter=a, params=params, **p) for a in names for i, p in enumerate(PROMPTS)]


def test_mixed_batch_matches_peft_each_adapter_alone(setup):
    model_dir, adapters_dir = setup
    names = [*ADAPTERS, None]
    engine = make_engine(model_dir, adapters_dir, max_loras=4, max_num_seqs=16)
    reqs = requests_for(names)
    results = {r.id: r for r in engine.generate(reqs)}
    assert len(results) == len(reqs)
    for req in reqs:
        assert_matches_peft(engine, model_dir, adapters_dir, req, results[req.id], MAX_TOKENS)


def test_the_new_parts_matter(setup):
    """Each adapter's magnitudes / biases change the logits (a test that ignored them would fail above)."""
    model_dir, adapters_dir = setup
    engine = make_engine(model_dir, adapters_dir, max_loras=1)
    ids = engine.tokenizer("the quick brown fox").input_ids
    _, spec = load_config(model_dir)
    dora = load_adapter(adapters_dir / "dora", spec)
    assert dora.kinds == ("dora",) and not dora.is_plain_lora
    assert len(dora.magnitudes) == len(dora.modules) == 7 * spec.num_layers
    with_dora = engine.next_token_logits("dora", ids)
    slot = engine.slots.lookup("dora")
    g_minus_1 = [t[slot] for _, lin in engine.model.linears() for t in lin.gm1]
    assert max(float(t.abs().max()) for t in g_minus_1) > 0.1  # g is far from 1
    plain = load_adapter(adapters_dir / "dora", spec)
    plain.magnitudes = {}
    engine.model_runner.write_adapter(engine.slots.lookup("dora"), plain)
    assert (engine.next_token_logits("dora", ids) - with_dora).abs().max() > 1e-2
    lorabias = load_adapter(adapters_dir / "lorabias", spec)
    assert lorabias.kinds == ("lora_bias",) and len(lorabias.lora_biases) == 3 * spec.num_layers
    biasall = load_adapter(adapters_dir / "biasall", spec)
    assert bool(biasall.base_biases) == spec.qkv_bias  # Llama has no biases to save


def test_plain_batches_are_bit_unchanged_next_to_idle_dora_slots(llama_extra):
    """With DoRA and bias adapters resident but not in the batch, plain LoRA and base tokens keep their bits."""
    model_dir, adapters_dir = llama_extra
    reqs = requests_for(["plain", None])
    alone = {r.id: r.token_ids for r in make_engine(model_dir, adapters_dir).generate(reqs)}
    engine = make_engine(model_dir, adapters_dir, max_loras=4)
    ids = engine.tokenizer("hello world").input_ids
    before = engine.next_token_logits("plain", ids)
    for name in ("dora", "lorabias"):
        engine.next_token_logits(name, ids)  # place them in slots
    assert torch.equal(engine.next_token_logits("plain", ids), before)
    assert {r.id: r.token_ids for r in engine.generate(reqs)} == alone


def test_slot_resize_keeps_the_dora_and_bias_tables(qwen_extra):
    model_dir, adapters_dir = qwen_extra
    engine = make_engine(model_dir, adapters_dir, max_loras=2)
    ids = engine.tokenizer("the quick brown fox").input_ids
    for name in ("dora", "biasall"):
        engine.next_token_logits(name, ids)  # writes both slots
    lins = [lin for _, lin in engine.model.linears()]
    old = [
        [(lin.gm1[j].clone(), lin.bias_delta[j].clone(), lin.dora[j], lin.biased[j]) for j in range(len(lin.splits))]
        for lin in lins
    ]
    assert any(any(d) for tables in old for _, _, d, _ in tables) and any(any(b) for tables in old for *_, b in tables)
    n = lins[0].n_slots
    engine.model.resize_slots(n + 1, list(reversed(range(n))))  # the slots swap places, one more slot
    for lin, tables in zip(lins, old, strict=True):
        for j, (gm1, delta, dora, biased) in enumerate(tables):
            assert torch.equal(lin.gm1[j][:n], gm1.flip(0)) and torch.equal(lin.bias_delta[j][:n], delta.flip(0))
            assert lin.dora[j] == [*reversed(dora), False] and lin.biased[j] == [*reversed(biased), False]
            assert not lin.gm1[j][n].any() and not lin.bias_delta[j][n].any()


def peft_merged_logits(model_dir: Path, adapter_dir: Path, ids: list[int]) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()
    with torch.no_grad():
        return merged(torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("name", ["dora", "lorabias", "biasall"])
def test_merged_matches_peft_merge_and_unload_and_unmerge_restores_bits(qwen_extra, name):
    model_dir, adapters_dir = qwen_extra
    engine = make_engine(model_dir, adapters_dir, max_loras=2)
    ids = engine.tokenizer("merge me into the base weights please").input_ids
    unmerged = engine.next_token_logits(name, ids)
    lins = [lin for _, lin in engine.model.linears()]
    weights = [lin.weight.clone() for lin in lins]
    biases = [lin.bias for lin in lins]
    engine.model_runner.merge(name, engine.slots.lookup(name))
    assert any(lin.bias is not b for lin, b in zip(lins, biases, strict=True)) == (name != "dora")
    merged = engine.next_token_logits(name, ids)
    if name != "lorabias":  # PEFT cannot merge a lora_B bias into o_proj / up_proj, which have no bias
        assert_close_logits(merged, peft_merged_logits(model_dir, adapters_dir / name, ids), name, tol=2e-4)
    assert_close_logits(merged, unmerged, name, tol=2e-4)
    engine.model_runner.unmerge()
    assert all(torch.equal(lin.weight, w) for lin, w in zip(lins, weights, strict=True))
    assert all(lin.bias is b for lin, b in zip(lins, biases, strict=True))
    assert torch.equal(engine.next_token_logits(name, ids), unmerged)


def test_merge_policy_always_single_gives_the_unmerged_tokens(llama_extra):
    model_dir, adapters_dir = llama_extra
    reqs = requests_for(["dora"])
    never = {r.id: r.token_ids for r in make_engine(model_dir, adapters_dir).generate(reqs)}
    engine = make_engine(model_dir, adapters_dir, merge_policy="always-single")
    assert {r.id: r.token_ids for r in engine.generate(reqs)} == never
    assert engine.merger.report()["merges"] >= 1


def test_deterministic_dora_tokens_do_not_depend_on_the_batch(qwen_extra):
    model_dir, adapters_dir = qwen_extra
    reqs = requests_for(["dora", "plain", "biasall", None])
    together = {r.id: r.token_ids for r in make_engine(model_dir, adapters_dir, deterministic=True).generate(reqs)}
    alone_engine = make_engine(model_dir, adapters_dir, deterministic=True, max_num_seqs=1)
    alone = {r.id: r.token_ids for r in alone_engine.generate(reqs)}
    assert together == alone


# --- bad input --------------------------------------------------------------------------------------


def copy_with(src: Path, dst: Path, config=None, tensors=None) -> Path:
    dst.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    weights = load_file(src / "adapter_model.safetensors")
    save_file(tensors(weights) if tensors else weights, dst / "adapter_model.safetensors")
    return dst


def load_error(folder: Path, model_dir: Path) -> str:
    _, spec = load_config(model_dir)
    with pytest.raises(AdapterError) as e:
        load_adapter(folder, spec)
    message = str(e.value)
    assert "\n" not in message and str(folder) in message
    return message


def test_bad_magnitude_shape_is_one_line(llama_extra, tmp_path):
    model_dir, adapters_dir = llama_extra
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_magnitude_vector"
    bad = copy_with(adapters_dir / "dora", tmp_path / "a", tensors=lambda t: {**t, key: t[key][:-3].clone()})
    assert "layer 1 k_proj: lora_magnitude_vector shape [29] does not match the module (expected [32])" in load_error(
        bad, model_dir
    )
    missing = copy_with(
        adapters_dir / "dora", tmp_path / "b", tensors=lambda t: {k: v for k, v in t.items() if k != key}
    )
    assert "layer 1 k_proj: lora_magnitude_vector missing (use_dora is true: DoRA needs one per pair)" in load_error(
        missing, model_dir
    )
    off = copy_with(adapters_dir / "dora", tmp_path / "c", config={"use_dora": False})
    assert "but use_dora is false" in load_error(off, model_dir)


def test_peft_refusals_and_biases_loracli_cannot_apply(llama_extra, qwen_extra, tmp_path):
    model_dir, adapters_dir = llama_extra
    both = copy_with(adapters_dir / "dora", tmp_path / "a", config={"lora_bias": True})
    assert "lora_bias=true with use_dora=true" in load_error(both, model_dir)
    key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"
    no_bias = copy_with(adapters_dir / "biasall", tmp_path / "b", tensors=lambda t: {**t, key: torch.ones(64)})
    assert "has no bias to replace (bias='all')" in load_error(no_bias, model_dir)
    norm = copy_with(
        adapters_dir / "biasall",
        tmp_path / "c",
        tensors=lambda t: {**t, "base_model.model.model.norm.bias": torch.ones(64)},
    )
    assert "a saved bias (bias field)" in load_error(norm, model_dir)
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.bias"
    drop = {"tensors": lambda t: {k: v for k, v in t.items() if k != key}}
    random_init = copy_with(adapters_dir / "lorabias", tmp_path / "f", **drop)  # init_lora_weights false
    assert "layer 1 up_proj: lora_B.bias missing (lora_bias is true), and PEFT would leave it" in load_error(
        random_init, model_dir
    )
    zero_init = copy_with(adapters_dir / "lorabias", tmp_path / "g", config={"init_lora_weights": True}, **drop)
    _, spec = load_config(model_dir)
    assert (1, "up_proj") not in load_adapter(zero_init, spec).lora_biases  # PEFT starts it at zero: served so
    qwen_dir, qwen_adapters = qwen_extra
    none = copy_with(qwen_adapters / "biasall", tmp_path / "d", config={"bias": "none"})
    assert "bias is 'none'" in load_error(none, qwen_dir)
    odd = copy_with(qwen_adapters / "biasall", tmp_path / "e", config={"bias": "some"})
    assert "bias='some' is not one of PEFT's values" in load_error(odd, qwen_dir)


# --- inspect-adapter ----------------------------------------------------------------------------------


def test_inspect_reports_the_vectors_and_their_slot_cost(qwen_extra):
    from loracli.inspect import inspect_path

    model_dir, adapters_dir = qwen_extra
    _, spec = load_config(model_dir)
    report = inspect_path(adapters_dir, model=str(model_dir), max_lora_rank=16, dtype="float32")
    by = {a.name: a for a in report.adapters}
    assert all(a.status == "ok" for a in by.values()), {a.name: a.problems for a in by.values()}
    assert by["dora"].weights.extras == {"lora_magnitude_vector": 7 * spec.num_layers}
    assert by["lorabias"].weights.extras == {"lora_B.bias": 3 * spec.num_layers}
    assert by["biasall"].weights.extras == {"bias": 3 * spec.num_layers}  # q (adapted), k, v
    assert by["plain"].weights.extras == {}
    own = load_adapter(adapters_dir / "dora", spec)
    assert by["dora"].cost.own_weights_bytes == own.nbytes
    out = [spec.module_shape(m)[1] for m in ALL]
    assert report.engine.slot_table_bytes == spec.num_layers * 2 * sum(out) * 4
    engine = make_engine(model_dir, adapters_dir, max_loras=3)
    tables = sum(t.nbytes for _, lin in engine.model.linears() for t in lin.gm1 + lin.bias_delta)
    assert tables == 3 * report.engine.slot_table_bytes

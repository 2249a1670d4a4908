"""Embedding / lm_head LoRA and `modules_to_save` (embed_tokens, lm_head) against HF + PEFT, in mixed batches.

Tiny random Llama models, one with untied and one with tied embeddings, each with adapters that put
a LoRA on embed_tokens and lm_head, save a full lm_head, embed_tokens or both, a LoRA on
embed_tokens alone (its saved base matrix equals the model's, so the engine keeps no copy), and a
plain LoRA adapter. One engine (fewer slots than adapters, so slots are reused) runs them all with
base-model requests in one mixed batch: greedy tokens equal PEFT's for each adapter alone and the
last-step float32 logits are within 1e-4 relative. Also: merged mode keeps the vocabulary parts,
deterministic mode keeps a row's bits whatever else is in its group, a slot taken by another adapter
frees the parts, the memory budget reserves their bytes, a resized vocabulary is refused in one
line, and `inspect-adapter` reports the parts and their sizes.
"""

from __future__ import annotations

import pytest
import torch
from loracli.kernels import invariant
from runs import tiny_engine
from test_engine_vs_peft import assert_matches_peft
from tiny import make_adapter, make_model

from loracli.adapters import load_adapter
from loracli.errors import AdapterError
from loracli.model.loader import load_config
from loracli.model.vocab_adapters import SlotVocab, VocabAdapters
from loracli.requests import Request

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTERS = {  # name -> make_adapter keywords
    "vocab_lora": dict(r=4, targets=("q_proj", "v_proj", "embed_tokens", "lm_head"), seed=21),
    "save_head": dict(r=4, targets=("q_proj",), modules_to_save=["lm_head"], seed=22),
    "save_embed": dict(r=8, targets=("v_proj", "down_proj"), modules_to_save=["embed_tokens"], seed=23),
    "save_both": dict(r=4, targets=("o_proj",), modules_to_save=["embed_tokens", "lm_head"], seed=24),
    "embed_lora": dict(r=8, alpha=8, targets=("embed_tokens",), seed=25),
    "plain": dict(r=8, targets=("q_proj", "k_proj", "v_proj", "gate_proj"), seed=26),
}
NAMES = [*ADAPTERS, None]
PROMPTS = ["the quick brown fox", "tell me a story about a robot"]
MAX_TOKENS = 6


@pytest.fixture(scope="module", params=["untied", "tied"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"vocab_{request.param}")
    model_dir = make_model(root / "model", "llama", seed=3, tie=request.param == "tied")
    for name, kw in ADAPTERS.items():
        make_adapter(model_dir, root / "adapters" / name, **kw)
    return model_dir, root / "adapters"


def requests(names=NAMES, prompts=PROMPTS) -> list[Request]:
    params = {"max_tokens": MAX_TOKENS, "ignore_eos": True}
    return [Request(f"{a}-{i}", a, p, params=dict(params)) for a in names for i, p in enumerate(prompts)]


@pytest.mark.parametrize("deterministic", [False, True])
def test_mixed_batch_matches_peft_each_adapter_alone(setup, deterministic):
    model_dir, adapters_dir = setup
    engine = tiny_engine(model_dir, adapters_dir, max_loras=4, max_num_seqs=16, deterministic=deterministic)
    results = {r.id: r for r in engine.generate(requests())}
    assert engine.slots.stats.evictions > 0  # six adapters through four slots
    base_tokens = {}
    for req in requests():
        ids = assert_matches_peft(engine, model_dir, adapters_dir, req, results[req.id], MAX_TOKENS)
        if req.adapter is None:
            base_tokens[req.prompt] = engine.next_token_logits(None, ids)
    for name in ("vocab_lora", "save_head", "save_embed", "save_both", "embed_lora"):  # each part matters
        ids = engine.tokenize(requests([name])[0])
        assert (engine.next_token_logits(name, ids) - base_tokens[PROMPTS[0]]).abs().max() > 1e-2, name


def test_deterministic_mixed_batch_equals_each_request_alone(setup):
    model_dir, adapters_dir = setup
    together = tiny_engine(model_dir, adapters_dir, max_loras=4, max_num_seqs=16, deterministic=True)
    alone = tiny_engine(model_dir, adapters_dir, max_loras=1, max_num_seqs=1, deterministic=True)
    mixed = {r.id: r.token_ids for r in together.generate(requests())}
    assert mixed == {r.id: r.token_ids for r in alone.generate(requests())}


def test_head_parts_never_reach_the_embedding_on_a_tied_model(setup):
    model_dir, adapters_dir = setup
    engine = tiny_engine(model_dir, adapters_dir, max_loras=2)
    embed_before = engine.model.embed.clone()
    ids = engine.tokenize(requests(["save_head"])[0])
    engine.next_token_logits("save_head", ids)
    parts = engine.model.vocab.parts[engine.slots.lookup("save_head")]
    assert parts.head is not None and parts.embed is None and parts.embed_lora is None
    assert torch.equal(engine.model.embed, embed_before)
    assert (engine.model.lm_head is engine.model.embed) == engine.spec.tie_embeddings


def test_saved_base_matrices_equal_to_the_model_are_not_kept(setup):
    model_dir, adapters_dir = setup
    spec = load_config(model_dir)[1]
    vocab = load_adapter(adapters_dir / "embed_lora", spec).vocab
    assert vocab.embed is not None  # PEFT saved the base embedding beside the LoRA (save_embedding_layers)
    engine = tiny_engine(model_dir, adapters_dir, max_loras=1)
    engine.next_token_logits("embed_lora", [1, 2, 3])
    parts = engine.model.vocab.parts[0]
    assert parts.embed_lora is not None and parts.embed is None and parts.head is None


def test_a_slot_taken_by_another_adapter_frees_the_parts(setup):
    model_dir, adapters_dir = setup
    engine = tiny_engine(model_dir, adapters_dir, max_loras=1)
    engine.next_token_logits("save_both", [1, 2, 3])
    held = engine.model.vocab.nbytes()
    assert held == 2 * engine.spec.vocab_size * engine.spec.hidden * 4
    engine.next_token_logits("plain", [1, 2, 3])
    assert engine.model.vocab.parts == [None] and engine.model.vocab.nbytes() == 0
    engine.next_token_logits("vocab_lora", [1, 2, 3])
    parts = engine.model.vocab.parts[0]
    assert parts.embed_lora is not None and parts.head_lora is not None


def test_merged_adapter_keeps_its_vocabulary_parts(setup):
    model_dir, adapters_dir = setup
    engine = tiny_engine(model_dir, adapters_dir, max_loras=2)
    ids = engine.tokenize(requests(["vocab_lora"])[0])
    unmerged = engine.next_token_logits("vocab_lora", ids)
    engine.model_runner.merge("vocab_lora", engine.slots.lookup("vocab_lora"))
    merged = engine.next_token_logits("vocab_lora", ids)
    engine.model_runner.unmerge()
    torch.testing.assert_close(merged, unmerged, atol=2e-4, rtol=1e-4)


def test_greedy_tokens_equal_under_merge_policies(setup):
    model_dir, adapters_dir = setup
    names = ["plain", None, "vocab_lora"] + ["save_both"] * 10  # the others finish first: save_both runs alone
    reqs = [Request(f"r{i}", a, f"the quick brown fox {i}", params={"max_tokens": 4}) for i, a in enumerate(names)]
    got = {}
    for policy in ("never", "always-single"):
        # Synchronous adapter loads: admission order (hence what gets merged) must not depend on load timing.
        engine = tiny_engine(
            model_dir, adapters_dir, max_loras=2, max_num_seqs=4, merge_policy=policy, adapter_load_workers=0
        )
        got[policy] = {r.id: r.token_ids for r in engine.generate(reqs)}
        if policy != "never":
            merged = [t["adapter"] for t in engine.merger.report()["timeline"] if t["action"] == "merge"]
            assert "save_both" in merged, merged
    assert got["always-single"] == got["never"]


def test_rows_are_batch_invariant_in_deterministic_mode():
    torch.manual_seed(0)
    v, h, r = 50, 32, 4
    base = torch.randn(v, h)
    vocab = VocabAdapters(3)
    vocab.set(0, SlotVocab(embed_lora=(torch.randn(v, r), torch.randn(h, r)), head=torch.randn(v, h)))
    vocab.set(2, SlotVocab(head_lora=(torch.randn(r, h), torch.randn(v, r)), embed=torch.randn(v, h)))
    ids = torch.randint(0, v, (23,))
    slots = [0, 2, -1] * 7 + [0, 0]
    hidden = torch.randn(23, h)
    full_x = vocab.embed(ids, slots, base, invariant.linear)
    full_logits = vocab.logits(hidden, slots, base, invariant.linear)
    for i in (0, 1, 2, 22):
        one_x = vocab.embed(ids[i : i + 1], slots[i : i + 1], base, invariant.linear)
        one_logits = vocab.logits(hidden[i : i + 1], slots[i : i + 1], base, invariant.linear)
        assert torch.equal(one_x[0], full_x[i]) and torch.equal(one_logits[0], full_logits[i])
    plain = base[ids[2]]
    assert torch.equal(full_x[2], plain)  # a base-model row gets the base embedding
    assert not torch.equal(full_x[0], base[ids[0]]) and not torch.equal(full_x[1], base[ids[1]])


def test_memory_budget_reserves_the_parts(setup):
    model_dir, adapters_dir = setup
    engine = tiny_engine(model_dir, adapters_dir, max_loras=2, memory_budget=64 << 20)
    budget = engine.resizer.budget
    spec, elem = engine.spec, 4
    matrix = spec.vocab_size * spec.hidden * elem
    # save_both and vocab_lora (two saved / base matrices each, one when tied, plus its LoRA) are the largest two
    vocab_lora = (1 if spec.tie_embeddings else 2) * matrix + 4 * (spec.vocab_size + spec.hidden) * 2 * elem
    assert sorted(budget.vocab_costs[:2]) == sorted([vocab_lora, 2 * matrix])
    assert budget.vocab_reserve(2) == vocab_lora + 2 * matrix
    assert budget.split(2, 1)["vocab"] == budget.vocab_reserve(2)
    plain_only = tiny_engine(model_dir, None, max_loras=2, memory_budget=64 << 20)
    lost = plain_only.blocks.num_blocks - engine.blocks.num_blocks
    assert lost in (budget.vocab_reserve(2) // budget.block_bytes, budget.vocab_reserve(2) // budget.block_bytes + 1)
    assert lost > 0


def test_resized_vocabulary_is_refused_in_one_line(setup, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir, _ = setup
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base.resize_token_embeddings(base.config.vocab_size + 8)
    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    get_peft_model(base, cfg).save_pretrained(str(tmp_path / "bigger" / "resized"))
    spec = load_config(model_dir)[1]
    with pytest.raises(AdapterError) as e:
        load_adapter(tmp_path / "bigger" / "resized", spec)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "bigger" / "resized") in message
    assert f"a vocabulary of {spec.vocab_size + 8} tokens, the base model has {spec.vocab_size}" in message
    assert "serve it with a base model whose vocabulary has" in message
    engine = tiny_engine(model_dir, tmp_path / "bigger", max_loras=1)
    (result,) = engine.generate([Request("x", "resized", "hello", params={"max_tokens": 2})])
    assert result.error is not None and "vocabulary of" in result.error.message


def test_inspect_adapter_reports_the_parts_and_their_sizes(setup):
    from loracli.inspect.analysis import inspect_path

    model_dir, adapters_dir = setup
    spec = load_config(model_dir)[1]
    v, h, elem = spec.vocab_size, spec.hidden, 4
    report = inspect_path(adapters_dir, model=str(model_dir), dtype="float32", max_lora_rank=16)
    assert report.ok, [(a.name, a.problems) for a in report.adapters]
    by_name = {a.name: a for a in report.adapters}
    parts = {(p.module, p.kind): (p.shape, p.bytes) for p in by_name["vocab_lora"].weights.vocab}
    assert parts == {
        ("embed_tokens", "LoRA A"): ([4, v], 4 * v * elem),
        ("embed_tokens", "LoRA B"): ([h, 4], h * 4 * elem),
        ("embed_tokens", "saved base matrix"): ([v, h], v * h * elem),
        ("lm_head", "LoRA A"): ([4, h], 4 * h * elem),
        ("lm_head", "LoRA B"): ([v, 4], v * 4 * elem),
        ("lm_head", "saved base matrix"): ([v, h], v * h * elem),
    }
    saved = {(p.module, p.kind) for p in by_name["save_both"].weights.vocab}
    assert saved == {("embed_tokens", "modules_to_save matrix"), ("lm_head", "modules_to_save matrix")}
    assert by_name["save_both"].cost.vocab_bytes == 2 * v * h * elem
    assert by_name["plain"].weights.vocab == [] and by_name["plain"].cost.vocab_bytes == 0
    cost = by_name["vocab_lora"].cost
    shared = v * h * elem if spec.tie_embeddings else 0  # one tensor holds a tied model's two saved base matrices
    assert cost.vocab_bytes == sum(b for _, b in parts.values()) - shared
    loaded = load_adapter(adapters_dir / "vocab_lora", spec)
    assert cost.own_weights_bytes == loaded.nbytes  # a tied model's two saved base matrices are one tensor
    doc = report.to_dict()["adapters"]
    assert next(a for a in doc if a["name"] == "save_head")["weights"]["vocab"][0]["kind"] == "modules_to_save matrix"


def test_slot_resize_moves_the_parts_with_their_adapters():
    vocab = VocabAdapters(3)
    parts = [SlotVocab(head=torch.ones(2, 2) * i) for i in range(3)]
    for slot, p in enumerate(parts):
        vocab.set(slot, p)
    vocab.resize(2, [2, 0])
    assert vocab.parts == [parts[2], parts[0]]
    vocab.resize(4, [1])
    assert vocab.parts == [parts[0], None, None, None] and vocab.nbytes() == 2 * 2 * 4
    vocab.set(0, SlotVocab())
    assert vocab.parts[0] is None and not vocab.any()

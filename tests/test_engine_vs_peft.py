"""The engine against the reference: HF transformers + PEFT, prompt by prompt, float32.

For each adapter (ranks 4, 8, 16, rsLoRA, rank/alpha patterns, different targets) and the base
model, on Llama (untied, GQA) and Qwen2 (q/k/v bias, tied): greedy tokens equal PEFT's
(`PeftModel`, one prompt, no padding) and the last-step logits are within 1e-4 relative. A mixed
batch gives exactly what each request gives alone.
"""

from __future__ import annotations

import pytest
import torch

from loracli.config import EngineConfig
from loracli.engine.engine import Engine
from loracli.requests import Request

ADAPTERS = ["attn4", "mlp8", "all16rs", "pattern", None]
PROMPTS = [
    "the quick brown fox",
    "what is the capital of france?",
    "tell me a story about a robot who learns to paint and",
    "hello",
]
MAX_TOKENS = 12


def reference(model_dir, adapters_dir, adapter, prompt_ids, max_tokens):
    """Greedy tokens and per-step logits from transformers (+ PEFT when adapter is set)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapters_dir / adapter))
    return greedy(model.eval(), prompt_ids, max_tokens)


def greedy(model, prompt_ids, max_tokens):
    """A transformers (+ PEFT) model's greedy tokens and per-step float32 logits for one prompt, no padding."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=0,
        )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    return tokens, [lg[0].float() for lg in out.logits]


def assert_close_logits(ours: torch.Tensor, ref: torch.Tensor, what, tol: float = 1e-4) -> None:
    """Relative error (max |ours - ref| / max |ref|) below `tol`."""
    rel = float((ours - ref).abs().max() / ref.abs().max())
    assert rel < tol, (what, rel)


def assert_matches_peft(engine, model_dir, adapters_dir, req, res, max_tokens) -> list[int]:
    """The engine's answer `res` to `req` (from any batch) equals transformers + PEFT with `req.adapter`
    alone: greedy tokens equal, the last step's logits within 1e-4 relative. Returns the prompt ids."""
    assert res.error is None, res.error
    ids = engine.tokenize(req)
    ref_tokens, ref_logits = reference(model_dir, adapters_dir, req.adapter, ids, max_tokens)
    assert res.token_ids == ref_tokens, (req.id, res.token_ids, ref_tokens)
    assert_close_logits(engine.next_token_logits(req.adapter, ids + res.token_ids[:-1]), ref_logits[-1], req.id)
    return ids


def make_engine(model_dir, adapters_dir, **kw):
    cfg = dict(
        model=str(model_dir),
        adapters_dir=str(adapters_dir),
        dtype="float32",
        device="cpu",
        max_loras=4,
        max_lora_rank=16,
        max_num_seqs=16,
    )
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def requests_for(adapters, prompts, **params):
    reqs = []
    for i, (a, p) in enumerate((a, p) for a in adapters for p in prompts):
        reqs.append(
            Request(id=f"{a}-{i}", adapter=a, prompt=p, params={"max_tokens": MAX_TOKENS, "ignore_eos": True, **params})
        )
    return reqs


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, llama_dir, llama_adapters, qwen_dir, qwen_adapters):
    if request.param == "llama":
        return llama_dir, llama_adapters
    return qwen_dir, qwen_adapters


def test_greedy_tokens_and_logits_match_peft(setup):
    model_dir, adapters_dir = setup
    engine = make_engine(model_dir, adapters_dir)
    results = {r.id: r for r in engine.generate(requests_for(ADAPTERS, PROMPTS))}
    assert len(results) == len(ADAPTERS) * len(PROMPTS)
    for req in requests_for(ADAPTERS, PROMPTS):
        assert_matches_peft(engine, model_dir, adapters_dir, req, results[req.id], MAX_TOKENS)


def test_mixed_batch_equals_each_alone(setup):
    model_dir, adapters_dir = setup
    reqs = requests_for(ADAPTERS, PROMPTS)
    together = {r.id: r.token_ids for r in make_engine(model_dir, adapters_dir).generate(reqs)}
    alone_engine = make_engine(model_dir, adapters_dir, max_num_seqs=1)
    alone = {r.id: r.token_ids for r in alone_engine.generate(reqs)}
    assert together == alone
    assert len(together) == len(reqs)


def test_adapters_actually_change_outputs(llama_dir, llama_adapters):
    engine = make_engine(llama_dir, llama_adapters)
    reqs = requests_for(ADAPTERS, PROMPTS[:1])
    outs = {r.adapter: tuple(r.token_ids) for r in engine.generate(reqs)}
    assert len(set(outs.values())) == len(ADAPTERS), outs


def test_one_slot_swaps_give_same_outputs(llama_dir, llama_adapters):
    reqs = requests_for(ADAPTERS, PROMPTS)
    wide = {r.id: r.token_ids for r in make_engine(llama_dir, llama_adapters).generate(reqs)}
    narrow_engine = make_engine(llama_dir, llama_adapters, max_loras=1)
    narrow = {r.id: r.token_ids for r in narrow_engine.generate(reqs)}
    assert wide == narrow
    assert narrow_engine.slots.stats.evictions >= 3


def test_preemption_recompute_gives_same_outputs(llama_dir, llama_adapters):
    reqs = requests_for(ADAPTERS, PROMPTS)
    roomy = {r.id: r.token_ids for r in make_engine(llama_dir, llama_adapters).generate(reqs)}
    tight = make_engine(llama_dir, llama_adapters, num_kv_blocks=16, block_size=4)
    squeezed_results = list(tight.generate(reqs))
    assert all(r.error is None for r in squeezed_results)
    squeezed = {r.id: r.token_ids for r in squeezed_results}
    assert squeezed == roomy
    assert tight.scheduler.preemptions > 0

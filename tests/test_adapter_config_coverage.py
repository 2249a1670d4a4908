"""adapter_config.json coverage: every PEFT LoraConfig field is read, inert or refused by name.

`loracli.peft_fields` classifies the fields; this file checks that table against the installed
PEFT (a field a newer PEFT adds fails here until it is classified), and serves adapters made by
PEFT with each targeting form (`target_modules` as a list, a regex string; `layers_to_transform`
with `layers_pattern`; `exclude_modules`; rank/alpha patterns with rsLoRA; dropout) against
PEFT itself: greedy tokens equal and float32 logits close, all in one mixed batch.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_engine_vs_peft import MAX_TOKENS, assert_matches_peft, make_engine, reference, requests_for
from tiny import make_adapter

from loracli import peft_fields
from loracli.adapters import check_tensors, read_adapter_config
from loracli.errors import AdapterError

PROMPTS = ["the quick brown fox", "tell me a story about a robot who learns to paint and"]


FORMS = {
    "regex": dict(r=4, alpha=8, targets=r".*\.(q_proj|down_proj)"),
    "layers": dict(r=8, alpha=16, targets=["q_proj", "v_proj", "up_proj"], layers_to_transform=[1],
                   layers_pattern="layers"),
    "exclude": dict(r=4, alpha=4, targets=["q_proj", "k_proj", "o_proj"],
                    exclude_modules=["model.layers.0.self_attn.k_proj"]),
    "patterns": dict(r=8, alpha=8, targets=["q_proj", "gate_proj", "down_proj"], rslora=True,
                     rank_pattern={"gate_proj": 4}, alpha_pattern={"down_proj": 32}, lora_dropout=0.3),
}  # fmt: skip


@pytest.fixture(scope="module")
def form_adapters(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("forms")
    for seed, (name, config) in enumerate(FORMS.items()):
        make_adapter(llama_dir, root / name, seed=seed + 10, **config)
    return root


def test_every_peft_lora_field_is_classified_and_refusals_use_peft_defaults():
    from peft import LoraConfig

    fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    groups = [set(peft_fields.READ), set(peft_fields.INERT), set(peft_fields.REFUSED)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    unclassified = set(fields) - set().union(*groups)
    assert unclassified == set(), f"classify these PEFT fields in loracli/peft_fields.py: {sorted(unclassified)}"
    for name, (default, _) in peft_fields.REFUSED.items():
        assert fields[name].default == default, name


def test_each_targeting_form_serves_what_peft_serves_in_one_mixed_batch(llama_dir, form_adapters):
    adapters = [*FORMS, None]
    engine = make_engine(llama_dir, form_adapters, max_loras=5)
    requests = requests_for(adapters, PROMPTS)
    results = {r.id: r for r in engine.generate(requests)}
    for req in requests:
        assert_matches_peft(engine, llama_dir, form_adapters, req, results[req.id], MAX_TOKENS)


def test_the_forms_are_read_as_peft_reads_them(form_adapters):
    regex = read_adapter_config(form_adapters / "regex")
    assert regex.target_regex == r".*\.(q_proj|down_proj)"
    assert regex.targets(0, "q_proj") and regex.targets(1, "down_proj") and not regex.targets(0, "v_proj")
    layers = read_adapter_config(form_adapters / "layers")
    assert layers.targets(1, "q_proj") and not layers.targets(0, "q_proj") and not layers.targets(1, "o_proj")
    exclude = read_adapter_config(form_adapters / "exclude")
    assert exclude.targets(1, "k_proj") and not exclude.targets(0, "k_proj")


def test_weights_the_config_does_not_target_are_ignored_with_a_warning_as_peft_ignores_them(
    llama_dir, form_adapters, tmp_path
):
    """A hand-edited file: layer-0 weights added to an adapter whose config targets layer 1 only.
    PEFT builds no LoRA there and drops them; loracli warns and serves the same tokens."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "extra"
    folder.mkdir()
    src = form_adapters / "layers"
    (folder / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    extra = {k.replace("layers.1.", "layers.0."): torch.full_like(v, 0.5) for k, v in tensors.items()}
    save_file({**tensors, **extra}, str(folder / "adapter_model.safetensors"))
    cfg = read_adapter_config(folder)
    findings = check_tensors(cfg, {k: tuple(v.shape) for k, v in {**tensors, **extra}.items()}, None, None)
    assert findings.problems == []
    assert any("layer 0 q_proj" in w and "ignored, as PEFT ignores them" in w for w in findings.warnings)
    engine = make_engine(llama_dir, tmp_path, max_loras=1)
    [req] = requests_for(["extra"], PROMPTS[:1])
    [res] = engine.generate([req])
    assert res.token_ids == reference(llama_dir, form_adapters, "layers", engine.tokenize(req), MAX_TOKENS)[0]


@pytest.mark.parametrize(
    "field, value",
    [("use_qalora", True), ("layer_replication", [[0, 1]]), ("trainable_token_indices", [1, 2]),
     ("alora_invocation_tokens", [5]), ("target_parameters", ["experts.gate_up_proj"])],
)  # fmt: skip
def test_a_variant_loracli_does_not_serve_is_refused_naming_the_field(llama_dir, form_adapters, tmp_path, field, value):
    folder = tmp_path / "variant"
    folder.mkdir()
    raw = json.loads((form_adapters / "regex" / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**raw, field: value}))
    weights = "adapter_model.safetensors"
    (folder / weights).write_bytes((form_adapters / "regex" / weights).read_bytes())
    assert read_adapter_config(folder).unsupported() == [f"{field}={value!r}: {peft_fields.REFUSED[field][1]}"]
    engine = make_engine(llama_dir, tmp_path, max_loras=1)
    [res] = engine.generate(requests_for(["variant"], PROMPTS[:1]))
    assert res.error is not None and field in res.error.message and "\n" not in res.error.message
    with pytest.raises(AdapterError, match=field):
        engine.store.get("variant")


def test_a_field_loracli_does_not_know_is_a_warning_not_a_refusal(form_adapters, tmp_path):
    folder = tmp_path / "newer"
    folder.mkdir()
    raw = json.loads((form_adapters / "regex" / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**raw, "shiny_new_option": 3, "empty_new_option": None}))
    cfg = read_adapter_config(folder)
    assert cfg.unsupported() == [] and cfg.unknown_fields == ["shiny_new_option"]
    findings = check_tensors(cfg, {}, None, None)
    assert any(w.startswith("shiny_new_option: a field loracli does not know") for w in findings.warnings)

"""Adapter loading: scale folding (rsLoRA, patterns) and every mistake caught at load, one line."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from loracli.adapters import load_adapter, parse_lora_key
from loracli.errors import AdapterError
from loracli.model.loader import load_config


@pytest.fixture(scope="module")
def spec(llama_dir):
    return load_config(llama_dir)[1]


def copy_adapter(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def edit_tensors(folder, fn):
    path = folder / "adapter_model.safetensors"
    tensors = fn(load_file(str(path)))
    save_file(tensors, str(path))


def test_parse_lora_key():
    assert parse_lora_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight") == (3, "q_proj", "A")
    key = "base_model.model.model.layers.10.mlp.down_proj.lora_B.default.weight"
    assert parse_lora_key(key) == (10, "down_proj", "B")
    assert parse_lora_key("base_model.model.lm_head.lora_A.weight") is None


@pytest.mark.parametrize("name", ["attn4", "mlp8", "all16rs", "pattern"])
def test_scale_folded_like_peft(name, llama_dir, llama_adapters, spec):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    w = load_adapter(llama_adapters / name, spec, max_lora_rank=16)
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir), torch_dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(llama_adapters / name))
    checked = 0
    for mod_name, mod in peft.named_modules():
        if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
            continue
        layer, module = int(mod_name.split(".layers.")[1].split(".")[0]), mod_name.rsplit(".", 1)[1]
        a, b = w.modules[(layer, module)]
        delta_ref = mod.lora_B["default"].weight @ mod.lora_A["default"].weight * mod.scaling["default"]
        torch.testing.assert_close(b @ a, delta_ref, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked == len(w.modules) > 0


def test_pattern_ranks_and_alphas(llama_adapters, spec):
    w = load_adapter(llama_adapters / "pattern", spec)
    assert w.modules[(0, "down_proj")][0].shape[0] == 4
    assert w.modules[(0, "q_proj")][0].shape[0] == 8


def expect_error(folder, spec, match, **kw):
    with pytest.raises(AdapterError, match=match) as e:
        load_adapter(folder, spec, **kw)
    assert "\n" not in str(e.value)
    return e.value


def test_missing_folder_and_files(tmp_path, llama_adapters, spec):
    expect_error(tmp_path / "nope", spec, "adapter folder not found")
    a = copy_adapter(llama_adapters / "attn4", tmp_path / "a")
    (a / "adapter_model.safetensors").unlink()
    expect_error(a, spec, "no adapter weights")
    (a / "adapter_config.json").unlink()
    expect_error(a, spec, "adapter_config.json.*missing")


def test_malformed_config(tmp_path, llama_adapters, spec):
    a = copy_adapter(llama_adapters / "attn4", tmp_path / "a")
    (a / "adapter_config.json").write_text("{not json")
    expect_error(a, spec, "not valid JSON")


def test_pickle_refused_unless_allowed(tmp_path, llama_adapters, spec):
    a = copy_adapter(llama_adapters / "attn4", tmp_path / "a")
    tensors = load_file(str(a / "adapter_model.safetensors"))
    (a / "adapter_model.safetensors").unlink()
    torch.save(tensors, a / "adapter_model.bin")
    assert expect_error(a, spec, "pickle weights are refused.*set allow_pickle").fields == ("allow_pickle",)
    w = load_adapter(a, spec, allow_pickle=True)
    ref = load_adapter(llama_adapters / "attn4", spec)
    for key, (a_t, b_t) in ref.modules.items():
        assert torch.equal(w.modules[key][0], a_t) and torch.equal(w.modules[key][1], b_t)


def test_truncated_weights(tmp_path, llama_adapters, spec):
    a = copy_adapter(llama_adapters / "attn4", tmp_path / "a")
    data = (a / "adapter_model.safetensors").read_bytes()
    (a / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(a, spec, "unreadable weights")


def test_target_module_absent(tmp_path, llama_adapters, spec):
    a = copy_adapter(llama_adapters / "attn4", tmp_path / "a")
    edit_tensors(a, lambda t: {k.replace("q_proj", "qq_proj"): v for k, v in t.items()})
    edit_config(a, target_modules=["qq_proj", "v_proj"])  # weights of a module the config does not target are ignored
    expect_error(a, spec, "module 'qq_proj' is not a supported target")


def test_layer_absent(tmp_path, llama_adapters, spec):
    a = copy_adapter(llama_adapters / "attn4", tmp_path / "a")
    edit_tensors(a, lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()})
    expect_error(a, spec, "only 2 layers")


def test_shape_mismatch(tmp_path, llama_adapters, spec):
    a = copy_adapter(llama_adapters / "attn4", tmp_path / "a")
    edit_tensors(a, lambda t: {k: (v[:, :10].contiguous() if "q_proj.lora_A" in k else v) for k, v in t.items()})
    expect_error(a, spec, "does not match the model")


def test_rank_above_max(llama_adapters, spec):
    e = expect_error(llama_adapters / "all16rs", spec, "rank 16 exceeds max_lora_rank 8", max_lora_rank=8)
    assert e.fields == ("max_lora_rank",)


def test_missing_half(tmp_path, llama_adapters, spec):
    a = copy_adapter(llama_adapters / "attn4", tmp_path / "a")
    edit_tensors(a, lambda t: {k: v for k, v in t.items() if "layers.0.self_attn.q_proj.lora_B" not in k})
    expect_error(a, spec, "lora_B weight missing")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"use_dora": True}, "lora_magnitude_vector missing \\(use_dora is true: DoRA"),
        ({"bias": "some"}, "bias='some' is not one of PEFT's values"),
        ({"lora_bias": True, "use_dora": True}, "PEFT refuses lora_bias for DoRA"),
        ({"lora_bias": True, "init_lora_weights": "gaussian"}, "PEFT allows lora_bias only with true or false"),
        ({"modules_to_save": ["score"]}, "modules_to_save \\['score'\\]: only embed_tokens and lm_head can be served"),
        ({"target_modules": ["embed_tokens", "q_proj"]}, "'embed_tokens' has no weights in the file, and PEFT would"),
        ({"peft_type": "IA3"}, "not LORA"),
    ],
)
def test_unsupported_features(tmp_path, llama_adapters, spec, change, match):
    a = copy_adapter(llama_adapters / "attn4", tmp_path / "a")
    edit_config(a, **change)
    expect_error(a, spec, match)


def test_dora_and_embedding_tensors(tmp_path, llama_adapters, spec):
    a = copy_adapter(llama_adapters / "attn4", tmp_path / "a")
    edit_tensors(
        a, lambda t: {**t, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}
    )
    expect_error(a, spec, "a DoRA magnitude vector, but use_dora is false")
    b = copy_adapter(llama_adapters / "attn4", tmp_path / "b")
    edit_tensors(b, lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 10)})
    expect_error(b, spec, "embed_tokens LoRA: B weight missing")  # embedding LoRA is served: test_vocab_adapters.py


# --- one rule with inspect-adapter: values, config ranks, absent targets (PEFT as the oracle) ---------


def peft_model(model_dir, folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(folder))


@pytest.mark.parametrize(
    "key,value,counts",
    [
        ("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight", float("nan"), "1 NaN, 0 infinite"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", float("-inf"), "0 NaN, 1 infinite"),
    ],
)
def test_nonfinite_weights_refused_at_load(tmp_path, llama_adapters, spec, key, value, counts):
    a = copy_adapter(llama_adapters / "attn4", tmp_path / "a")

    def poison(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = value
        return tensors

    edit_tensors(a, poison)
    e = expect_error(a, spec, f"tensor {key}: non-finite values \\({counts}\\)")
    assert e.path == str(a / "adapter_model.safetensors")


def test_config_rank_unlike_the_weights_is_refused_as_peft_refuses_it(tmp_path, llama_dir, llama_adapters, spec):
    a = copy_adapter(llama_adapters / "attn4", tmp_path / "a")
    edit_config(a, r=8)
    expect_error(a, spec, r"layer 0 k_proj: rank 4 in the weights, 8 in adapter_config.json \(r / rank_pattern\)")
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_model(llama_dir, a)
    b = copy_adapter(llama_adapters / "pattern", tmp_path / "b")
    edit_config(b, rank_pattern={"down_proj": 4, "v_proj": 2})
    expect_error(b, spec, "layer 0 v_proj: rank 8 in the weights, 2 in adapter_config.json")


def test_absent_targets_are_served_as_peft_serves_them(tmp_path, llama_dir, llama_adapters, spec):
    """gate_proj listed with no weights (PEFT: B stays 0, a warning) and foo_proj (PEFT: ignored): same deltas."""
    a = copy_adapter(llama_adapters / "attn4", tmp_path / "a")
    edit_config(a, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "foo_proj"])
    edit_config(a, init_lora_weights=True)
    w = load_adapter(a, spec)
    with pytest.warns(UserWarning, match="missing adapter keys"):
        peft = peft_model(llama_dir, a)
    checked = set()
    for name, mod in peft.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            layer, module = int(name.split(".layers.")[1].split(".")[0]), name.rsplit(".", 1)[1]
            ref = mod.get_delta_weight("default")
            pair = w.modules.get((layer, module))  # none for gate_proj: no delta
            ours = pair[1] @ pair[0] if pair is not None else torch.zeros_like(ref)
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
            checked.add(module)
    assert checked == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"}
    assert (0, "gate_proj") not in w.modules


@pytest.mark.parametrize("init", [False, "orthogonal"])
def test_absent_target_refused_when_peft_would_start_it_random(tmp_path, llama_adapters, spec, init):
    a = copy_adapter(llama_adapters / "attn4", tmp_path / "a")
    edit_config(a, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"], init_lora_weights=init)
    expect_error(a, spec, f"target_modules: 'gate_proj' has no weights in the file, .*init_lora_weights={init!r}")


# --- bad pickles under allow_pickle: one line, no torch warning ------------------------------------


class RunsCode:
    def __reduce__(self):
        return (print, ("ran code from a pickle",))


@pytest.mark.parametrize(
    "write,match",
    [
        (lambda p, t: torch.save({**t, "x": RunsCode()}, p), "Unsupported global: GLOBAL print was not an allowed"),
        (lambda p, t: p.write_bytes(pickle.dumps(t)), "holds more than plain tensors"),  # protocol 4: a torch warning
        (lambda p, t: torch.save({"step": 3}, p), "not a state dict of named tensors"),
        (lambda p, t: torch.save(list(t.values()), p), "not a state dict of named tensors"),
    ],
    ids=["code", "plain-pickle", "not-tensors", "a-list"],
)
def test_bad_pickle_is_one_line_without_warnings(tmp_path, llama_adapters, spec, write, match):
    a = copy_adapter(llama_adapters / "attn4", tmp_path / "a")
    tensors = load_file(str(a / "adapter_model.safetensors"))
    (a / "adapter_model.safetensors").unlink()
    write(a / "adapter_model.bin", tensors)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e = expect_error(a, spec, match, allow_pickle=True)
    assert e.path == str(a / "adapter_model.bin")
    assert "Weights only load failed" not in str(e) and "\x1b" not in str(e)
    assert [str(w.message) for w in caught] == []

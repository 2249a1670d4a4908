"""`loracli inspect-adapter`: every reported number is checked against PEFT's own config and
layers, the raw tensors, an HF model's linears and the engine's real slot buffers; the CLI's
exit codes, JSON stdout and one-line errors are checked in-process through `main` and once in
a subprocess."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_main import cli
from safetensors.torch import load_file, save_file

from loracli.adapters import load_adapter
from loracli.errors import AdapterError, ConfigError
from loracli.inspect import inspect_path
from loracli.inspect.analysis import smallest_max_lora_rank
from loracli.inspect.lines import layer_span, merge_layer_lines
from loracli.inspect.modules import delta_norm
from loracli.model.loader import load_config

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- fixtures ----------------------------------------------------------------------------------


def peft_adapter(model_dir: Path, out: Path, *, randomize: bool, seed: int = 0, **lora) -> Path:
    """A PEFT adapter saved by PEFT itself; `randomize=False` keeps PEFT's init (B = 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=True, **lora))
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    p.normal_(0, 0.3)
    model.save_pretrained(str(out))
    return out


def copy_adapter(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


@pytest.fixture(scope="module")
def zoo(llama_dir, llama_adapters, tmp_path_factory):
    """A folder of adapters: the shared four, plus zero, DoRA, foo_proj, truncated and pickle ones."""
    root = tmp_path_factory.mktemp("zoo")
    for name in ("attn4", "mlp8", "all16rs", "pattern"):
        copy_adapter(llama_adapters / name, root / name)
    peft_adapter(
        llama_dir,
        root / "zero",
        randomize=False,
        r=2,
        lora_alpha=4,
        target_modules=["o_proj"],
        layers_to_transform=[1],
        lora_dropout=0.1,
    )
    peft_adapter(
        llama_dir, root / "dora", randomize=True, seed=3, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True
    )

    foo = copy_adapter(llama_adapters / "attn4", root / "foo")
    cfg = json.loads((foo / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "foo_proj", "v_proj", "o_proj"]
    (foo / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(foo / "adapter_model.safetensors")
    renamed = {k.replace("k_proj", "foo_proj"): v for k, v in tensors.items()}
    save_file(renamed, foo / "adapter_model.safetensors")

    trunc = copy_adapter(llama_adapters / "attn4", root / "trunc")
    weights = trunc / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return root


@pytest.fixture(scope="module")
def pickled(llama_adapters, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pickled") / "attn4bin"
    folder.mkdir()
    shutil.copy(llama_adapters / "attn4" / "adapter_config.json", folder)
    tensors = load_file(llama_adapters / "attn4" / "adapter_model.safetensors")
    torch.save(tensors, folder / "adapter_model.bin")
    return folder


@pytest.fixture(scope="module")
def narrow_model(llama_dir, tmp_path_factory):
    """The tiny Llama's config with intermediate_size 96: MLP adapters no longer fit (weights untouched)."""
    folder = tmp_path_factory.mktemp("narrow") / "model"
    folder.mkdir()
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").symlink_to(llama_dir / "model.safetensors")
    return folder


def report_of(path, **kw):
    kw.setdefault("dtype", "float32")
    report = inspect_path(path, **kw)
    assert report.mode == "adapter"
    return report.adapters[0]


# --- pure helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize("r,n_in,n_out,scale", [(1, 5, 3, 2.0), (8, 64, 32, -0.5), (16, 7, 200, 1 / 3)])
def test_delta_norm_matches_the_dense_product(r, n_in, n_out, scale):
    g = torch.Generator().manual_seed(r)
    a = torch.randn(r, n_in, generator=g, dtype=torch.float64)
    b = torch.randn(n_out, r, generator=g, dtype=torch.float64)
    expected = torch.linalg.matrix_norm(scale * b @ a).item()
    assert delta_norm(a, b, scale) == pytest.approx(expected, rel=1e-12)
    assert delta_norm(a, torch.zeros_like(b), scale) == 0.0


def test_small_helpers():
    ranks = (1, 2, 3, 8, 9, 300, 512, 513)
    assert [smallest_max_lora_rank(r) for r in ranks] == [1, 2, 4, 8, 16, 512, 512, None]
    assert layer_span([5, 0, 1, 2, 7, 8]) == "0-2, 5, 7-8"
    assert merge_layer_lines(
        [
            "layer 0 q_proj: bad",
            "x",
            "layer 1 q_proj: bad",
            "layer 0 k_proj: bad",
            "tensor m.layers.0.q.w: no",
            "tensor m.layers.3.q.w: no",
        ]
    ) == ["layers 0-1 q_proj: bad", "x", "layer 0 k_proj: bad", "tensor m.layers.{0, 3}.q.w: no"]


# --- numbers against PEFT and the tensors --------------------------------------------------------


@pytest.mark.parametrize("name", ["attn4", "mlp8", "all16rs", "pattern", "zero"])
def test_config_fields_match_peft(zoo, name):
    from peft import LoraConfig

    peft_cfg = LoraConfig.from_pretrained(str(zoo / name))
    cfg = report_of(zoo / name).config
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == peft_cfg.task_type == "CAUSAL_LM"
    assert cfg["base_model"] == peft_cfg.base_model_name_or_path
    assert cfg["r"] == peft_cfg.r and cfg["lora_alpha"] == peft_cfg.lora_alpha
    assert cfg["target_modules"] == sorted(peft_cfg.target_modules)
    assert cfg["use_rslora"] == peft_cfg.use_rslora
    expected = peft_cfg.lora_alpha / (math.sqrt(peft_cfg.r) if peft_cfg.use_rslora else peft_cfg.r)
    assert cfg["scale"] == pytest.approx(expected)
    assert cfg["scale_formula"] == ("alpha/sqrt(r)" if peft_cfg.use_rslora else "alpha/r")
    assert cfg["rank_pattern"] == peft_cfg.rank_pattern and cfg["alpha_pattern"] == peft_cfg.alpha_pattern
    assert cfg["lora_dropout"] == peft_cfg.lora_dropout and cfg["bias"] == peft_cfg.bias
    assert cfg["layers_to_transform"] == peft_cfg.layers_to_transform
    assert cfg["use_dora"] is False and cfg["modules_to_save"] == []


@pytest.mark.parametrize("name", ["attn4", "mlp8", "all16rs", "pattern"])
def test_weights_match_the_tensors(zoo, name):
    path = zoo / name / "adapter_model.safetensors"
    tensors = load_file(path)
    w = report_of(zoo / name).weights
    assert w.format == "safetensors" and w.file == str(path) and w.file_bytes == path.stat().st_size
    assert w.tensor_count == len(tensors)
    assert w.parameter_count == sum(t.numel() for t in tensors.values())
    assert w.dtypes == ["float32"] and w.all_zero is False
    seen = {}
    for m in w.modules:
        assert m.parameter_count == sum(tensors[k].numel() for k in tensors if f".{m.module}.lora_" in k)
        for group in m.shapes:
            for layer in group.layers:
                seen[(layer, m.module)] = (group.a_shape, group.b_shape)
        assert sorted(layer for g in m.shapes for layer in g.layers) == m.layers
    expected = {}
    for key, t in tensors.items():
        parts = key.split(".")
        layer, module, ab = int(parts[parts.index("layers") + 1]), parts[-3], parts[-2]
        expected.setdefault((layer, module), [None, None])[ab == "lora_B"] = list(t.shape)
    assert seen == {k: tuple(v) for k, v in expected.items()}


@pytest.mark.parametrize("name", ["attn4", "all16rs", "pattern"])
def test_scales_and_norms_match_peft_delta_weights(llama_dir, zoo, name):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(zoo / name))
    norms: dict[str, list[float]] = {}
    scales: dict[str, set[float]] = {}
    with torch.no_grad():
        for mod_name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                short = mod_name.rsplit(".", 1)[-1]
                delta = module.get_delta_weight("default").double()
                norms.setdefault(short, []).append(torch.linalg.matrix_norm(delta).item())
                scales.setdefault(short, set()).add(module.scaling["default"])
    report = report_of(zoo / name)
    assert {m.module for m in report.weights.modules} == set(norms)
    for m in report.weights.modules:
        ref = norms[m.module]
        assert m.delta_norm["min"] == pytest.approx(min(ref), rel=1e-5)
        assert m.delta_norm["median"] == pytest.approx(statistics.median(ref), rel=1e-5)
        assert m.delta_norm["max"] == pytest.approx(max(ref), rel=1e-5)
        assert m.scales == pytest.approx(sorted(scales[m.module]))
    if name == "pattern":  # rank_pattern {"down_proj": 4}, alpha_pattern {"v_proj": 32}, r=8, alpha=16
        by = {m.module: m for m in report.weights.modules}
        assert by["down_proj"].ranks == [4] and by["down_proj"].scales == [4.0]
        assert by["v_proj"].ranks == [8] and by["v_proj"].scales == [4.0]
        assert by["q_proj"].scales == [2.0]


def hf_slot_bytes(model_dir: Path, rank: int, dtype_bytes: int) -> int:
    """(R*(in+out) + 2*out)*bytes (A, B, the DoRA and bias tables) over every target linear of the real HF
    model (not ModelSpec)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return sum(
        (rank * (m.in_features + m.out_features) + 2 * m.out_features) * dtype_bytes
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in MODULES
    )


def full_width_bytes(model) -> int:
    """Bytes allocated for every slot's LoRA buffers (A and B at `max_rank`, the DoRA and bias tables)."""
    return sum(lin.buffer_bytes() for _, lin in model.linears())


def live_bytes(model) -> int:
    """Bytes of the LoRA buffers as they are laid out now."""
    return sum(t.nbytes for _, lin in model.linears() for t in (lin.A, *lin.B, *lin.gm1, *lin.bias_delta))


@pytest.mark.parametrize("dtype,nbytes", [("float32", 4), ("bfloat16", 2)])
def test_engine_cost_matches_the_formula_and_the_real_buffers(llama_dir, zoo, dtype, nbytes):
    from loracli.config import EngineConfig
    from loracli.engine.engine import Engine
    from loracli.model.spec import ModelSpec

    report = inspect_path(zoo / "pattern", model=str(llama_dir), max_lora_rank=16, memory_budget=10**6, dtype=dtype)
    e, a = report.engine, report.adapters[0]
    assert e.dtype == dtype and e.dtype_bytes == nbytes and e.max_lora_rank == 16
    assert e.slot_bytes == hf_slot_bytes(llama_dir, 16, nbytes)
    assert e.slots_in_budget == 10**6 // e.slot_bytes
    assert a.cost.rank == 8 and a.cost.slot_bytes_at_rank == hf_slot_bytes(llama_dir, 8, nbytes)
    assert a.cost.smallest_max_lora_rank == 8
    _, spec = load_config(llama_dir)
    own = load_adapter(zoo / "pattern", spec, dtype=getattr(torch, dtype))
    assert a.cost.own_weights_bytes == own.nbytes  # the engine's CPU-cache copy of this adapter
    engine = Engine(
        EngineConfig(model=str(llama_dir), max_loras=3, max_lora_rank=16, dtype=dtype, num_kv_blocks=2, max_num_seqs=1)
    )
    assert full_width_bytes(engine.model) == 3 * e.slot_bytes
    engine.model_runner.write_adapter(0, own)
    assert 0 < live_bytes(engine.model) < 3 * e.slot_bytes  # in use: as wide as rank 8 needs
    assert isinstance(engine.spec, ModelSpec)


def test_without_model_slot_cost_is_left_to_model(zoo):
    report = inspect_path(zoo / "attn4", dtype="float32")
    assert report.model is None and report.engine.slot_bytes is None and report.engine.slots_in_budget is None
    cost = report.adapters[0].cost
    assert cost.slot_bytes_at_rank is None
    tensors = load_file(zoo / "attn4" / "adapter_model.safetensors")
    assert cost.own_weights_bytes == sum(t.numel() for t in tensors.values()) * 4


# --- warnings and compatibility ----------------------------------------------------------------


def test_zero_adapter_is_flagged(zoo, llama_dir):
    a = report_of(zoo / "zero", model=str(llama_dir))
    assert a.status == "warning" and a.problems == []
    assert a.weights.all_zero and "zero" in a.warnings[0]
    (m,) = a.weights.modules
    assert m.module == "o_proj" and m.layers == [1] and m.ranks == [2]
    assert m.delta_norm == {"min": 0.0, "median": 0.0, "max": 0.0}
    assert report_of(zoo / "attn4").warnings == []


def test_compatible_adapters_have_no_problems(zoo, llama_dir):
    for name in ("attn4", "mlp8", "all16rs", "pattern"):
        a = report_of(zoo / name, model=str(llama_dir))
        assert (a.status, a.problems, a.warnings) == ("ok", [], []), name


def test_dora_is_served_and_its_magnitudes_reported(zoo, llama_dir):
    a = report_of(zoo / "dora", model=str(llama_dir))
    assert (a.status, a.problems, a.warnings) == ("ok", [], [])
    assert a.config["use_dora"] is True and a.weights.extras == {"lora_magnitude_vector": 2}  # q_proj, 2 layers
    assert a.cost.extras_bytes == 2 * 64 * 4 and a.cost.own_weights_bytes == 2 * 4 * (64 + 64) * 4 + 2 * 64 * 4


def test_unknown_module_is_reported(zoo, llama_dir):
    a = report_of(zoo / "foo", model=str(llama_dir))
    assert a.status == "incompatible"
    assert "layers 0-1 foo_proj: module 'foo_proj' is not a supported target" in "\n".join(a.problems)
    assert "foo_proj" in {m.module for m in a.weights.modules}
    assert report_of(zoo / "foo").status == "incompatible"  # refused even without --model


def test_shape_mismatch_and_rank_limit(zoo, llama_dir, narrow_model):
    a = report_of(zoo / "mlp8", model=str(narrow_model))
    assert a.status == "incompatible"
    by_module = {p.split(":")[0]: p for p in a.problems}
    assert set(by_module) == {"layers 0-1 gate_proj", "layers 0-1 up_proj", "layers 0-1 down_proj"}
    assert "expected A [r, 64], B [96, r]" in by_module["layers 0-1 gate_proj"]
    assert "expected A [r, 96], B [64, r]" in by_module["layers 0-1 down_proj"]
    b = report_of(zoo / "all16rs", model=str(llama_dir), max_lora_rank=8)
    assert len(b.problems) == 7 and all("rank 16 exceeds max_lora_rank 8" in p for p in b.problems)
    assert b.cost.smallest_max_lora_rank == 16


def poisoned(tensors: dict, key: str, value: float) -> dict:
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = value
    return tensors


NAN_KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
INF_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
ATTN = ["k_proj", "o_proj", "q_proj", "v_proj"]
VARIANTS = {  # name: (config changes, tensor edit, inspect status, a fragment of the line that says why)
    "as-is": ({}, None, "ok", None),
    "absent-target": (
        {"target_modules": [*ATTN, "gate_proj"], "init_lora_weights": True},
        None,
        "warning",
        "'gate_proj' has no weights",
    ),
    "absent-target-gaussian": (
        {"target_modules": [*ATTN, "up_proj"], "init_lora_weights": "gaussian"},
        None,
        "warning",
        "initial B = 0",
    ),
    "absent-target-random-init": (
        {"target_modules": [*ATTN, "gate_proj"], "init_lora_weights": False},
        None,
        "incompatible",
        "init_lora_weights=False",
    ),
    "unknown-target": ({"target_modules": [*ATTN, "foo_proj"]}, None, "warning", "'foo_proj' has no weights"),
    "config-rank": ({"r": 8}, None, "incompatible", "rank 4 in the weights, 8 in adapter_config.json"),
    "rank-pattern": ({"rank_pattern": {"v_proj": 2}}, None, "incompatible", "v_proj: rank 4 in the weights, 2 in"),
    "nan": (
        {},
        lambda t: poisoned(t, NAN_KEY, float("nan")),
        "incompatible",
        f"tensor {NAN_KEY}: non-finite values (1 NaN",
    ),
    "inf": ({}, lambda t: poisoned(t, INF_KEY, float("inf")), "incompatible", "non-finite values (0 NaN, 1 infinite)"),
}


def variant(llama_adapters: Path, dest: Path, name: str) -> Path:
    """attn4 (r=4, q/k/v/o) with one of `VARIANTS`' edits."""
    changes, edit, _, _ = VARIANTS[name]
    folder = copy_adapter(llama_adapters / "attn4", dest)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    if edit is not None:
        weights = folder / "adapter_model.safetensors"
        save_file(edit(load_file(weights)), weights)
    return folder


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_inspect_refuses_exactly_what_run_refuses(tmp_path, llama_dir, llama_adapters, name):
    """One rule: `inspect-adapter` reports a problem exactly when `load_adapter` (the run) refuses the adapter."""
    folder = variant(llama_adapters, tmp_path / name, name)
    _, _, status, why = VARIANTS[name]
    report = report_of(folder, model=str(llama_dir))
    assert report.status == status, (report.problems, report.warnings)
    try:
        load_adapter(folder, load_config(llama_dir)[1])
        refused = None
    except AdapterError as e:
        refused = str(e)
    assert (refused is not None) == (status == "incompatible")
    lines = report.problems if status == "incompatible" else report.warnings
    if why is not None:
        assert any(why in line for line in lines), lines
        assert refused is None or why in refused


def test_cli_nonfinite_weights_exit_1(monkeypatch, capsys, tmp_path, llama_adapters):
    folder = variant(llama_adapters, tmp_path / "nan", "nan")
    code, out, _ = cli(monkeypatch, capsys, "inspect-adapter", folder, "--json")
    adapter = json.loads(out)["adapters"][0]
    assert code == 1 and adapter["status"] == "incompatible"
    assert adapter["problems"] == [f"tensor {NAN_KEY}: non-finite values (1 NaN, 0 infinite)"]


def test_folder_mode_keeps_going_past_broken_adapters(zoo, llama_dir):
    report = inspect_path(zoo, model=str(llama_dir), dtype="float32")
    status = {a.name: a.status for a in report.adapters}
    assert status == {
        "all16rs": "ok",
        "attn4": "ok",
        "dora": "ok",
        "foo": "incompatible",
        "mlp8": "ok",
        "pattern": "ok",
        "trunc": "error",
        "zero": "warning",
    }
    assert report.mode == "folder" and not report.ok
    trunc = next(a for a in report.adapters if a.name == "trunc")
    assert trunc.problems[0].startswith(f"{zoo / 'trunc' / 'adapter_model.safetensors'}: ")
    assert "truncated" in trunc.problems[0] and trunc.config["r"] == 4 and trunc.weights is None


def test_errors_name_the_file(zoo, pickled, tmp_path):
    with pytest.raises(AdapterError, match="truncated or corrupt") as e:
        inspect_path(zoo / "trunc")
    assert e.value.path == str(zoo / "trunc" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="set allow_pickle to read them") as e:
        inspect_path(pickled)
    assert e.value.fields == ("allow_pickle",)
    with pytest.raises(AdapterError, match="no adapter_config.json and no adapter sub-folders"):
        inspect_path(tmp_path)
    with pytest.raises(ConfigError, match="max_lora_rank must be a power of two"):
        inspect_path(zoo / "attn4", max_lora_rank=48)


def test_pickle_weights_with_allow_pickle(zoo, pickled):
    a = report_of(pickled, allow_pickle=True)
    b = report_of(zoo / "attn4")
    assert a.weights.format == "pickle" and a.status == "ok"
    assert a.weights.parameter_count == b.weights.parameter_count
    assert a.weights.tensor_count == b.weights.tensor_count
    assert [m.delta_norm for m in a.weights.modules] == [m.delta_norm for m in b.weights.modules]


@pytest.mark.model
def test_default_model_config_only(zoo):
    report = inspect_path(zoo / "attn4", model="default", dtype="float32")
    m = report.model
    assert (m.model_type, m.num_layers, m.hidden_size, m.intermediate_size) == ("llama", 30, 576, 1536)
    per_layer = 576 * 2 + (576 + 192) * 2 + 576 * 2 + (576 + 1536) * 3  # q, k, v, o, gate, up, down
    outs = 576 + 192 + 192 + 576 + 1536 + 1536 + 576  # the DoRA and bias tables: 2 * out per module
    assert report.engine.slot_bytes == 30 * (64 * per_layer + 2 * outs) * 4
    assert report.adapters[0].status == "incompatible"  # tiny-model shapes


# --- the command line --------------------------------------------------------------------------


def test_cli_one_adapter_human(monkeypatch, capsys, zoo, llama_dir):
    code, out, err = cli(
        monkeypatch, capsys, "inspect-adapter", zoo / "pattern", "--model", llama_dir, "--dtype", "float32"
    )
    assert code == 0, err
    for text in (
        "pattern",
        "rank_pattern",
        "2 layers × down_proj A [4, 128], B [64, 4]",
        "alpha/r",
        "slots in budget",
        "compatible with",
    ):
        assert text in out, text


def test_cli_json_is_one_document(monkeypatch, capsys, zoo, llama_dir):
    code, out, _ = cli(
        monkeypatch,
        capsys,
        "inspect-adapter",
        zoo / "attn4",
        "--model",
        llama_dir,
        "--json",
        "--memory-budget",
        "1MiB",
        "--dtype",
        "float32",
    )
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {"schema", "mode", "path", "ok", "model", "engine", "adapters"}
    assert doc["engine"]["memory_budget_bytes"] == 2**20 and doc["ok"] is True
    assert set(doc["adapters"][0]) == {"name", "path", "status", "problems", "warnings", "config", "weights", "cost"}


def test_cli_folder_exits_1_with_a_table(monkeypatch, capsys, zoo):
    code, out, err = cli(monkeypatch, capsys, "inspect-adapter", zoo)
    assert code == 1 and err == ""
    assert "trunc" in out and "error" in out and "incompatible" in out
    assert any(line.strip().startswith("✗ trunc: ") and "truncated" in line for line in out.splitlines())
    code, out, _ = cli(monkeypatch, capsys, "inspect-adapter", zoo, "--json")
    assert code == 1 and len(json.loads(out)["adapters"]) == 8


def test_cli_incompatible_single_adapter_exits_1(monkeypatch, capsys, zoo, llama_dir):
    code, out, _ = cli(monkeypatch, capsys, "inspect-adapter", zoo / "foo", "--model", llama_dir, "--json")
    assert code == 1 and json.loads(out)["adapters"][0]["status"] == "incompatible"


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing", "adapter folder not found"),
        ("badjson", "adapter_config.json: not valid JSON"),
        ("trunc", "adapter_model.safetensors: unreadable safetensors file, truncated or corrupt"),
        ("pickle", "adapter_model.bin: pickle weights are refused"),
        ("rank", "--max-lora-rank must be a power of two"),
        ("budget", "--memory-budget must be a size"),
        ("codepickle", "adapter_model.bin: holds more than plain tensors, or is no torch pickle; not run"),
    ],
)
def test_cli_errors_are_one_line_exit_2(monkeypatch, capsys, tmp_path, zoo, pickled, case, match):
    bad = copy_adapter(zoo / "attn4", tmp_path / "badjson")
    (bad / "adapter_config.json").write_text("{oops")
    code_pickle = copy_adapter(pickled, tmp_path / "codepickle")
    torch.save({"x": print}, code_pickle / "adapter_model.bin")  # a global: refused by weights_only
    target, extra = {
        "missing": (tmp_path / "nope", []),
        "badjson": (bad, []),
        "trunc": (zoo / "trunc", []),
        "pickle": (pickled, []),
        "codepickle": (code_pickle, ["--allow-pickle"]),
        "rank": (zoo / "attn4", ["--max-lora-rank", "48"]),
        "budget": (zoo / "attn4", ["--memory-budget", "lots"]),
    }[case]
    code, out, err = cli(monkeypatch, capsys, "inspect-adapter", target, *extra, "--json")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and match in err and "Traceback" not in err


def test_cli_debug_shows_the_traceback(monkeypatch, capsys, zoo):
    from loracli.cli import main

    monkeypatch.setenv("LORACLI_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["loracli", "inspect-adapter", str(zoo / "trunc")])
    with pytest.raises(AdapterError):
        main()


def test_subprocess_stdout_and_exit_codes(zoo):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "loracli", "inspect-adapter"]
    p = subprocess.run([*run, str(zoo / "trunc")], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and "trunc/adapter_model.safetensors" in p.stderr

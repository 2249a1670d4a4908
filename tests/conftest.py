"""Shared fixtures: tiny random models and adapters, built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if not torch.cuda.is_available():
    # Triton picks interpreted vs compiled at its first import, which other test modules may trigger
    # (transformers, torch._inductor): set it here, before any of them, so the kernel tests can run on CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: tiny tensors run several times faster so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    from tiny import make_model

    return make_model(tmp_path_factory.mktemp("llama") / "model", "llama", seed=0)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    from tiny import make_model

    return make_model(tmp_path_factory.mktemp("qwen2") / "model", "qwen2", seed=1)


def _adapters(model_dir, root):
    from tiny import make_adapter

    make_adapter(model_dir, root / "attn4", r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=11)
    make_adapter(model_dir, root / "mlp8", r=8, targets=("gate_proj", "up_proj", "down_proj"), seed=12)
    make_adapter(
        model_dir,
        root / "all16rs",
        r=16,
        alpha=8,
        rslora=True,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        seed=13,
    )
    make_adapter(
        model_dir,
        root / "pattern",
        r=8,
        targets=("q_proj", "v_proj", "down_proj"),
        seed=14,
        rank_pattern={"down_proj": 4},
        alpha_pattern={"v_proj": 32},
    )
    return root


@pytest.fixture(scope="session")
def llama_adapters(llama_dir, tmp_path_factory):
    return _adapters(llama_dir, tmp_path_factory.mktemp("llama_adapters"))


@pytest.fixture(scope="session")
def qwen_adapters(qwen_dir, tmp_path_factory):
    return _adapters(qwen_dir, tmp_path_factory.mktemp("qwen_adapters"))

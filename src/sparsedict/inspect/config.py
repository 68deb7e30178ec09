"""``InspectConfig``: what ``sparsedict inspect`` reads, computes and writes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class InspectConfig:
    """Inspect dictionaries over an activation cache: statistics, examples, logit lens, browser, exports."""

    checkpoints: list[str] = field(default_factory=list)
    """Checkpoint directories (any format ``from_pretrained`` reads); several on one hookpoint share a pass."""
    cache: str = ""
    """Activation cache holding the checkpoints' (input) hookpoints; its stored token ids give the contexts."""
    out: str = "runs/inspect"
    """Output directory: index.html, one folder per checkpoint (pages, data, exports)."""
    tokens: int = 0
    """Cached tokens (rows) to read, rounded up to a whole context; 0 reads the whole cache."""
    latents: str = ""
    """Latents to tabulate and write pages for, e.g. "0-99,512,1000-1099"; empty: all. Statistics
    (density, histogram) always cover every latent."""
    top_n: int = 20
    """Top-activating examples kept per latent (exact)."""
    quantiles: int = 5
    """Activation-quantile bands of the sampled examples."""
    per_quantile: int = 4
    """Sampled examples shown per band (the sample holds quantiles · per_quantile random firings)."""
    window: int = 16
    """Tokens shown on each side of the firing token."""
    logits: int = 10
    """Tokens in the top and bottom logit-lens tables."""
    neighbours: int = 8
    """Nearest features by decoder cosine listed per latent."""
    seed: int = 0
    """Seed of the quantile sample (results are identical for a seed, whatever the batch size)."""
    batch_rows: int = 4096
    """Rows encoded per batch (whole contexts; a batch may be one context larger)."""
    model: str = ""
    """Model for the unembedding and tokenizer (default: the cache's model)."""
    hookpoint: str = ""
    """Hookpoint for checkpoints whose config names none (some peer formats)."""
    device: str = "cpu"
    """Device for encoding and the logit lens."""
    threads: int = 0
    """CPU threads for torch (0: torch's default)."""
    html: bool = True
    """Write the browser (index.html and a page per latent)."""
    neuronpedia: bool = False
    """Also write Neuronpedia's export layout (features/ and activations/ batch-N.jsonl.gz)."""
    neuronpedia_model: str = ""
    """Model id in the Neuronpedia export (default: the cache's model name)."""
    neuronpedia_set: str = ""
    """Neuronpedia source set (the source id is "<layer>-<set>"; default: "sparsedict-<checkpoint>")."""
    delphi: bool = False
    """Also write a delphi latent cache (every firing: locations, activations, tokens; safetensors)."""
    delphi_splits: int = 5
    """Files the delphi cache is split into over the latent width."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if isinstance(self.checkpoints, str):
            self.checkpoints = [self.checkpoints]
        self.checkpoints = list(self.checkpoints)
        for name in ("top_n", "quantiles", "per_quantile", "window", "logits", "neighbours", "tokens",
                     "threads"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_rows", "delphi_splits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        parse_latents(self.latents, None)

    @property
    def samples(self) -> int:
        return self.quantiles * self.per_quantile


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_latents(spec: str, n: int | None) -> list[int] | None:
    """``"0-9,42"`` -> ``[0, ..., 9, 42]`` (sorted, unique); empty -> None (all). ``n`` checks the range."""
    spec = (spec or "").replace(" ", "")
    if not spec:
        return None
    out: set[int] = set()
    for part in spec.split(","):
        m = _RANGE.match(part)
        if not m:
            raise ValueError(f"latents: cannot read {part!r} in {spec!r}; use ids and ranges like '0-99,512'")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise ValueError(f"latents: range {part!r} is empty (end before start)")
        out.update(range(a, b + 1))
    if n is not None and max(out) >= n:
        raise ValueError(f"latents: {max(out)} is out of range for a dictionary of {n} latents (0..{n - 1})")
    return sorted(out)


__all__ = ["InspectConfig", "parse_latents"]

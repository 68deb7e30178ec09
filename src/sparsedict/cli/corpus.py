"""``sparsedict corpus [--out DIR] [--no_count_tokens]``: build the embedded corpus and report it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sparsedict.config import parse_cli


@dataclass
class CorpusConfig:
    """Options of ``sparsedict corpus``."""

    out: str = ""
    """Output directory for train.jsonl/test.jsonl (empty: cache_dir()/corpus)."""
    no_count_tokens: bool = False
    """Skip counting the SmolLM2 tokens of the built corpus."""


def main(argv: list[str]) -> int:
    from sparsedict.corpus import LICENCE_NOTE, build_corpus, corpus_dir

    cfg = parse_cli(CorpusConfig, argv, "sparsedict corpus", __doc__)
    out = Path(cfg.out) if cfg.out else corpus_dir()
    counts = build_corpus(out)
    print(f"wrote {out}/train.jsonl ({counts['train']} docs) and test.jsonl ({counts['test']} docs)")
    print(f"{counts['chars']:,} characters of prose")
    if not cfg.no_count_tokens:
        from sparsedict.lm import load_model

        _, tok = load_model()
        n = 0
        for split in ("train", "test"):
            with (out / f"{split}.jsonl").open() as f:
                texts = [json.loads(line)["text"] for line in f]
            n += sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
        print(f"{n:,} SmolLM2 tokens")
    print(f"licences: {LICENCE_NOTE}")
    return 0

"""Files shipped inside the package (so a wheel works like a checkout).

``quickstart.yaml`` is the recipe ``sparsedict quickstart`` runs (``recipes/smollm2-135m/quickstart.yaml``
in a checkout links here); ``corpus_sample.jsonl`` is a small sample of the embedded corpus
(``dataset: embedded-sample``; its provenance and licences are in ``README.md`` beside it).
"""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
QUICKSTART_RECIPE = DATA_DIR / "quickstart.yaml"
CORPUS_SAMPLE = DATA_DIR / "corpus_sample.jsonl"

"""Our SAELens exports, for SAELens to load and run (step 1 of 2; run with sparsedict's own venv).

For every dictionary in ``tests/helpers.py``'s ``EXPORT_FIXTURES`` this writes
``tests/data/peers/saelens/export_<name>/``:

- ``checkpoint/``: ``save_saelens`` of :func:`export_fixture_model` (input scale folded in);
- ``sparsedict.safetensors``: fixed inputs ``x`` and what our dictionary computes on them before the export
  (``acts`` = codes, ``out`` = forward with the skip term, ``decoded`` = decoder alone; an input scale c is
  applied as in training, ``f(c·x)/c``);
- ``spec.json``: the fixture's entry of ``EXPORT_FIXTURES`` (the test rebuilds the dictionary from it).

Step 2, ``check_sparsedict_exports.py`` in SAELens' venv, loads each checkpoint with ``SAE.load_from_disk``,
fails unless SAELens' outputs equal ours, and writes them as ``expected.safetensors`` + ``fixture.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from helpers import EXPORT_FIXTURES, export_fixture_model  # noqa: E402

from sparsedict.formats.saelens import save_saelens  # noqa: E402

ROOT = REPO / "tests" / "data" / "peers" / "saelens"


def ours(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    c = float(model.input_scale)
    with torch.no_grad():
        code = model.encode(x * c)
        return {
            "x": x,
            "acts": code.to_dense(),
            "out": model.decode(code, x * c) / c,
            "decoded": model.decode(code) / c,
        }


def main() -> None:
    torch.set_num_threads(1)
    for i, name in enumerate(EXPORT_FIXTURES):
        model = export_fixture_model(name, seed=100 + i)
        path = ROOT / f"export_{name}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # mlp_in's TransformerLens caveat: the numbers are still the SAE's
            save_saelens(model, path / "checkpoint")
        g = torch.Generator().manual_seed(200 + i)
        x = torch.randn(32, model.d_in, generator=g) * 2 + torch.randn(model.d_in, generator=g) * 0.5
        save_file(
            {k: v.float().contiguous() for k, v in ours(model, x).items()},
            str(path / "sparsedict.safetensors"),
        )
        spec = {"name": name, "seed": 100 + i, **EXPORT_FIXTURES[name]}
        (path / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()

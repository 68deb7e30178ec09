"""SAELens loads and runs sparsedict's SAELens exports (step 2 of 2; run in SAELens' venv).

For every ``tests/data/peers/saelens/export_<name>/`` written by ``gen_sparsedict_exports.py``: load
``checkpoint/`` with ``SAE.load_from_disk``, run it on the ``x`` of ``sparsedict.safetensors`` and fail unless its
codes, forward output and decoder output equal ours (fp32 tolerance) and its config keeps our hook names; then
write SAELens' outputs as ``expected.safetensors`` and ``fixture.json`` (the layout of every peer fixture).
An attention-z SAE with ``reshape_activations: hook_z`` is given ``x`` as ``[B, n_heads, d_head]``, as SAELens
hooks it, and its outputs are flattened back.
"""

from __future__ import annotations

import json
import warnings

import torch
from common import ROOT, write
from sae_lens import SAE
from safetensors.torch import load_file


def main() -> None:
    torch.set_num_threads(1)
    found = sorted((ROOT / "saelens").glob("export_*/sparsedict.safetensors"))
    if not found:
        raise SystemExit("no exports found: run gen_sparsedict_exports.py with sparsedict's venv first")
    for file in found:
        path = file.parent
        ours = load_file(str(file))
        spec = json.loads((path / "spec.json").read_text())
        cfg = json.loads((path / "checkpoint" / "cfg.json").read_text())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "load the model with from_pretrained_no_processing" advice
            sae = SAE.load_from_disk(path / "checkpoint", device="cpu")
        meta = sae.cfg.metadata
        assert meta.hook_name == cfg["metadata"]["hook_name"], (path, meta.hook_name)
        assert meta.hook_head_index == cfg["metadata"]["hook_head_index"], path
        assert meta.get("sparsedict_hookpoint") == spec["hookpoint"], path
        x = ours["x"]
        z = cfg["reshape_activations"] == "hook_z"
        x_in = x.view(x.shape[0], spec["n_heads"], -1) if z else x
        with torch.no_grad():
            acts = sae.encode(x_in)
            out = {"x": x, "acts": acts, "out": sae(x_in), "decoded": sae.decode(acts)}
        out = {k: v.flatten(-2) if z and k in ("out", "decoded") else v for k, v in out.items()}
        tol = 1e-5 * (1 + float(ours["out"].abs().max()))
        for key in ("acts", "out", "decoded"):
            torch.testing.assert_close(out[key], ours[key], atol=tol, rtol=1e-5, msg=f"{path.name}: {key}")
        active = out["acts"] != 0
        assert active.any() and not active.all(), (
            f"{path.name}: the inputs must activate some latents, not all"
        )
        write(
            path,
            "sae-lens",
            {
                "class": type(sae).__name__,
                "architecture": cfg["architecture"],
                "made_by": "scripts/peer_fixtures/gen_sparsedict_exports.py + check_sparsedict_exports.py",
                "how": (
                    f"sparsedict save_saelens of export_fixture_model({spec['name']!r}) (tests/helpers.py); "
                    "SAE.load_from_disk, outputs on sparsedict.safetensors' x; SAELens' outputs equal sparsedict's"
                ),
            },
            out,
        )


if __name__ == "__main__":
    main()

"""Checkpoints written by the real peer libraries, loaded here and compared with the peers' own outputs.

Every directory ``tests/data/peers/<library>/<name>/`` holding a ``fixture.json`` is one case: ``checkpoint/``
is what the peer saved, ``expected.safetensors`` its outputs on fixed inputs ``x`` (``acts`` = codes, ``out`` =
its forward output, skip connection included, ``decoded`` = its decoder alone). ``scripts/peer_fixtures/make_all.sh``
makes them with pinned versions in throwaway venvs; a new fixture directory is picked up here automatically
and must either match or be listed in ``REFUSED`` with the message the loader gives. No peer is imported.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsedict.cli.convert import main as convert_main
from sparsedict.convert import verify
from sparsedict.dictionaries import from_pretrained
from sparsedict.formats import FormatError

ROOT = Path(__file__).parent / "data" / "peers"
LOADERS = ("saelens", "sparsify", "dictionary_learning")
FIXTURES = sorted(p.parent for lib in LOADERS for p in (ROOT / lib).glob("*/fixture.json"))

REFUSED = {
    "saelens/abstopk": r"'abstopk' cannot be loaded: it keeps the k largest \|pre-activations\| with their sign",
    "saelens/matching_pursuit": r"'matching_pursuit' cannot be loaded: its pursuit stops on a residual-norm",
    "saelens/train_standard_whitened_intermediate": r"covariance_whitening.*fold_activation_whitening",
    "sparsify/sae_groupmax": r"sparsify activation 'groupmax' is not supported",
}
"""Peer checkpoints that sparsedict refuses, each with (a regex of) the one-line reason it gives."""

WARNS = {
    "saelens/standard_tl_processed": r"TransformerLens with fold_ln=True, center_writing_weights=True",
}
"""Peer checkpoints whose loading warns, with (a regex of) the warning."""


def name(fx: Path) -> str:
    return f"{fx.parent.name}/{fx.name}"


LOADABLE = [fx for fx in FIXTURES if name(fx) not in REFUSED]


def read(fx: Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    meta = json.loads((fx / "fixture.json").read_text())
    return meta, load_file(str(fx / "expected.safetensors")), fx / "checkpoint" / meta.get("subfolder", "")


def load(path: Path, fx_name: str):
    """``from_pretrained``, with the warning ``WARNS`` expects (and none about TransformerLens otherwise)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = from_pretrained(path)
    messages = [str(w.message) for w in caught]
    if fx_name in WARNS:
        assert any(re.search(WARNS[fx_name], m) for m in messages), messages
    else:
        assert not [m for m in messages if "TransformerLens" in m], messages
    return model


def assert_matches(model, e: dict[str, torch.Tensor]) -> None:
    """Our codes and reconstructions on the fixture's inputs equal the peer's (fp32 tolerance)."""
    x = e["x"]
    tol = 1e-5 * (1 + float(e["out"].abs().max()))
    with torch.no_grad():
        code = model.encode(x)
        acts = code.to_dense().float()
        torch.testing.assert_close(acts, e["acts"], atol=tol, rtol=1e-5)
        torch.testing.assert_close(model.decode(code, x).float(), e["out"], atol=tol, rtol=1e-5)
        torch.testing.assert_close(model.decode(code).float(), e["decoded"], atol=tol, rtol=1e-5)
    active = e["acts"] != 0
    assert active.any() and not active.all(), "the fixture's inputs must activate some latents, not all"


def test_fixtures_present_and_described():
    """Each peer has fixtures on disk, each recording library, version, class and how it was made."""
    libraries = {fx.parent.name for fx in FIXTURES}
    assert libraries == set(LOADERS), (
        f"fixtures found for {sorted(libraries)}: run scripts/peer_fixtures/make_all.sh"
    )
    for fx in FIXTURES:
        meta, e, ckpt = read(fx)
        assert {"library", "version", "class", "how", "made_by"} <= set(meta), name(fx)
        assert {"x", "acts", "out", "decoded"} <= set(e), name(fx)
        assert ckpt.is_dir() and any(ckpt.iterdir()), name(fx)
    assert set(REFUSED) <= {name(fx) for fx in FIXTURES}, "REFUSED names a fixture that is not on disk"
    assert set(WARNS) <= {name(fx) for fx in LOADABLE}


@pytest.mark.parametrize("fx", LOADABLE, ids=name)
def test_loader_matches_peer(fx):
    _, e, ckpt = read(fx)
    assert_matches(load(ckpt, name(fx)), e)


@pytest.mark.parametrize("fx", [fx for fx in FIXTURES if name(fx) in REFUSED], ids=name)
def test_loader_refuses_with_reason(fx):
    _, _, ckpt = read(fx)
    with pytest.raises(FormatError, match=REFUSED[name(fx)]):
        from_pretrained(ckpt)


@pytest.mark.parametrize("fx", LOADABLE, ids=name)
def test_convert_matches_peer(fx, tmp_path, capsys):
    """``sparsedict convert`` to our format (and to SAELens where it has the architecture) keeps the peer's numbers."""
    from sparsedict.formats.saelens import saelens_architecture

    _, e, ckpt = read(fx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = from_pretrained(ckpt)
        targets = ["sparsedict"]
        try:
            saelens_architecture(model)
            targets.append("saelens")
        except FormatError:
            pass
        for to in targets:
            dst = tmp_path / to
            assert convert_main([str(ckpt), str(dst), "--to", to]) == 0, capsys.readouterr().err
            assert "verified on" in capsys.readouterr().out
            assert_matches(from_pretrained(dst), e)


# -- F2: SAELens training checkpoints with an unfolded normalisation factor ---------------------------------
INTERMEDIATE = sorted(p for p in LOADABLE if p.name.endswith("_intermediate") and p.parent.name == "saelens")


@pytest.mark.parametrize("fx", INTERMEDIATE, ids=name)
def test_saelens_intermediate_checkpoint_folds_scaling_factor(fx):
    """The trainer's view — ``unscale(decode(encode(scale(x))))`` — is what the loaded dictionary computes on raw x."""
    meta, e, ckpt = read(fx)
    assert json.loads((ckpt / "cfg.json").read_text())["normalize_activations"] == "expected_average_only_in"
    c = json.loads((ckpt / "activation_scaler.json").read_text())["scaling_factor"]
    assert c == meta["scaling_factor"] and abs(c - 1) > 0.5, (
        "the fixture's factor must be far from 1 to matter"
    )
    model = from_pretrained(ckpt)
    assert model.meta["input_scale_folded"] == pytest.approx(c)
    if (
        "batchtopk" in meta["architecture"]
    ):  # batch selection in training, threshold at inference: no such view
        return
    cfg = json.loads((ckpt / "cfg.json").read_text())
    with torch.no_grad():
        code = model.encode(e["x"])
        torch.testing.assert_close(model.decode(code, e["x"]), e["out_train"], atol=1e-4, rtol=1e-4)
        # SAELens' own fold leaves the codes unchanged, except rescaled TopK codes, which it divides by c
        f = 1 / c if cfg.get("rescale_acts_by_decoder_norm") else 1.0
        torch.testing.assert_close(code.to_dense(), e["acts_train"] * f, atol=1e-4, rtol=1e-4)


def test_saelens_unfolded_checkpoint_without_factor_is_refused(tmp_path):
    src = ROOT / "saelens" / "train_standard_intermediate" / "checkpoint"
    ckpt = shutil.copytree(src, tmp_path / "ckpt")
    (ckpt / "activation_scaler.json").unlink()
    with pytest.raises(
        FormatError, match=r"activation_scaler.json is missing, so c is unknown: write \{\"scaling_factor\""
    ):
        from_pretrained(ckpt)
    (ckpt / "activation_scaler.json").write_text(json.dumps({"scaling_factor": None}))
    with pytest.raises(FormatError, match=r"scaling_factor=None, not a positive number"):
        from_pretrained(ckpt)


# -- F7: the convert check bounds the reconstruction error ---------------------------------------------------
def test_verify_rejects_changed_reconstruction():
    """Same codes, shifted output bias: ``verify`` must refuse it (it used to return the error and pass)."""
    ckpt = (
        ROOT / "saelens" / "standard_no_b_dec_in" / "checkpoint"
    )  # b_dec is not subtracted: codes unchanged
    src, dst = from_pretrained(ckpt), from_pretrained(ckpt)
    assert verify(src, dst, 64) == 0.0
    with torch.no_grad():
        dst.b_dec.add_(1e-2)
    with pytest.raises(RuntimeError, match=r"changed the reconstruction by up to 0.01"):
        verify(src, dst, 64)


# -- our SAELens exports, loaded and run by SAELens itself --------------------------------------------------
EXPORTS = sorted(p for p in FIXTURES if p.name.startswith("export_"))
SAELENS_METADATA = {"model_name", "hook_name", "model_class_name", "model_from_pretrained_kwargs",
                    "sae_lens_version", "sae_lens_training_version"}  # fmt: skip
"""Metadata keys SAELens 6.54 writes for every SAE (see the fixtures it made); ours may add SAELens' optional
``hook_head_index``/``hf_hook_name``/``*_out``/``training_architecture`` and our own ``sparsedict_*``/``exported_by``."""


@pytest.mark.parametrize("fx", EXPORTS, ids=name)
def test_saelens_export_fixture_is_what_the_exporter_writes_now(fx, tmp_path):
    """The committed export (which SAELens loaded and ran to make ``expected.safetensors``) is byte-for-byte what
    ``save_saelens`` writes today, and the dictionary's own outputs before the export equal SAELens' outputs."""
    from helpers import export_fixture_model

    from sparsedict.formats.saelens import save_saelens

    spec = json.loads((fx / "spec.json").read_text())
    model = export_fixture_model(spec["name"], spec["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = save_saelens(model, tmp_path / "export")
    stale = "regenerate with scripts/peer_fixtures/make_all.sh saelens"
    assert json.loads((fresh / "cfg.json").read_text()) == json.loads(
        (fx / "checkpoint" / "cfg.json").read_text()
    ), stale
    new, old = (
        load_file(str(fresh / "sae_weights.safetensors")),
        load_file(str(fx / "checkpoint" / "sae_weights.safetensors")),
    )
    assert set(new) == set(old) and all(torch.equal(new[k], old[k]) for k in new), stale
    e, ours = load_file(str(fx / "expected.safetensors")), load_file(str(fx / "sparsedict.safetensors"))
    c = float(model.input_scale)
    with torch.no_grad():
        code = model.encode(ours["x"] * c)
        torch.testing.assert_close(code.to_dense(), ours["acts"])
        torch.testing.assert_close(model.decode(code, ours["x"] * c) / c, ours["out"])
    tol = 1e-5 * (1 + float(e["out"].abs().max()))
    for key in ("acts", "out", "decoded"):
        torch.testing.assert_close(e[key], ours[key], atol=tol, rtol=1e-5, msg=key)


@pytest.mark.parametrize("fx", EXPORTS, ids=name)
def test_saelens_export_cfg_has_the_keys_saelens_writes(fx):
    ours = json.loads((fx / "checkpoint" / "cfg.json").read_text())
    theirs = json.loads((ROOT / "saelens" / ours["architecture"] / "checkpoint" / "cfg.json").read_text())
    assert set(ours) == set(theirs)
    extra = set(ours["metadata"]) - SAELENS_METADATA
    assert SAELENS_METADATA <= set(ours["metadata"]) <= set(theirs["metadata"]) | extra
    assert all(k in ("hook_head_index", "hf_hook_name", "exported_by", "training_architecture") or
               k.endswith("_out") or k.startswith("sparsedict_") for k in extra), extra  # fmt: skip

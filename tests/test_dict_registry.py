"""The registry is the one list of architectures: what each class declares holds, and every registered
architecture round-trips through our format and (where it declares one) the SAELens format. A new
architecture module is picked up here without editing a list."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import make_dict

from sparsedict.dictionaries import (
    ARCHITECTURES,
    Dictionary,
    DictionaryConfig,
    available,
    from_pretrained,
    lookup,
)
from sparsedict.dictionaries.base import Registry
from sparsedict.formats import FormatError
from sparsedict.formats.saelens import save_saelens
from sparsedict.train.config import TrainConfig

ARCHS = available()
D, N = 16, 48

pytestmark = pytest.mark.usefixtures("one_thread")


def small(arch: str, **fields) -> Dictionary:
    """A small ``arch`` dictionary with random biases and positive thresholds (so eval-mode codes are sparse)."""
    _, cfg_cls = lookup(arch)
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    fields = {
        "k": 4,
        "steps": 6,
        "encode_iters": 2000,
        "encode_tol": 0.0,
        **fields,
    }  # solvers run to convergence
    if lookup(arch)[0].layered:  # a multi-layer dictionary (CLT) over blocks 1 and 2
        fields.update(layers=[1, 2], hookpoint="resid_post")
    hookpoint = fields.pop("hookpoint", "resid_post.1")
    m = make_dict(arch, D, N, hookpoint=hookpoint, **{k: v for k, v in fields.items() if k in names})
    with torch.no_grad():
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            if name == "threshold":
                t.copy_(torch.rand_like(t) * 0.3 + 0.05)
            elif name.startswith("b_") or name == "r_mag":
                t.normal_(0, 0.3)
    return m.eval()


def inputs(m: Dictionary, rows: int) -> torch.Tensor:
    """Random inputs of ``m``: ``[rows, D]``, or ``[rows, L, D]`` for a multi-layer dictionary."""
    return torch.randn(rows, len(m.cfg.layers), D) if m.layered else torch.randn(rows, D)


def test_register_checks_the_config_architecture_name():
    reg = Registry()

    @dataclasses.dataclass
    class CopiedConfig(DictionaryConfig):
        architecture: str = "relu"  # copied from relu.py and not renamed

    with pytest.raises(
        ValueError, match=r"CopiedConfig.architecture defaults to 'relu'.*registered as 'mine'"
    ):
        reg.register("mine", CopiedConfig)(type("Mine", (Dictionary,), {}))

    @dataclasses.dataclass
    class MineConfig(DictionaryConfig):
        architecture: str = "mine"

    cls = reg.register("mine", MineConfig)(type("Mine", (Dictionary,), {}))
    assert reg.lookup("mine") == (cls, MineConfig) and cls.architecture == "mine"
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("mine", MineConfig)(cls)
    assert "mine" not in ARCHITECTURES.available()  # a private registry


@pytest.mark.parametrize("arch", ARCHS)
def test_declared_capabilities_are_consistent(arch):
    cls, cfg_cls = lookup(arch)
    assert cfg_cls().architecture == arch
    assert set(cls.sparsity_fields) <= {f.name for f in dataclasses.fields(cfg_cls)}, cls.sparsity_fields
    TrainConfig(normalise_inputs=cls.input_normalisation)  # a value the trainer accepts
    assert cls.saelens_architecture in (None, "standard", "topk", "jumprelu", "gated")
    overrides_update = (
        cls.remove_parallel_grad is not Dictionary.remove_parallel_grad
        or cls.normalise_decoder is not Dictionary.normalise_decoder
    )
    assert not (overrides_update and cls.fused_decoder_update), "the fused kernel would skip the override"
    if not cls.supports_transcoder:
        with pytest.raises(ValueError):
            make_dict(arch, D, N, d_out=10, hookpoint="mlp_in.1", target="mlp_out.1")
        with pytest.raises(ValueError):
            make_dict(arch, D, N, skip=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_reproduce_every_architecture(arch, tmp_path):
    """Our format: same class and config, the input scale folded (reconstructions of raw inputs unchanged)."""
    m = small(arch)
    c = 2.5
    with torch.no_grad():
        m.input_scale.fill_(c)
    path = m.save_pretrained(tmp_path / arch, {"model": "test"})
    back = from_pretrained(path)
    assert type(back) is type(m) and back.cfg == m.cfg and back.meta["model"] == "test"
    assert set(back.state_dict()) == set(m.state_dict()) and float(back.input_scale) == 1.0
    for name, t in m.state_dict().items():  # the fold changes only the activation-unit tensors
        if name.split(".")[0] not in ("W_enc", "W_dec", "b_dec", "input_scale", "target_variance"):
            torch.testing.assert_close(back.state_dict()[name], t, msg=name)
    x = inputs(m, 40)
    with torch.no_grad():
        code, code_back = m.encode(x * c), back.encode(x)
        ref, got = m.decode(code, x * c) / c, back.decode(code_back, x)
    if m.trains_by_gradient:  # a solver's codes (SNMF's NNLS) are unique only up to its tolerance
        assert torch.equal(code.to_dense() != 0, code_back.to_dense() != 0)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_export_round_trips_or_refuses(arch, tmp_path):
    m = small(arch)
    if type(m).saelens_architecture is None:
        with pytest.raises(FormatError, match="no SAELens equivalent"):
            save_saelens(m, tmp_path / arch)
        return
    back = from_pretrained(save_saelens(m, tmp_path / arch))
    x = inputs(m, 40)
    with torch.no_grad():
        code, code_back = m.encode(x), back.encode(x)
        torch.testing.assert_close(back.decode(code_back, x), m.decode(code, x), rtol=1e-4, atol=1e-4)
    assert torch.equal(code.to_dense() != 0, code_back.to_dense() != 0)

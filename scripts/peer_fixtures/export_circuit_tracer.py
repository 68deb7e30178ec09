"""sparsedict's side of the circuit-tracer round trip: seeded transcoder sets and CLTs, exported for circuit-tracer.

Run with sparsedict's own venv (``make_all.sh circuit_tracer`` does it before ``gen_circuit_tracer.py``). Each
``tests/data/peers/circuit_tracer/sd_<name>/`` gets

- ``sparsedict/``: the model in sparsedict's own format (seeded random parameters, an input scale ≠ 1 and, for
  BatchTopK, inference thresholds set), what the test loads and exports again;
- ``checkpoint/``: ``save_circuit_tracer`` of it, which ``gen_circuit_tracer.py`` then loads with circuit-tracer's
  own loaders to write ``expected.safetensors`` (its outputs on ``x.safetensors``) and ``fixture.json``;
- ``x.safetensors``: the fixed inputs ``x [n_layers, B, d_model]``.
"""

from __future__ import annotations

import shutil

import torch
from common import BATCH, ROOT
from safetensors.torch import save_file

from sparsedict.dictionaries import CLTConfig, TranscoderSet, build, from_pretrained, lookup
from sparsedict.formats.circuit_tracer import save_circuit_tracer

L, D, F_ = 3, 16, 32


def fill(model: torch.nn.Module, seed: int) -> None:
    """Seeded Gaussian parameters (encoder ~ 1/√d, biases and decoders of order one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            scale = D**-0.5 if "W_enc" in name else 0.1 if "W_skip" in name else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * scale)
            if "threshold" in name:
                p.abs_().add_(0.05)


def x_inputs(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, BATCH, D, generator=g) * 2.0 + torch.randn(L, 1, D, generator=g) * 0.5


def transcoder_set(arch: str, seed: int, skip: bool, scale: float) -> TranscoderSet:
    _, cfg_cls = lookup(arch)
    cfg = cfg_cls(layers=list(range(L)), hookpoint="mlp_in", target="mlp_out", n_latents=F_, skip=skip)
    tset = TranscoderSet(cfg.resolved(D, D))
    for i, (_, m) in enumerate(tset.items()):
        fill(m, seed + i)
        m.input_scale.fill_(scale)
        if arch == "batchtopk":
            m.threshold.fill_(0.1 + 0.05 * i)
    return tset.eval()


def clt(activation: str, seed: int, scale: float):
    m = build(CLTConfig(layers=list(range(L)), activation=activation, n_latents=F_).resolved(D, D))
    fill(m, seed)
    m.input_scale.fill_(scale)
    if activation == "batchtopk":
        m.threshold.copy_(torch.tensor([0.1, 0.2, 0.15]))
    return m.eval()


def export(name: str, model, seed: int) -> None:
    path = ROOT / "circuit_tracer" / name
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path / "sparsedict", {"model": "HuggingFaceTB/SmolLM2-135M"}, model_card=False)
    save_circuit_tracer(from_pretrained(path / "sparsedict"), path / "checkpoint")  # as the test does
    save_file({"x": x_inputs(seed)}, str(path / "x.safetensors"))
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> None:
    export("sd_plt_batchtopk", transcoder_set("batchtopk", 80, skip=False, scale=1.7), 81)
    export("sd_plt_jumprelu_skip", transcoder_set("jumprelu", 82, skip=True, scale=0.6), 83)
    export("sd_clt_batchtopk", clt("batchtopk", 84, scale=2.0), 85)
    export("sd_clt_jumprelu", clt("jumprelu", 86, scale=1.0), 87)


if __name__ == "__main__":
    main()

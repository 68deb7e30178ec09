"""dictionary_learning fixtures: every dictionary class of 0.1.0, written by the library itself (run in its venv).

For each class two checkpoints:

- ``<class>_trained``: ``trainSAE`` (the library's training loop) with the class's trainer, a few dozen steps on
  synthetic activations, ``normalize_activations=True`` (so the saved biases and thresholds carry the norm
  factor, as the library saves them; ``AutoEncoderNew`` has no ``scale_biases``, so it trains without),
  ``save_dir`` -> ``trainer_0/{ae.pt, config.json}``;
- ``<class>_random``: the class built directly, its parameters overwritten with seeded random values whose
  decoder directions are *not* unit norm (what the trainers keep them at), ``torch.save(ae.state_dict())``
  plus the ``config.json`` ``trainSAE`` writes for that trainer.

Outputs come from the class's own ``from_pretrained(<dir>/ae.pt)`` (the library's loading path, with its
defaults; ``AutoEncoder.from_pretrained`` normalises the decoder and folds the norms into the encoder):
``acts`` = ``encode(x)``, ``decoded`` = ``decode(acts)``, ``out`` = ``forward(x)``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from common import fresh_dir, inputs, randomise, write
from dictionary_learning.dictionary import AutoEncoder, AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
from dictionary_learning.trainers.gdm import GatedSAETrainer
from dictionary_learning.trainers.jumprelu import JumpReluTrainer
from dictionary_learning.trainers.matryoshka_batch_top_k import (
    MatryoshkaBatchTopKSAE,
    MatryoshkaBatchTopKTrainer,
)
from dictionary_learning.trainers.standard import StandardTrainer, StandardTrainerAprilUpdate
from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
from dictionary_learning.training import trainSAE

D, N, K, STEPS = 16, 48, 6, 40
LIB = "dictionary_learning"
COMMON = {
    "activation_dim": D,
    "dict_size": N,
    "layer": 3,
    "lm_name": "EleutherAI/pythia-70m-deduped",
    "submodule_name": "resid_post_layer_3",
    "device": "cpu",
    "steps": STEPS,
    "warmup_steps": 5,
}
BATCHTOPK = {"k": K, "threshold_start_step": 5}
CLASSES = {
    "AutoEncoder": (StandardTrainer, AutoEncoder, {"sparsity_warmup_steps": 5, "l1_penalty": 0.05}),
    "AutoEncoderNew": (
        StandardTrainerAprilUpdate,
        AutoEncoderNew,
        {"sparsity_warmup_steps": 5, "dict_class": AutoEncoderNew},
    ),
    "AutoEncoderTopK": (TopKTrainer, AutoEncoderTopK, {"k": K}),
    "BatchTopKSAE": (BatchTopKTrainer, BatchTopKSAE, BATCHTOPK),
    "MatryoshkaBatchTopKSAE": (
        MatryoshkaBatchTopKTrainer,
        MatryoshkaBatchTopKSAE,
        {**BATCHTOPK, "group_fractions": [1 / 6, 1 / 3, 1 / 2]},
    ),
    "JumpReluAutoEncoder": (
        JumpReluTrainer,
        JumpReluAutoEncoder,
        {"sparsity_warmup_steps": 5, "target_l0": 6.0},
    ),
    "GatedAutoEncoder": (GatedSAETrainer, GatedAutoEncoder, {"sparsity_warmup_steps": 5}),
}
FROM_PRETRAINED = {  # the library's loader of each class
    "AutoEncoder": lambda p: AutoEncoder.from_pretrained(p),
    "AutoEncoderNew": lambda p: AutoEncoderNew.from_pretrained(p),
    "AutoEncoderTopK": lambda p: AutoEncoderTopK.from_pretrained(p),
    "BatchTopKSAE": lambda p: BatchTopKSAE.from_pretrained(p),
    "MatryoshkaBatchTopKSAE": lambda p: MatryoshkaBatchTopKSAE.from_pretrained(p),
    "JumpReluAutoEncoder": lambda p: JumpReluAutoEncoder.from_pretrained(p),
    "GatedAutoEncoder": lambda p: GatedAutoEncoder.from_pretrained(p),
}


def provider(seed: int, batch: int = 64):
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(D, generator=g) * 2.0
    while True:
        yield torch.randn(batch, D, generator=g) * 3.0 + offset


def outputs(cls: str, ckpt: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    ae = FROM_PRETRAINED[cls](str(ckpt / "ae.pt"))
    with torch.no_grad():
        acts = ae.encode(x)
        return {"x": x, "acts": acts, "decoded": ae.decode(acts), "out": ae(x)}


def finish(path: Path, cls: str, trainer_cls: type, how: str, x: torch.Tensor) -> None:
    meta = {
        "class": cls,
        "trainer": trainer_cls.__name__,
        "how": how,
        "made_by": "scripts/peer_fixtures/gen_dictionary_learning.py",
    }
    write(path, "dictionary-learning", meta, outputs(cls, path / "checkpoint", x))


def trained(cls: str, seed: int) -> None:
    trainer_cls, dict_cls, extra = CLASSES[cls]
    torch.manual_seed(seed)
    cfg = {"trainer": trainer_cls, **COMMON, **extra, "seed": seed}
    normalize = hasattr(dict_cls, "scale_biases")  # trainSAE needs it to fold the norm factor at save
    with tempfile.TemporaryDirectory() as tmp:
        trainSAE(
            provider(seed), [cfg], steps=STEPS, save_dir=tmp, normalize_activations=normalize, device="cpu"
        )
        path = fresh_dir(LIB, f"{cls}_trained")
        (path / "checkpoint").mkdir()
        for name in ("ae.pt", "config.json"):
            (path / "checkpoint" / name).write_bytes((Path(tmp) / "trainer_0" / name).read_bytes())
    x = next(provider(seed + 100, 32))
    how = (
        f"trainSAE({trainer_cls.__name__}, {STEPS} steps of 64 synthetic activations, "
        f"normalize_activations={normalize} (True unless the class lacks scale_biases), "
        "device='cpu'); outputs of the class's from_pretrained(ae.pt)"
    )
    finish(path, cls, trainer_cls, how, x)


def random(cls: str, seed: int) -> None:
    trainer_cls, _, extra = CLASSES[cls]
    torch.manual_seed(seed)
    trainer = trainer_cls(**COMMON, **extra, seed=seed)
    ae = trainer.ae
    params = dict(ae.named_parameters()) | dict(ae.named_buffers())
    dec = "W_dec" if "W_dec" in params else "decoder.weight"
    scales = {dec: 0.5}
    for name, scale in (
        ("W_enc", D**-0.5),
        ("encoder.weight", D**-0.5),
        ("b_enc", 0.3),
        ("encoder.bias", 0.3),
        ("b_dec", 0.5),
        ("bias", 0.5),
        ("decoder.bias", 0.5),
        ("decoder_bias", 0.5),
        ("gate_bias", 0.3),
        ("mag_bias", 0.3),
        ("r_mag", 0.2),
    ):
        if name in params:
            scales[name] = scale
    randomise(ae, seed, scales, {k: -0.1 for k in ("b_enc", "encoder.bias", "gate_bias", "mag_bias")})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        s = 0.5 + torch.rand(N, generator=g)  # per-latent decoder norms in [0.5, 1.5)
        if dec == "W_dec":
            params[dec].mul_(s[:, None] / params[dec].norm(dim=1, keepdim=True))
        else:
            params[dec].mul_(s[None, :] / params[dec].norm(dim=0, keepdim=True))
        if "threshold" in params:
            th = params["threshold"]
            th.copy_(0.1 + 0.3 * torch.rand(th.shape, generator=g) if th.ndim else torch.tensor(0.3))
    path = fresh_dir(LIB, f"{cls}_random")
    (path / "checkpoint").mkdir()
    torch.save({k: v.detach().cpu() for k, v in ae.state_dict().items()}, path / "checkpoint" / "ae.pt")
    config = {"trainer": trainer.config}
    (path / "checkpoint" / "config.json").write_text(json.dumps(config, indent=4))
    x = inputs(D, seed + 2, scale=2.0, offset=0.5)
    how = (
        f"{cls} from {trainer_cls.__name__}(...).ae, seeded random parameters with decoder norms in [0.5, 1.5), "
        "torch.save(state_dict) + the config.json trainSAE writes; outputs of the class's from_pretrained(ae.pt)"
    )
    finish(path, cls, trainer_cls, how, x)


def main() -> None:
    for i, cls in enumerate(CLASSES):
        trained(cls, 50 + i)
        random(cls, 60 + i)


if __name__ == "__main__":
    main()

"""SAELens fixtures: every saved architecture, written and run by SAELens itself (run in its venv).

Two kinds of checkpoint:

- inference classes (``StandardSAE``, ``TopKSAE``, ``JumpReLUSAE``, ``GatedSAE``, the transcoders, ...):
  built from their config, parameters overwritten with seeded random values (non-unit decoder rows,
  non-zero biases, positive thresholds), saved with ``SAE.save_model``; outputs from the checkpoint
  reloaded with ``SAE.load_from_disk``;
- training runs: ``SAETrainer`` on synthetic activations with ``normalize_activations=
  "expected_average_only_in"`` and one intermediate checkpoint. The intermediate directory (unfolded
  weights + ``activation_scaler.json``) and the final one (factor folded by SAELens) are both kept, plus
  the inference export (``save_inference_model``) of the final SAE.

Outputs: ``acts`` = ``encode(x)``, ``out`` = ``forward(x)`` (with the skip connection of skip transcoders),
``decoded`` = ``decode(acts)``. For a training checkpoint they are those of the inference SAE that
SAELens itself makes from it (scaling factor folded with ``fold_activation_norm_scaling_factor``, then
``save_inference_model`` and ``SAE.load_from_disk``), and ``acts_train``/``out_train`` are the trainer's own
view (``encode(scaler.scale(x))``, ``scaler.unscale(decode(·))``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import sae_lens
import torch
from common import fresh_dir, inputs, randomise, write
from sae_lens import SAE, TrainingSAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes import (
    AbsTopKSAEConfig,
    BatchTopKTrainingSAEConfig,
    GatedSAEConfig,
    JumpReLUSAEConfig,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTrainingSAEConfig,
    JumpReLUTranscoderConfig,
    MatchingPursuitSAEConfig,
    MatryoshkaBatchTopKTrainingSAEConfig,
    SkipTranscoderConfig,
    StandardSAEConfig,
    StandardTrainingSAEConfig,
    TopKSAEConfig,
    TopKTrainingSAEConfig,
    TranscoderConfig,
)
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.sae_trainer import SAETrainer

D, N, D_OUT = 16, 48, 12
LIB = "saelens"
RESID = {
    "model_name": "gpt2",
    "hook_name": "blocks.3.hook_resid_post",
    "model_class_name": "HookedTransformer",
    "model_from_pretrained_kwargs": {"center_writing_weights": False},
}
MLP = {
    "model_name": "gpt2",
    "hook_name": "blocks.2.ln2.hook_normalized",
    "hook_name_out": "blocks.2.hook_mlp_out",
    "model_class_name": "HookedTransformer",
    "model_from_pretrained_kwargs": {"center_writing_weights": False},
}


def set_meta(cfg, meta: dict) -> None:
    for key, value in meta.items():
        cfg.metadata[key] = value


def outputs(sae, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        acts = sae.encode(x)
        return {"x": x, "acts": acts, "out": sae(x), "decoded": sae.decode(acts)}


def inference_fixture(name: str, cfg, seed: int, how: str, x_scale: float = 2.0) -> None:
    """Random parameters in an inference class, ``save_model``, reload with ``SAE.load_from_disk``, run."""
    sae = SAE.from_dict(cfg.to_dict())
    d_out = getattr(cfg, "d_out", cfg.d_in)
    scales = {"W_dec": 0.5, "b_dec": 0.5}
    shifts = {}
    params = dict(sae.named_parameters())
    if "W_enc" in params:
        scales["W_enc"] = 1.0 / D**0.5
    for bias in ("b_enc", "b_gate", "b_mag"):
        if bias in params:
            scales[bias], shifts[bias] = 0.3, -0.2
    if "r_mag" in params:
        scales["r_mag"] = 0.2
    if "threshold" in params:
        scales["threshold"], shifts["threshold"] = 0.1, 0.25
    if "W_skip" in params:
        scales["W_skip"] = 0.1
    randomise(sae, seed, scales, shifts)
    with torch.no_grad():  # decoder rows of different norms (0.5–1.5 × the Gaussian draw)
        g = torch.Generator().manual_seed(seed + 1)
        sae.W_dec.mul_(0.5 + torch.rand(sae.W_dec.shape[0], 1, generator=g))
        if "threshold" in params:
            sae.threshold.abs_()
    path = fresh_dir(LIB, name)
    sae.save_model(path / "checkpoint")
    back = SAE.load_from_disk(path / "checkpoint", device="cpu")
    x = inputs(cfg.d_in, seed + 2, scale=x_scale, offset=0.5)
    out = outputs(back, x)
    assert out["out"].shape[-1] == d_out
    write(
        path,
        "sae-lens",
        {
            "class": type(back).__name__,
            "architecture": cfg.architecture(),
            "how": how,
            "made_by": "scripts/peer_fixtures/gen_saelens.py",
        },
        out,
    )


def provider(d: int, seed: int, batch: int):
    """Synthetic activations with a mean norm far from √d (so the scaling factor is far from 1)."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(d, generator=g) * 3.0
    while True:
        yield torch.randn(batch, d, generator=g) * 5.0 + offset


def inference_view(sae) -> SAE:
    """The inference SAE SAELens makes from a (folded) training SAE: save_inference_model + load_from_disk."""
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp, device="cpu")


def training_fixtures(stem: str, cfg, seed: int) -> None:
    """Train a few steps with an estimated scaling factor; keep the intermediate and final checkpoints."""
    torch.manual_seed(seed)
    set_meta(cfg, RESID)
    sae = TrainingSAE.from_dict(cfg.to_dict())
    batch, steps = 64, 12
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = SAETrainerConfig(
            total_training_samples=batch * steps,
            train_batch_size_samples=batch,
            lr=3e-3,
            lr_end=3e-3,
            n_checkpoints=1,
            checkpoint_path=tmp,
            save_final_checkpoint=True,
            n_batches_for_norm_estimate=8,
            feature_sampling_window=4,
            dead_feature_window=4,
        )
        trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=provider(cfg.d_in, seed, batch))
        final = trainer.fit()
        ckpts = sorted(p for p in Path(tmp).iterdir() if p.is_dir())
        mid = next(p for p in ckpts if not p.name.startswith("final"))
        last = next(p for p in ckpts if p.name.startswith("final"))
        x = next(provider(cfg.d_in, seed + 100, 32))
        how = (
            f"SAETrainer, {steps} steps of {batch} synthetic activations (norm ~25), n_checkpoints=1, "
            "save_final_checkpoint=True; trainer_state.pt (optimizer pickle, never read) removed"
        )
        # intermediate: unfolded weights + activation_scaler.json
        path = fresh_dir(LIB, f"{stem}_intermediate")
        for f in mid.iterdir():
            if f.name != "trainer_state.pt":
                (path / "checkpoint").mkdir(exist_ok=True)
                (path / "checkpoint" / f.name).write_bytes(f.read_bytes())
        train_sae = TrainingSAE.load_from_disk(mid, device="cpu")
        scaler = ActivationScaler()
        scaler.load(mid / "activation_scaler.json")
        assert scaler.scaling_factor is not None or scaler.whitening is not None
        with torch.no_grad():
            acts_train = train_sae.encode(scaler.scale(x))
            out_train = scaler.unscale(train_sae.decode(acts_train))
        if scaler.scaling_factor is not None:  # the folds SAETrainer.fit applies at the end of training
            train_sae.fold_activation_norm_scaling_factor(scaler.scaling_factor)
        if scaler.whitening is not None:
            w = scaler.whitening
            train_sae.fold_activation_whitening(
                mean=w.mean, whitening_matrix=w.matrix, unwhitening_matrix=w.inverse_matrix
            )
        out = outputs(inference_view(train_sae), x)
        if "batchtopk" not in cfg.architecture():  # batch selection in training, threshold at inference
            torch.testing.assert_close(out["out"], out_train, atol=1e-4, rtol=1e-4)
        write(
            path,
            "sae-lens",
            {
                "class": type(train_sae).__name__,
                "architecture": cfg.architecture(),
                "scaling_factor": scaler.scaling_factor,
                "whitening": scaler.whitening is not None,
                "made_by": "scripts/peer_fixtures/gen_saelens.py",
                "how": how + f"; this is the intermediate checkpoint {mid.name}",
            },
            {**out, "acts_train": acts_train, "out_train": out_train},
        )
        # final: folded by SAELens, training-format config (as the trainer saves it)
        path = fresh_dir(LIB, f"{stem}_final")
        (path / "checkpoint").mkdir()
        for f in last.iterdir():
            if f.name != "trainer_state.pt":
                (path / "checkpoint" / f.name).write_bytes(f.read_bytes())
        back = TrainingSAE.load_from_disk(last, device="cpu")
        write(
            path,
            "sae-lens",
            {
                "class": type(back).__name__,
                "architecture": cfg.architecture(),
                "made_by": "scripts/peer_fixtures/gen_saelens.py",
                "how": how + f"; this is the final checkpoint {last.name} (factor folded)",
            },
            outputs(inference_view(back), x),
        )
        # the inference export of the final SAE (what LanguageModelSAETrainingRunner writes at the end)
        path = fresh_dir(LIB, f"{stem}_inference")
        final.save_inference_model(path / "checkpoint")
        back = SAE.load_from_disk(path / "checkpoint", device="cpu")
        write(
            path,
            "sae-lens",
            {
                "class": type(back).__name__,
                "architecture": back.cfg.architecture(),
                "training_architecture": cfg.architecture(),
                "made_by": "scripts/peer_fixtures/gen_saelens.py",
                "how": how + "; final SAE written with save_inference_model",
            },
            outputs(back, x),
        )


def main() -> None:
    print(f"sae_lens {sae_lens.__version__}, torch {torch.__version__}")
    plain = "inference class, seeded random parameters, save_model; outputs after SAE.load_from_disk"
    inference_fixture("standard", StandardSAEConfig(d_in=D, d_sae=N, metadata=_m(RESID)), 10, plain)
    inference_fixture(
        "standard_no_b_dec_in",
        StandardSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=False, metadata=_m(RESID)),
        11,
        plain,
    )
    inference_fixture("topk", TopKSAEConfig(d_in=D, d_sae=N, k=6, metadata=_m(RESID)), 12, plain)
    inference_fixture(
        "topk_rescale",
        TopKSAEConfig(d_in=D, d_sae=N, k=6, rescale_acts_by_decoder_norm=True, metadata=_m(RESID)),
        13,
        plain,
    )
    inference_fixture(
        "jumprelu",
        JumpReLUSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=False, metadata=_m(RESID)),
        14,
        plain,
    )
    inference_fixture("gated", GatedSAEConfig(d_in=D, d_sae=N, metadata=_m(RESID)), 15, plain)
    inference_fixture(
        "transcoder",
        TranscoderConfig(d_in=D, d_sae=N, d_out=D_OUT, apply_b_dec_to_input=False, metadata=_m(MLP)),
        16,
        plain,
    )
    inference_fixture(
        "skip_transcoder",
        SkipTranscoderConfig(d_in=D, d_sae=N, d_out=D_OUT, apply_b_dec_to_input=False, metadata=_m(MLP)),
        17,
        plain,
    )
    inference_fixture(
        "jumprelu_transcoder",
        JumpReLUTranscoderConfig(d_in=D, d_sae=N, d_out=D_OUT, apply_b_dec_to_input=False, metadata=_m(MLP)),
        18,
        plain,
    )
    inference_fixture(
        "jumprelu_skip_transcoder",
        JumpReLUSkipTranscoderConfig(
            d_in=D, d_sae=N, d_out=D_OUT, apply_b_dec_to_input=False, metadata=_m(MLP)
        ),
        19,
        plain,
    )
    inference_fixture("abstopk", AbsTopKSAEConfig(d_in=D, d_sae=N, k=6, metadata=_m(RESID)), 20, plain)
    inference_fixture(
        "matching_pursuit", MatchingPursuitSAEConfig(d_in=D, d_sae=N, metadata=_m(RESID)), 21, plain
    )
    processed = dict(RESID, model_from_pretrained_kwargs={"fold_ln": True, "center_writing_weights": True})
    inference_fixture(
        "standard_tl_processed",
        StandardSAEConfig(d_in=D, d_sae=N, metadata=_m(processed)),
        22,
        plain + "; metadata.model_from_pretrained_kwargs asks for fold_ln and center_writing_weights",
    )
    scaled = {"normalize_activations": "expected_average_only_in"}
    training_fixtures(
        "train_standard", StandardTrainingSAEConfig(d_in=D, d_sae=N, l1_coefficient=1.0, **scaled), 30
    )
    training_fixtures("train_topk", TopKTrainingSAEConfig(d_in=D, d_sae=N, k=6, **scaled), 31)
    training_fixtures("train_jumprelu", JumpReLUTrainingSAEConfig(d_in=D, d_sae=N, **scaled), 34)
    training_fixtures(
        "train_standard_whitened",
        StandardTrainingSAEConfig(d_in=D, d_sae=N, normalize_activations="covariance_whitening"),
        35,
    )
    training_fixtures("train_batchtopk", BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=6.0, **scaled), 32)
    training_fixtures(
        "train_matryoshka_batchtopk",
        MatryoshkaBatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=6.0, matryoshka_widths=[8, 24, N], **scaled),
        33,
    )


def _m(meta: dict):
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(**meta)


if __name__ == "__main__":
    main()

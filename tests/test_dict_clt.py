"""Cross-layer transcoders: the forward pass and every loss term against a plain per-(source, target) loop, the
BatchTopK -> JumpReLU conversion, save/load, the unit-norm decoder update, and a planted multi-layer generator in
which one feature writes to several later layers: the CLT recovers each such feature once, while a transcoder set
needs one feature per layer it writes to (and falls behind at the CLT's L0 per layer)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import train_dictionary

from sparsedict.dictionaries import CLT, CLTConfig, TranscoderSet, build, from_pretrained
from sparsedict.dictionaries.jumprelu import JumpReLUFn
from sparsedict.dictionaries.topk import TopKConfig
from sparsedict.dictionaries.transcoder_set import member_config
from sparsedict.train import TensorSource, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
L, D, DO, F = 3, 12, 10, 20


def make(activation: str, skip: bool = False, k: int = 3, **fields) -> CLT:
    torch.manual_seed(0)
    cfg = CLTConfig(layers=[4, 5, 6], activation=activation, k=k, n_latents=F, skip=skip, **fields)
    m = build(cfg.resolved(D, DO))
    with torch.no_grad():  # non-trivial biases, skip and thresholds
        m.b_enc.normal_(0, 0.3)
        m.b_dec.normal_(0, 0.5)
        if skip:
            m.W_skip.normal_(0, 0.1)
        if activation == "jumprelu":
            m.threshold.copy_(torch.rand(L, F) * 0.4)
        m.target_variance.copy_(torch.tensor([0.5, 2.0, 4.0]))
    return m


def reference(m: CLT, x, y, training: bool):
    """The CLT of the module docstring written out per layer pair, dense, from the parameters."""
    z = [x[:, i] @ m.W_enc[i] + m.b_enc[i] for i in range(L)]
    f = []
    for i in range(L):
        a = z[i]
        if m.cfg.activation == "topk":
            r = a.relu()
            keep = torch.zeros_like(r).scatter(1, r.topk(m.cfg.k, dim=1).indices, 1.0)
            f.append(r * keep)
        elif m.cfg.activation == "batchtopk" and training:
            r = a.relu().flatten()
            keep = torch.zeros_like(r).scatter(0, r.topk(m.cfg.k * x.shape[0]).indices, 1.0)
            f.append((r * keep).view(x.shape[0], F))
        elif m.cfg.activation == "batchtopk":
            f.append(a.relu() * (a.relu() > m.threshold[i]))
        elif m.cfg.activation == "jumprelu":  # with the straight-through estimator's gradient to θ
            f.append(JumpReLUFn.apply(a, m.threshold[i], m.cfg.bandwidth))
        else:
            f.append(a.relu())
    y_hat = []
    for j in range(L):
        out = m.b_dec[j].clone()
        for i in range(j + 1):
            out = out + f[i] @ m.W_dec[i][:, j - i, :]
        if m.W_skip is not None:
            out = out + x[:, j] @ m.W_skip[j].T
        y_hat.append(out)
    y_hat = torch.stack(y_hat, 1)
    mse = sum(((y[:, j] - y_hat[:, j]) ** 2).sum(1).mean() / m.target_variance[j] for j in range(L))
    norms = [m.W_dec[i].reshape(F, -1).norm(dim=1) for i in range(L)]
    tanh = sum(torch.tanh(m.cfg.tanh_scale * f[i] * norms[i]).sum(1).mean() for i in range(L))
    pre = None
    if m.cfg.activation == "jumprelu":
        pre = sum(((m.threshold[i] - z[i]).relu() * norms[i]).sum(1).mean() for i in range(L))
    return y_hat, torch.cat(f, 1), mse, tanh, pre


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu", "relu"])
def test_forward_and_losses_match_a_plain_loop(activation, skip):
    m = make(activation, skip)
    assert m.n_latents == L * F and m.n_decoders == 6 and m.W_dec[1].shape == (F, 2, DO)
    x, y = torch.randn(48, L, D), torch.randn(48, L, DO)
    m.train()
    out = m(x, y)
    y_hat, f, mse, tanh, pre = reference(m, x, y, training=True)
    torch.testing.assert_close(out.x_hat, y_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.code.to_dense(), f, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.losses["mse"], mse, atol=1e-5, rtol=1e-5)
    if activation in ("jumprelu", "relu"):
        torch.testing.assert_close(out.losses["sparsity"], m.sparsity_current * tanh, atol=1e-6, rtol=1e-5)
    if activation == "jumprelu":
        torch.testing.assert_close(out.losses["preact"], m.cfg.preact_coefficient * pre, atol=1e-9, rtol=1e-5)
    # every gradient equals the plain loop's (the selection is piecewise constant; θ: the estimator's)
    sum(out.losses.values()).backward()
    got = {name: p.grad.clone() for name, p in m.named_parameters()}
    m.zero_grad()
    y_hat, f, mse, tanh, pre = reference(m, x, y, training=True)
    ref_loss = mse + (m.sparsity_current * tanh if activation in ("jumprelu", "relu") else 0)
    ref_loss = ref_loss + (m.cfg.preact_coefficient * pre if pre is not None else 0)
    ref_loss.backward()
    for name, p in m.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    if activation == "jumprelu":
        assert float(m.threshold.grad.abs().sum()) > 0
    # eval mode: batchtopk thresholds per layer (set here), the others unchanged
    if activation == "batchtopk":
        with torch.no_grad():
            m.threshold.copy_(torch.tensor([0.2, 0.4, 0.1]))
    m.eval()
    with torch.no_grad():
        y_hat, f, *_ = reference(m, x, y, training=False)
        torch.testing.assert_close(m.decode(m.encode(x), x), y_hat, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.encode(x).to_dense(), f, atol=1e-6, rtol=1e-6)
        # layer by layer (the replacement model's path) gives the same outputs
        codes = [m.encode_layer(i, x[:, i]) for i in range(L)]
        per_layer = torch.stack([m.decode_layer(j, codes, x[:, j]) for j in range(L)], 1)
        torch.testing.assert_close(per_layer, y_hat, atol=1e-5, rtol=1e-5)
        # with one cache for the forward (as the replacement model passes it), each layer's code is decoded once
        calls, decode = [], m._contribution
        m._contribution = lambda code, i: calls.append(i) or decode(code, i)
        cache: dict = {}
        shared = torch.stack([m.decode_layer(j, codes, x[:, j], cache) for j in range(L)], 1)
        del m._contribution
        assert calls == list(range(L)) and torch.equal(shared, per_layer)


def test_shapes_and_layers_are_checked():
    m = make("topk")
    with pytest.raises(ValueError, match=r"\[batch, 3 layers, 12\]"):
        m(torch.randn(4, 2, D))
    with pytest.raises(ValueError, match="contiguous"):
        build(CLTConfig(layers=[1, 3], n_latents=8).resolved(D))
    with pytest.raises(ValueError, match="activation must be one of"):
        CLTConfig(activation="gelu")
    assert m.cfg.hookpoints == ["mlp_in.4", "mlp_in.5", "mlp_in.6"]
    assert m.cfg.source_key == (("mlp_in.4", "mlp_in.5", "mlp_in.6"), ("mlp_out.4", "mlp_out.5", "mlp_out.6"))
    t = CLTConfig(layers=[0, 1], hookpoint="model.layers.{layer}.mlp:in", target="model.layers.{layer}.mlp")
    assert t.targets == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_batchtopk_converts_to_the_equal_jumprelu():
    m = make("batchtopk")
    with torch.no_grad():
        m.threshold.copy_(torch.tensor([0.2, 0.4, 0.1]))
    j = m.to_jumprelu().eval()
    assert j.cfg.activation == "jumprelu" and j.threshold.shape == (L, F)
    x = torch.randn(64, L, D)
    with torch.no_grad():
        torch.testing.assert_close(j.decode(j.encode(x)), m.eval().decode(m.encode(x)))
    with pytest.raises(ValueError, match="no threshold"):
        make("topk").to_jumprelu()
    with pytest.raises(ValueError, match="θ unset"):
        make("batchtopk").to_jumprelu()


def test_batchtopk_thresholds_are_estimated_per_layer():
    m = make("batchtopk", threshold_start_step=0)
    x, y = torch.randn(64, L, D), torch.randn(64, L, DO)
    m.train()
    m.on_step(0, 10)
    out = m(x, y)
    m.after_step(out)
    dense = out.code.to_dense().view(64, L, F)
    want = torch.stack([dense[:, i][dense[:, i] > 0].min() for i in range(L)])
    torch.testing.assert_close(m.threshold, want)  # first batch: θ = its smallest kept value, per layer


def test_unit_norm_decoder_update_keeps_concatenated_rows_at_norm_one():
    m = make("topk")
    for w in m.W_dec:
        w.grad = torch.randn_like(w)
    m.remove_parallel_grad()
    for w in m.W_dec:  # the gradient has no component along each feature's (concatenated) row
        assert float((w.grad * w.detach()).sum((1, 2)).abs().max()) < 1e-5
        w.data.add_(torch.randn_like(w))
    m.normalise_decoder()
    torch.testing.assert_close(m.decoder_norms(), torch.ones(L, F))
    assert make("jumprelu").unit_norm_decoder is False


@pytest.mark.parametrize("activation", ["batchtopk", "jumprelu"])
def test_save_and_load_fold_the_input_scale(activation, tmp_path):
    m = make(activation, skip=True).eval()
    if activation == "batchtopk":
        with torch.no_grad():
            m.threshold.copy_(torch.tensor([0.2, 0.4, 0.1]))
    c = 2.5
    m.input_scale.fill_(c)
    back = from_pretrained(m.save_pretrained(tmp_path / "clt", {"model": "test"}))
    assert type(back) is CLT and back.cfg == m.cfg and float(back.input_scale) == 1.0
    x = torch.randn(30, L, D)
    with torch.no_grad():
        torch.testing.assert_close(back.decode(back.encode(x), x), m.decode(m.encode(x * c), x * c) / c)


# -- planted: features that write to several later layers ---------------------------------------------------
N_PLANT, K_PLANT, DP = 8, 2, 32  # planted features per source layer, active per source layer and row; width


def planted_layers(n_rows: int, seed: int = 5, d: int = DP):
    """Rows ``x [N, L, d]``, ``y [N, L, d]`` and the planted output atoms ``out[s] [N_PLANT, L − s, d]``.

    Each feature f of source layer s has an input direction in every layer j ≥ s (the residual stream carries
    it on) and an output direction in every layer j ≥ s; K_PLANT of each layer's features are active per row
    (coefficients U(0.5, 2.5)): ``x_j = Σ_{s ≤ j} Σ_f c_f u_f^j``, ``y_j = Σ_{s ≤ j} Σ_f c_f v_f^j`` (+ noise).
    """
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    inp = [unit(N_PLANT, L - s, d) for s in range(L)]
    out = [unit(N_PLANT, L - s, d) for s in range(L)]
    x, y = torch.zeros(n_rows, L, d), torch.zeros(n_rows, L, d)
    for s in range(L):
        idx = torch.rand(n_rows, N_PLANT, generator=g).argsort(1)[:, :K_PLANT]
        c = torch.rand(n_rows, K_PLANT, generator=g) * 2 + 0.5
        x[:, s:] += torch.einsum("nk,nkld->nld", c, inp[s][idx])
        y[:, s:] += torch.einsum("nk,nkld->nld", c, out[s][idx])
    x += 0.02 * torch.randn(x.shape, generator=g)
    y += 0.02 * torch.randn(y.shape, generator=g)
    return x, y, out


def best_cos(learned, true) -> torch.Tensor:
    """For each row of ``true [m, p]``, the best cosine over the rows of ``learned [n, p]``."""
    a = torch.nn.functional.normalize(learned.detach().reshape(learned.shape[0], -1), dim=1)
    b = torch.nn.functional.normalize(true.reshape(true.shape[0], -1), dim=1)
    return (a @ b.T).max(0).values


def test_planted_cross_layer_features_are_recovered_once_by_the_clt(tmp_path):
    """One pass of the Trainer over one stacked source trains three models on the same rows:

    - a CLT with the planted sparsity (K_PLANT per layer) recovers every planted feature as one feature of its
      source layer whose decoder spans all the layers it writes to (best cosine on the concatenated rows);
    - a PLT set at the same L0 per layer falls far behind from layer 1 on (its layer-j transcoder would need a
      feature for each planted feature writing to j);
    - a PLT set given that (k = K_PLANT·(j + 1) at layer j) recovers each planted feature once per layer it
      writes to: L − s features (and active features per token) where the CLT uses one.
    """
    x, y, out = planted_layers(16_000)
    key = (tuple(f"mlp_in.{i}" for i in range(L)), tuple(f"mlp_out.{i}" for i in range(L)))
    torch.manual_seed(0)
    clt = build(CLTConfig(layers=list(range(L)), activation="topk", k=K_PLANT, n_latents=16).resolved(DP))
    assert float(best_cos(clt.W_dec[0], out[0]).mean()) < 0.5  # the start is not the answer
    tmpl = TopKConfig(layers=list(range(L)), hookpoint="mlp_in", target="mlp_out", k=K_PLANT, n_latents=16)
    small = TranscoderSet(tmpl.resolved(DP))
    wide = dataclasses.replace(tmpl, n_latents=48).resolved(DP)
    big = TranscoderSet(wide, {j: build(dataclasses.replace(member_config(wide, j), k=K_PLANT * (j + 1)))
                               for j in range(L)})  # fmt: skip
    tc = TrainConfig(batch_size=256, epochs=8, lr=4e-3, optimizer="adam", warmup_steps=50, log_every=10**9,
                     out_dir=str(tmp_path), dead_tokens=20_000, init_rows=8192)  # fmt: skip
    src = TensorSource(x, y, batch_size=256)
    last = Trainer({"clt": clt, "plt": small, "big": big}, {key: src}, tc).fit(resume=False)
    for s in range(L):  # measured 0.997, 0.996, 0.992
        score = float(best_cos(clt.W_dec[s], out[s]).mean())
        assert score >= 0.95, f"CLT source layer {s}: mean best cosine {score:.3f} ({last})"
    fvu = {m: [last[f"{m}/layer{j}/fvu"] for j in range(L)] for m in ("clt", "plt", "big")}
    assert max(fvu["clt"]) < 0.05, fvu  # measured 0.004, 0.003, 0.009
    assert all(fvu["plt"][j] > max(0.15, 5 * fvu["clt"][j]) for j in range(1, L)), fvu  # measured 0.32, 0.52
    for j in range(L):  # measured 0.999, 0.911, 0.945
        atoms = torch.cat([out[s][:, j - s] for s in range(j + 1)])  # every planted feature writing to j
        score = float(best_cos(big[j].W_dec, atoms).mean())
        assert score >= 0.85, (
            f"PLT {j}: mean best cosine {score:.3f} over the {len(atoms)} features writing to it"
        )
    assert last["clt/l0"] == pytest.approx(K_PLANT * L)
    assert sum(last[f"big/layer{j}/l0"] for j in range(L)) == pytest.approx(K_PLANT * L * (L + 1) / 2)


def test_helpers_train_a_clt_on_stacked_rows():
    """The shared helper (the real Trainer on a TensorSource) takes stacked rows as they are."""
    x, y, _ = planted_layers(2048)
    m = build(CLTConfig(layers=list(range(L)), activation="topk", k=K_PLANT, n_latents=16).resolved(DP))
    last = train_dictionary(m, x, y, epochs=1, log_every=4)
    assert 0 < last["m/fvu"] < 1.5 and last["m/l0"] == pytest.approx(K_PLANT * L)
    assert {f"m/layer{j}/fvu" for j in range(L)} <= set(last)


# -- latent sharding ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu", "relu"])
def test_sharded_clt_single_rank_equals_clt(activation):
    """In one process a shard is the whole CLT: outputs, every loss (AuxK over dead features too) and gradients."""
    from sparsedict.dictionaries.clt import ShardedCLT

    full = make(activation, skip=True)
    part = ShardedCLT(full, 0, 1)
    x, y = torch.randn(40, L, D), torch.randn(40, L, DO)
    dead = torch.zeros(L * F, dtype=torch.bool)
    dead[::3] = True
    outs = []
    for m in (full, part):
        m.set_dead_mask(dead)
        m.train()
        out = m(x, y)
        sum(out.losses.values()).backward()
        outs.append(out)
    assert set(outs[0].losses) == set(outs[1].losses)
    assert ("auxk" in outs[1].losses) == (activation in ("topk", "batchtopk"))
    torch.testing.assert_close(outs[1].x_hat, outs[0].x_hat)
    torch.testing.assert_close(outs[1].code.to_dense(), outs[0].code.to_dense())
    for k in outs[0].losses:
        torch.testing.assert_close(outs[1].losses[k], outs[0].losses[k], msg=k)
    mine = dict(part.named_parameters())
    for name, a in full.named_parameters():
        torch.testing.assert_close(mine[name].grad, a.grad, msg=name, atol=1e-6, rtol=1e-5)
    back = part.unshard()
    for k, v in full.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, msg=k)


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu"])
def test_sharded_clt_on_two_ranks_matches_one_process(activation, tmp_path):
    """torchrun, 2 gloo ranks, each holding half of every layer's features: the loss curve and the saved CLT
    equal a single process's (AuxK included: features die after 3 steps)."""
    import dist_worker as W

    opts = {"steps": 30, "batch": 128, "n": 32, "k": 3, "clt": activation, "dead_tokens": 384}
    W.run({**opts, "out_dir": str(tmp_path / "one")})
    W.run({**opts, "out_dir": str(tmp_path / "tp"), "shard_latents": True}, nproc=2)
    one, tp = W.log(str(tmp_path / "one")), W.log(str(tmp_path / "tp"))
    assert [r["step"] for r in one] == [r["step"] for r in tp] == list(range(1, 31))
    for a, b in zip(one, tp):
        # every logged loss and metric (grad_norm is each rank's own shard's under sharding)
        for key in [k for k in a if k.startswith("topk/") and k not in ("topk/dead", "topk/grad_norm")]:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert one[-1]["topk/mse"] < 0.8 * one[0]["topk/mse"]  # it trained (measured 0.68-0.73): not vacuous
    if activation != "jumprelu":
        assert any("topk/auxk" in r for r in tp)
    pa, pb = W.params(str(tmp_path / "one")), W.params(str(tmp_path / "tp"))
    assert set(pa) == set(pb)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], atol=1e-4, rtol=1e-4, msg=k)


def test_trainer_saves_a_clt_and_a_set_that_load_back(tmp_path):
    """``Trainer.save``: the CLT as one checkpoint, the transcoder set as one directory (members' provenance
    inside); ``from_pretrained`` gives back the same functions."""
    x, y, _ = planted_layers(1024)
    key = (tuple(f"mlp_in.{i}" for i in range(L)), tuple(f"mlp_out.{i}" for i in range(L)))
    torch.manual_seed(0)
    clt = build(CLTConfig(layers=list(range(L)), activation="batchtopk", k=K_PLANT, n_latents=16,
                          threshold_start_step=0).resolved(DP))  # fmt: skip
    tset = TranscoderSet(
        TopKConfig(
            layers=list(range(L)), hookpoint="mlp_in", target="mlp_out", k=K_PLANT, n_latents=16
        ).resolved(DP)
    )
    tc = TrainConfig(batch_size=128, epochs=1, lr=1e-3, optimizer="adam", warmup_steps=2, log_every=10**9,
                     out_dir=str(tmp_path), init_rows=512, normalise_inputs="auto")  # fmt: skip
    trainer = Trainer({"clt": clt, "plt": tset}, {key: TensorSource(x, y, batch_size=128)}, tc)
    trainer.fit(resume=False)
    paths = trainer.save()
    assert sorted(paths) == ["clt", "plt"]
    back_clt, back_set = from_pretrained(paths["clt"]), from_pretrained(paths["plt"])
    assert type(back_clt) is CLT and isinstance(back_set, TranscoderSet) and back_set.layers == [0, 1, 2]
    assert back_set[1].meta["training_steps"] == 8 and back_set.meta["training_tokens"] == 1024
    assert float(clt.input_scale) != 1.0  # the fold is exercised
    with torch.no_grad():
        for m, b in ((clt.eval(), back_clt), (tset.eval(), back_set)):
            c = float(m.input_scale)
            want = (
                m.decode(m.encode(x[:64] * c), x[:64] * c) / c
                if isinstance(m, CLT)
                else m.decode(m.encode(x[:64]))
            )
            torch.testing.assert_close(b.decode(b.encode(x[:64]), x[:64]), want, atol=1e-4, rtol=1e-4)

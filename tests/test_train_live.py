"""Training straight from the model (``train.source: live``) through the pipeline, on the real SmolLM2.

One recipe with an SAE on ``resid_post.2`` and a transcoder ``mlp_in.2 -> mlp_out.2`` (three hookpoints) is
trained twice in this process: from its float32 disk cache read in window order (``train.shuffle: window``)
and live. The parameters must be bitwise equal, one model forward must serve both dictionaries (counted with a
forward hook), a live run killed with SIGKILL and rerun must end bitwise where the uninterrupted run ends, and a
2-rank gloo data-parallel live run must end where one process reading the same global batches ends. A
cross-layer transcoder and a transcoder set over two layers (``[B, 2, 576]`` batches of four hookpoints) train
live bitwise as from the cache, and a live run interrupted after a checkpoint resumes to the same end.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import sparsedict.lm
import sparsedict.pipeline as pipeline
from sparsedict import from_pretrained
from sparsedict.cache.tokens import plan_shards
from sparsedict.train import checkpoint as ckpt
from sparsedict.train.recipe import parse_recipe
from sparsedict.train.trainer import Trainer

SAE, TC = "topk-resid_post.2", "topk-mlp_in.2-mlp_out.2"
RECIPE = {
    "cache": {"dataset": "embedded-sample", "hookpoints": ["resid_post.2", "mlp_in.2", "mlp_out.2"],
              "context_length": 32, "max_tokens": 384, "shard_rows": 128, "batch_size": 4, "num_threads": 1,
              "progress": False},
    "train": {"batch_size": 64, "max_steps": 9, "init_rows": 200, "log_every": 1, "seed": 1, "optimizer": "adam",
              "lr": 1e-3, "warmup_steps": 2, "normalise_inputs": "sqrt_d", "checkpoint_every": 4},
    "dictionaries": [
        {"architecture": "topk", "hookpoint": "resid_post.2", "k": 8, "n_latents": 512, "b_dec_init": "mean"},
        {"architecture": "topk", "hookpoint": "mlp_in.2", "target": "mlp_out.2", "k": 8, "n_latents": 512,
         "b_dec_init": "mean"},
    ],
}  # fmt: skip
STEPS_PER_EPOCH = 384 // 64  # 6: the 9 steps run into a second epoch, which the live source computes again


def _recipe(tmp: Path, **train) -> dict:
    data = copy.deepcopy(RECIPE)
    data["cache"]["out_dir"] = str(tmp / "cache")
    data["train"].update(out_dir=str(tmp / "train"), **train)
    return data


def _params(train_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(train_dir / name / "model.safetensors")


def _log(train_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (train_dir / "log.jsonl").read_text().splitlines()]


def _forward_batches(plans) -> int:
    return sum(math.ceil(len(p.token_ids) / RECIPE["cache"]["batch_size"]) for p in plans)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smollm2):
    """Cached (window order) and live training of RECIPE in this process; model forwards of the live run."""
    model, tok = smollm2
    patch = pytest.MonkeyPatch()
    patch.setattr(sparsedict.lm, "load_model", lambda *a, **k: (model, tok))  # the cache runner's loader
    patch.setattr(pipeline, "load_model", lambda *a, **k: (model, tok))  # the live source's
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("live")
    try:
        cached = _recipe(root / "cached", shuffle="window")
        pipeline.run(parse_recipe(cached), resume=False)
        live = _recipe(root / "live", source="live")
        calls = []
        handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            pipeline.run(parse_recipe(live), resume=False)
        finally:
            handle.remove()
    finally:
        patch.undo()
        torch.set_num_threads(threads)
    return {"cached": root / "cached", "live": root / "live", "forwards": len(calls), "recipe": live}


def test_live_training_equals_cached_training_bitwise(runs):
    assert not (runs["live"] / "cache").exists(), "live training wrote a cache"
    log_c, log_l = _log(runs["cached"] / "train"), _log(runs["live"] / "train")
    assert [r["step"] for r in log_l] == list(range(1, 10)) and [r["tokens"] for r in log_l][-1] == 9 * 64
    for name in (SAE, TC):
        assert [r[f"{name}/loss"] for r in log_l] == [r[f"{name}/loss"] for r in log_c]
        pc, pl = _params(runs["cached"] / "train", name), _params(runs["live"] / "train", name)
        assert set(pc) == set(pl)
        for key in pc:
            assert torch.equal(pc[key], pl[key]), (name, key, (pc[key] - pl[key]).abs().max())
        assert (
            log_l[-1][f"{name}/loss"] < 0.7 * log_l[0][f"{name}/loss"]
        )  # it trained: the test is not vacuous


def test_live_transcoder_pair_and_provenance(runs):
    tc = from_pretrained(runs["live"] / "train" / TC)
    assert (tc.cfg.hookpoint, tc.cfg.target, tc.cfg.d_in, tc.cfg.d_out) == ("mlp_in.2", "mlp_out.2", 576, 576)
    cache = parse_recipe(runs["recipe"]).cache
    assert tc.meta["live"]["config_hash"] == cache.config_hash() and "cache" not in tc.meta
    assert tc.meta["exclusions"]["rules"]["exclude_first_n"] == cache.exclude_first_n
    assert tc.meta["training_tokens"] == 9 * 64


def test_eval_of_a_live_checkpoint_caches_held_out_text_like_the_training_data(runs, tmp_path, monkeypatch):
    from sparsedict.eval import evaluate

    made = []
    monkeypatch.setattr(evaluate, "cache_activations", lambda cfg: made.append(cfg) or tmp_path)
    sae = from_pretrained(runs["live"] / "train" / SAE)
    evaluate.heldout_cache(evaluate.EvalConfig(max_tokens=100, splice_tokens=0), {"sae": sae})
    (cfg,) = made
    trained = parse_recipe(runs["recipe"]).cache
    assert (cfg.split, cfg.hookpoints, cfg.max_tokens) == ("test", ["resid_post.2"], 100)
    assert (cfg.dataset, cfg.context_length, cfg.shard_rows) == (trained.dataset, 32, 128)


def test_one_forward_serves_every_dictionary(runs, smollm2):
    """Two dictionaries on three hookpoints: the model runs once per batch of contexts, not once per dictionary."""
    cache = parse_recipe(runs["recipe"]).cache
    plans = list(plan_shards(cache, smollm2[1]))
    assert sum(p.rows for p in plans) == 384
    head, have = [], 0  # the shards initialise() samples its 200 rows from
    for p in plans:
        head.append(p)
        have += p.rows
        if have >= 200:
            break
    epochs = math.ceil(9 / STEPS_PER_EPOCH)  # every epoch is one window here: it is computed when it starts
    want = 1 + _forward_batches(head) + epochs * _forward_batches(plans)  # 1: the probe finding the widths
    assert runs["forwards"] == want


def _run_cli(
    args: list[str], kill_at: int | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``sparsedict train ARGS`` in a fresh process (SIGKILLed by itself before step ``kill_at``)."""
    code = (
        "import os, signal, sys\n"
        "from sparsedict.train.trainer import Trainer\n"
        f"kill_at = {kill_at!r}\n"
        "step = Trainer.train_step\n"
        "def train_step(self, batches):\n"
        "    if self.step == kill_at:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return step(self, batches)\n"
        "Trainer.train_step = train_step\n"
        "from sparsedict.cli import main\n"
        "sys.exit(main(['train', *sys.argv[1:]]))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_live_resume_after_kill_is_bitwise(runs, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tmp_path, source="live")))
    train = tmp_path / "train"
    killed = _run_cli([str(recipe)], kill_at=5)  # after the checkpoint of step 4, mid-epoch
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (train / SAE).exists() and len(_log(train)) == 5
    state = ckpt.load_checkpoint(train / "checkpoint")
    assert state["step"] == 4
    for key in ("resid_post.2|", "mlp_in.2|mlp_out.2"):  # the live source's position: 4 batches into epoch 0
        assert {k: state["sources"][key][k] for k in ("epoch", "batch")} == {"epoch": 0, "batch": 4}
    done = _run_cli([str(recipe)])
    assert done.returncode == 0, done.stderr[-3000:]
    log = _log(train)
    assert [r["step"] for r in log] == [
        *range(1, 6),
        *range(5, 10),
    ]  # steps 1-5, then 5-9 again after resuming
    assert [r["tokens"] for r in log[5:]] == [s * 64 for s in range(5, 10)]  # no token lost or read twice
    for name in (SAE, TC):
        want, got = _params(runs["live"] / "train", name), _params(train, name)
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key, (got[key] - want[key]).abs().max())


class _GlobalBatches:
    """One process reading the global batches of a data-parallel run: the ranks' batches, concatenated."""

    def __init__(self, parts: list) -> None:
        self.parts = parts
        self.d_in, self.d_out, self.n_rows = parts[0].d_in, parts[0].d_out, parts[0].n_rows
        self.world_size, self.meta = 1, {}

    def __iter__(self):
        for batches in zip(*self.parts):
            xs, ys = zip(*batches)
            yield torch.cat(xs), (None if ys[0] is None else torch.cat(ys))

    def sample(self, n_rows: int, seed: int = 0):
        return self.parts[0].sample(n_rows, seed)  # every rank samples the same rows

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


DP_TOL = 1e-5
"""fp32: the ranks' gradient means are averaged where one process takes the mean of the whole batch (another
summation order, so not bitwise); measured max |Δ| ≈ 2e-7 after the 9 steps."""


def _torchrun(data: dict, tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m sparsedict train`` of the recipe ``data`` (2 gloo ranks); must exit 0."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "sparsedict",
           "train", str(recipe)]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-5000:]


def _train_global_batches(one) -> None:
    """Train recipe ``one`` in this process on the global batches of 2 live ranks (rank 0's 32 rows, then rank 1's)."""
    threads = torch.get_num_threads()
    try:
        ranks = [pipeline.open_live_sources(one, 32, r, 2) for r in range(2)]
        sources = {key: _GlobalBatches([r[key] for r in ranks]) for key in ranks[0]}
        trainer = Trainer(pipeline.build_dictionaries(one, sources), sources, one.train)
        trainer.fit(resume=False)
        trainer.save()
    finally:
        torch.set_num_threads(threads)


def test_live_data_parallel_matches_one_process(runs, smollm2, tmp_path, monkeypatch):
    _torchrun(_recipe(tmp_path / "dp", source="live"), tmp_path)

    model, tok = smollm2  # one process, the same global batches: rank 0's 32 rows then rank 1's, every step
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: (model, tok))
    one = parse_recipe(_recipe(tmp_path / "one", source="live"))
    _train_global_batches(one)
    for name in (SAE, TC):
        dp, ref = _params(tmp_path / "dp" / "train", name), _params(tmp_path / "one" / "train", name)
        for key in ref:
            assert torch.allclose(dp[key], ref[key], atol=DP_TOL, rtol=0), (
                name,
                key,
                (dp[key] - ref[key]).abs().max(),
            )
    # the ranks read other rows than one process with the global batch does: the comparison is not vacuous
    single = _params(runs["live"] / "train", SAE)
    assert (single["W_dec"] - _params(tmp_path / "dp" / "train", SAE)["W_dec"]).abs().max() > 100 * DP_TOL


def test_live_latent_sharded_matches_one_process(runs, tmp_path):
    """shard_latents: every rank runs the model on every context and reads the global batch of one process."""
    _torchrun(_recipe(tmp_path, source="live", shard_latents=True), tmp_path)
    for name in (SAE, TC):
        tp, ref = _params(tmp_path / "train", name), _params(runs["live"] / "train", name)
        for key in ref:
            assert torch.allclose(tp[key], ref[key], atol=DP_TOL, rtol=0), (
                name,
                key,
                (tp[key] - ref[key]).abs().max(),
            )


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from sparsedict.cli import main

    code = main(["train", *args])
    return code, capsys.readouterr().err.strip()


def test_live_errors_are_one_clear_line(tmp_path, smollm2, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: smollm2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tmp_path, source="live")))
    threads = torch.get_num_threads()
    try:
        code, err = _cli([str(recipe), "--cache.max_tokens", "null", "--train.max_steps", "0"], capsys)
        assert code == 2 and "no known length" in err and "max_steps" in err and "\n" not in err
        bad = [
            "--cache.hookpoints",
            "resid_post.2",
            "mlp_in.2",
            "mlp_outt.2",
            "--dictionaries.1.target",
            "mlp_outt.2",
        ]
        code, err = _cli([str(recipe), *bad], capsys)
        assert (
            code == 2 and "unknown hookpoint 'mlp_outt.2'" in err and "mlp_out.2" in err and "\n" not in err
        )
        code, err = _cli([str(recipe), "--train.shuffle", "global"], capsys)
        assert code == 2 and "shuffle: window" in err
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "train" / SAE).exists()


def test_data_parallel_live_needs_max_tokens(smollm2, tmp_path):
    from sparsedict.cache.live import LiveSource

    cfg = parse_recipe(_recipe(tmp_path, source="live")).cache
    cfg.max_tokens = None
    live = LiveSource(
        cfg, "resid_post.2", batch_size=32, rank=1, world_size=2, model=smollm2[0], tokenizer=smollm2[1]
    )
    with pytest.raises(ValueError, match=r"data-parallel live training .* needs cache.max_tokens"):
        next(iter(live))


CLT, PLT = "clt", "plt"
LAYERED = {
    "cache": {**RECIPE["cache"], "hookpoints": ["mlp_in.3", "mlp_in.4", "mlp_out.3", "mlp_out.4"]},
    "train": {**RECIPE["train"], "max_steps": 8, "checkpoint_every": 3, "lr": 1e-2},
    "dictionaries": [
        {"architecture": "clt", "name": CLT, "layers": [3, 4], "hookpoint": "mlp_in", "target": "mlp_out",
         "activation": "batchtopk", "k": 8, "n_latents": 256},
        {"architecture": "batchtopk", "name": PLT, "layers": [3, 4], "hookpoint": "mlp_in", "target": "mlp_out",
         "k": 8, "n_latents": 256},
    ],
}  # fmt: skip


def _layered(tmp: Path, **train) -> dict:
    data = copy.deepcopy(LAYERED)
    data["cache"]["out_dir"] = str(tmp / "cache")
    data["train"].update(out_dir=str(tmp / "train"), **train)
    return data


class _Stop(Exception):
    pass


def test_cross_layer_transcoder_and_set_train_live_as_from_the_cache(tmp_path, smollm2, monkeypatch):
    model, tok = smollm2
    monkeypatch.setattr(sparsedict.lm, "load_model", lambda *a, **k: (model, tok))
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: (model, tok))
    threads = torch.get_num_threads()
    step = Trainer.train_step

    def stop_at_5(self, batches):
        if self.step == 5:  # after the checkpoint of step 3: steps 4 and 5 are lost and run again
            raise _Stop
        return step(self, batches)

    try:
        pipeline.run(parse_recipe(_layered(tmp_path / "cached", shuffle="window")), resume=False)
        pipeline.run(parse_recipe(_layered(tmp_path / "live", source="live")), resume=False)
        resumed = parse_recipe(_layered(tmp_path / "resumed", source="live"))
        monkeypatch.setattr(Trainer, "train_step", stop_at_5)
        with pytest.raises(_Stop):
            pipeline.run(resumed, resume=False)
        monkeypatch.setattr(Trainer, "train_step", step)
        pipeline.run(resumed, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "live" / "cache").exists(), "live training wrote a cache"
    log_c, log_l = _log(tmp_path / "cached" / "train"), _log(tmp_path / "live" / "train")
    log_r = _log(tmp_path / "resumed" / "train")
    assert [r["step"] for r in log_r] == [*range(1, 6), *range(4, 9)]
    logged = [k for k in log_l[-1] if k.startswith((f"{CLT}/", f"{PLT}/"))]  # losses, FVU, L0 of every layer
    fvus = [f"{CLT}/fvu", f"{CLT}/layer4/fvu", f"{PLT}/layer3/fvu", f"{PLT}/layer4/fvu"]
    assert {f"{CLT}/loss", f"{PLT}/layer3/loss", *fvus} <= set(logged)
    for key in logged:
        assert [r[key] for r in log_l] == [r[key] for r in log_c], key
        assert [r[key] for r in log_r[5:]] == [r[key] for r in log_l[3:]], key  # no token lost or read twice
    for (
        key
    ) in fvus:  # it trained (FVU 1.01-1.02 at step 1, 0.85-0.91 at step 8): the comparison is not vacuous
        assert log_l[0][key] > 1.0 and log_l[-1][key] < 0.93, (key, log_l[0][key], log_l[-1][key])
    for name in (CLT, PLT):
        pc = _params(tmp_path / "cached" / "train", name)
        for run in ("live", "resumed"):
            pl = _params(tmp_path / run / "train", name)
            assert set(pc) == set(pl) and all(torch.equal(pc[k], pl[k]) for k in pc), (name, run)
    clt = from_pretrained(tmp_path / "live" / "train" / CLT)
    live_cache = parse_recipe(_layered(tmp_path / "live", source="live")).cache
    assert clt.layers == [3, 4] and clt.meta["live"]["config_hash"] == live_cache.config_hash()


def test_layered_live_data_parallel_matches_one_process(tmp_path, smollm2, monkeypatch):
    """2 gloo ranks, each running the model on its own share of the contexts and serving [B, 2, 576] batches of
    it, end where one process reading the same global batches (rank 0's rows then rank 1's) ends. TopK (per row):
    BatchTopK selects over each rank's batch, which one process with the global batch does not. Adam moves every
    parameter by about lr per step, so a rank reading other rows would miss DP_TOL by far."""

    def recipe(tmp: Path) -> dict:
        data = _layered(tmp, source="live")
        data["dictionaries"][0]["activation"] = data["dictionaries"][1]["architecture"] = "topk"
        data["train"]["lr"] = 1e-3  # DP_TOL's: the summation-order differences scale with the step size
        return data

    _torchrun(recipe(tmp_path / "dp"), tmp_path)
    model, tok = smollm2
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: (model, tok))
    one = parse_recipe(recipe(tmp_path / "one"))
    _train_global_batches(one)
    for name in (CLT, PLT):
        dp, ref = _params(tmp_path / "dp" / "train", name), _params(tmp_path / "one" / "train", name)
        assert set(dp) == set(ref)
        for key in ref:
            assert torch.allclose(dp[key], ref[key], atol=DP_TOL, rtol=0), (
                name,
                key,
                (dp[key] - ref[key]).abs().max(),
            )

"""Corrupt or truncated shards are never read: every reader checks each shard's digest the first time a process
touches it (training, ``sample``, ``rows``, ``tokens``, eval), ``sparsedict cache verify`` checks a whole cache,
and ``--repair`` (or re-running the cache command) recomputes the bad shards bit for bit."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file

from sparsedict.cache import ActivationStore, CacheConfig, ShardError, cache_activations, digest
from sparsedict.cli import main as cli_main

HP, Y = "resid_post.1", "mlp_out.1"
KINDS = (HP, Y, "tokens")


def _cfg(out: Path) -> CacheConfig:
    return CacheConfig(dataset="embedded-sample", hookpoints=[HP, Y], max_tokens=600, shard_rows=200,
                       out_dir=str(out), progress=False, num_threads=1)  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return cache_activations(_cfg(tmp_path_factory.mktemp("ref") / "c"))


@pytest.fixture
def copy(reference, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(reference, dst)
    return dst


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _file(root: Path, kind: str = HP, i: int = 1) -> Path:
    return root / _manifest(root)["shards"][i]["files"][kind]["file"]


def _flip(path: Path) -> None:
    """Flip the lowest bit of the byte in the middle of the file (same size, header intact)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1000])


def _entry(root: Path, path: Path) -> dict:
    return next(
        s["files"][k]
        for s in _manifest(root)["shards"]
        for k in KINDS
        if root / s["files"][k]["file"] == path
    )


def _problem(root: Path, path: Path, algorithm: str = "xxh3_128") -> str:
    """The mismatch line: the shard, the digest its manifest records, the file's digest (computed here)."""
    entry = _entry(root, path)
    actual = {"xxh3_128": xxhash.xxh3_128_hexdigest, "sha256": lambda b: hashlib.sha256(b).hexdigest()}
    got = actual[algorithm](path.read_bytes())
    assert got != entry[algorithm]
    return (rf"shard {re.escape(str(path))} fails its {algorithm} check: the manifest records {entry[algorithm]} "
            rf"but the file hashes to {got} \(its bytes changed on disk after it was written\)")  # fmt: skip


def _fix(root: Path) -> str:
    return (
        rf"; fix: run `sparsedict cache verify {re.escape(str(root))} --repair` to recompute the bad shards"
    )


def _mismatch(root: Path, path: Path, algorithm: str = "xxh3_128") -> str:
    return _problem(root, path, algorithm) + _fix(root)


def _truncated(root: Path, path: Path) -> str:
    return rf"shard {re.escape(str(path))} is truncated: .*" + _fix(root)


def test_new_caches_record_xxh3_128(reference):
    for s in _manifest(reference)["shards"]:
        for kind in KINDS:
            entry = s["files"][kind]
            data = (reference / entry["file"]).read_bytes()
            assert entry["xxh3_128"] == xxhash.xxh3_128_hexdigest(data) and entry["bytes"] == len(data)
            assert "sha256" not in entry


def test_flipped_byte_is_never_served(copy, reference):
    path = _file(copy)
    _flip(path)
    corrupt, clean = load_file(path)["activations"], load_file(_file(reference))["activations"]
    assert torch.isfinite(corrupt).all() and not torch.equal(corrupt, clean), "a finite, silent corruption"
    # with the check turned off the corrupted rows are served: this is what every default read path must refuse
    assert not torch.equal(
        ActivationStore(copy, HP, verify=False).rows(), ActivationStore(reference, HP).rows()
    )
    want = _mismatch(copy, path)
    store = ActivationStore(copy, HP, target=Y, batch_size=64, loop=False)  # size and header checks pass
    with pytest.raises(ShardError, match=want):
        list(store)
    with pytest.raises(ShardError, match=want):
        store.sample(100)
    with pytest.raises(ShardError, match=want):
        store.rows()
    x, _ = store.rows(0, 50)  # shard 0 only: intact, served
    assert torch.equal(x, ActivationStore(reference, HP).rows(0, 50))
    with pytest.raises(ShardError, match=want):
        store.norm_stats()
    with pytest.raises(ShardError, match=want):
        ActivationStore(copy, HP).verify()


def test_flipped_byte_in_tokens(copy):
    path = _file(copy, "tokens", 2)
    _flip(path)
    store = ActivationStore(copy, HP)
    assert len(store.tokens([0, 1])["token_ids"]) > 0
    with pytest.raises(ShardError, match=_mismatch(copy, path)):
        store.tokens()
    from sparsedict.eval.evaluate import cache_contexts

    with pytest.raises(ShardError, match=_mismatch(copy, path)):
        cache_contexts(copy, None)


def test_truncated_tokens_shard(copy):
    """Eval's splicing reads tokens shards whole (safetensors): a short one is named, not a parser traceback."""
    from sparsedict.eval.evaluate import cache_contexts

    path = _file(copy, "tokens", 0)
    _truncate(path)
    with pytest.raises(ShardError, match=_truncated(copy, path)):
        cache_contexts(copy, 40)
    with pytest.raises(ShardError, match=_truncated(copy, path)):
        ActivationStore(copy, HP).tokens([0])


def _train(root: Path, out: Path) -> None:
    from sparsedict.dictionaries import build
    from sparsedict.dictionaries.topk import TopKConfig
    from sparsedict.train import TrainConfig, Trainer
    from sparsedict.train.trainer import source_key

    torch.manual_seed(0)
    model = build(TopKConfig(hookpoint=HP, n_latents=64, k=4).resolved(576))
    store = ActivationStore(root, HP, batch_size=64)
    cfg = TrainConfig(
        batch_size=64, max_steps=4, init_rows=64, log_every=10**9, out_dir=str(out), device="cpu"
    )
    Trainer({"m": model}, {source_key(model): store}, cfg).fit(resume=False)


def test_training_raises(copy, tmp_path):
    _train(copy, tmp_path / "ok")  # the intact copy trains
    path = _file(copy, HP, 2)
    _flip(path)
    with pytest.raises(ShardError, match=_mismatch(copy, path)):
        _train(copy, tmp_path / "bad")


def _checkpoint(reference: Path, out: Path) -> Path:
    from sparsedict.dictionaries import build
    from sparsedict.dictionaries.topk import TopKConfig

    torch.manual_seed(0)
    build(TopKConfig(hookpoint=HP, n_latents=64, k=4).resolved(576)).save_pretrained(
        out, {"cache": str(reference)}
    )
    return out


@pytest.mark.parametrize("fault", ["flip", "truncate", "flip-tokens"])
def test_eval_cli_exits_with_the_named_error(copy, reference, tmp_path, capsys, fault):
    ckpt = _checkpoint(reference, tmp_path / "ck")
    # splicing 40 tokens reads tokens shard 0 only
    path = _file(copy, "tokens", 0) if fault == "flip-tokens" else _file(copy, HP, 1)
    (_truncate if fault == "truncate" else _flip)(path)
    want = _truncated(copy, path) if fault == "truncate" else _mismatch(copy, path)
    splice = "40" if fault == "flip-tokens" else "0"
    rc = cli_main(["eval", str(ckpt), "--cache", str(copy), "--splice_tokens", splice, "--threads", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert re.search("sparsedict eval: " + want, err), err


def test_truncated_shard_is_named_on_every_path(copy):
    path = _file(copy, Y, 1)
    recorded = _entry(copy, path)["bytes"]
    store = ActivationStore(copy, HP, target=Y, batch_size=64, loop=False)  # opened while intact
    unchecked = ActivationStore(copy, Y, batch_size=64, loop=False, verify=False)
    _truncate(path)
    with pytest.raises(ShardError, match=_truncated(copy, path)) as err:
        list(store)  # truncated after the store opened it: caught before its first read
    assert (
        err.value.problem
        == f"shard {path} is truncated: {recorded - 1000} bytes on disk, the manifest records {recorded}"
    )
    with pytest.raises(ShardError, match=_truncated(copy, path)):
        list(unchecked)  # without the digest check, the positioned read past the end
    with pytest.raises(ShardError, match=_truncated(copy, path)) as err:
        ActivationStore(copy, HP, target=Y)  # at open (training, sample and eval all open a store first)
    assert "tensor 'activations' ends at byte" in err.value.problem


def test_cache_verify_cli(copy, reference, capsys):
    size = sum(p.stat().st_size for p in reference.glob("shards/*/*.safetensors")) / 1e6
    assert cli_main(["cache", "verify", str(reference)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{reference}: OK, 9 files ({size:.1f} MB) in 3 shards, digests xxh3_128: 9"]
    tokens0, hp1, y2 = _file(copy, "tokens", 0), _file(copy, HP, 1), _file(copy, Y, 2)
    _flip(tokens0)
    _flip(hp1)
    _truncate(y2)
    assert cli_main(["cache", "verify", str(copy)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4, lines
    assert re.fullmatch(_problem(copy, tokens0), lines[0]), lines[0]
    assert re.fullmatch(_problem(copy, hp1), lines[1]), lines[1]
    assert lines[2].startswith(f"shard {y2} is truncated: tensor 'activations' ends at byte"), lines[2]
    assert lines[3].startswith(f"{copy}: 3 problem(s), 3 bad shard(s); checked 6 files")
    assert lines[3].endswith(f"Fix: run `sparsedict cache verify {copy} --repair` to recompute the bad shards from "
                             "the config recorded in the cache (re-running the `sparsedict cache` command that made "
                             "it does the same)")  # fmt: skip
    assert cli_main(["cache", "verify", str(copy / "nowhere")]) == 1
    assert "not an activation cache" in capsys.readouterr().out


def _same_files(a: Path, b: Path) -> None:
    for sa, sb in zip(_manifest(a)["shards"], _manifest(b)["shards"]):
        for kind in KINDS:
            assert (a / sa["files"][kind]["file"]).read_bytes() == (
                b / sb["files"][kind]["file"]
            ).read_bytes()
            assert sa["files"][kind] == sb["files"][kind]


def test_repair_recomputes_bad_shards(copy, reference, capsys):
    _flip(_file(copy, HP, 1))
    _truncate(_file(copy, "tokens", 2))
    assert cli_main(["cache", "verify", str(copy), "--repair"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1].startswith(f"{copy}: OK, 9 files")
    assert re.search(r"fails its xxh3_128 check.*recomputing shard 1", captured.err)
    assert re.search(r"is truncated.*recomputing shard 2", captured.err)
    _same_files(copy, reference)


def test_rerunning_the_cache_command_rewrites_a_corrupt_shard(copy, reference, capsys):
    _flip(_file(copy, Y, 0))
    assert cache_activations(_cfg(copy)) == copy
    assert re.search(
        r"shard .*000000.safetensors fails its xxh3_128 check.*recomputing shard 0", capsys.readouterr().err
    )
    _same_files(copy, reference)


def _to_sha256_only(root: Path) -> None:
    """Rewrite the manifest and receipts as an earlier version wrote them (sha256 digests only)."""
    m = _manifest(root)
    for s in m["shards"]:
        for kind in KINDS:
            entry = s["files"][kind]
            del entry["xxh3_128"]
            entry["sha256"] = hashlib.sha256((root / entry["file"]).read_bytes()).hexdigest()
        receipt = root / "shards" / "_receipts" / f"{s['index']:06d}.json"
        receipt.write_text(json.dumps({**json.loads(receipt.read_text()), "files": s["files"]}))
    (root / "manifest.json").write_text(json.dumps(m))


def test_sha256_only_cache_loads_verifies_and_upgrades(copy, reference, capsys):
    _to_sha256_only(copy)
    with pytest.warns(
        UserWarning, match=rf"cache {re.escape(str(copy))} records sha256 digests only.*--repair"
    ):
        x, y = ActivationStore(copy, HP, target=Y).rows()
    want_x, want_y = ActivationStore(reference, HP, target=Y).rows()
    assert torch.equal(x, want_x) and torch.equal(y, want_y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the note is given once a process
        ActivationStore(copy, HP).sample(50)
    assert cli_main(["cache", "verify", str(copy)]) == 0
    assert capsys.readouterr().out.strip().endswith("digests sha256: 9")
    # the upgrade: --repair adds xxh3_128 (checked against sha256 in the same pass) to manifest and receipts
    assert cli_main(["cache", "verify", str(copy), "--repair"]) == 0
    m = _manifest(copy)
    for s in m["shards"]:
        receipt = json.loads((copy / "shards" / "_receipts" / f"{s['index']:06d}.json").read_text())
        for kind in KINDS:
            entry = s["files"][kind]
            assert entry["xxh3_128"] == xxhash.xxh3_128_hexdigest((copy / entry["file"]).read_bytes())
            assert receipt["files"][kind] == entry
    assert cli_main(["cache", "verify", str(copy)]) == 0
    assert capsys.readouterr().out.strip().endswith("digests xxh3_128: 9")


def test_sha256_only_cache_mismatch(copy):
    _to_sha256_only(copy)
    path = _file(copy, HP, 0)
    _flip(path)
    with (
        pytest.warns(UserWarning, match="sha256 digests only"),
        pytest.raises(ShardError, match=_mismatch(copy, path, "sha256")),
    ):
        ActivationStore(copy, HP).sample(10)


def test_each_shard_is_hashed_once_per_process(copy, monkeypatch):
    from sparsedict.eval.evaluate import cache_contexts

    calls: list[int] = []
    real = digest.hash_views

    def spy(views, algorithms):
        calls.append(1)
        return real(views, algorithms)

    monkeypatch.setattr(digest, "hash_views", spy)
    store = ActivationStore(copy, HP, target=Y, batch_size=64, shuffle_buffer_rows=128)
    it = iter(store)
    for _ in range(3 * len(store)):  # three epochs, many windows
        next(it)
    assert len(calls) == 6  # 3 shards x 2 hookpoints, each hashed before its first rows were served
    store.sample(300)
    store.rows()
    store.norm_stats(Y)
    again = ActivationStore(copy, Y, batch_size=64)
    next(iter(again))
    again.sample(10)
    assert len(calls) == 6
    store.tokens()
    store.tokens([1])
    cache_contexts(copy, None)
    assert len(calls) == 9  # + 3 tokens shards
    # a rewritten file is a new file: hashed again (once)
    path = _file(copy, HP, 1)
    tmp = path.with_name("x")
    shutil.copyfile(path, tmp)
    tmp.replace(path)
    ActivationStore(copy, HP).rows()
    ActivationStore(copy, HP).rows()
    assert len(calls) == 10
    # an explicit verify() hashes everything again
    ActivationStore(copy, HP, target=Y).verify()
    assert len(calls) == 19

"""Bad inputs: each gives a precise error naming the file and the fix, and nothing cached is lost."""

from __future__ import annotations

import errno
import json
import shutil
import struct

import pytest
import torch
import xxhash
from safetensors.torch import save_file

from sparsedict.cache import ActivationStore, CacheConfig, CacheError, CacheWriteError, cache_activations
from sparsedict.cache import writer as writer_mod


def _cfg(out, **kw) -> CacheConfig:
    base = dict(dataset="embedded-sample", hookpoints=["resid_post.1"], max_tokens=600, shard_rows=200,
                out_dir=str(out), progress=False, num_threads=1)  # fmt: skip
    return CacheConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return cache_activations(_cfg(tmp_path_factory.mktemp("ref") / "c"))


@pytest.fixture
def copy(reference, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(reference, dst)
    return dst


def _shard(root, i=1):
    return (
        root / json.loads((root / "manifest.json").read_text())["shards"][i]["files"]["resid_post.1"]["file"]
    )


def test_other_config_refused(reference):
    with pytest.raises(CacheError, match=r"another config.*hookpoints.*resid_post\.1.*resid_post\.2"):
        cache_activations(_cfg(reference, hookpoints=["resid_post.2"]))
    # same config again: a no-op resume (only runtime fields changed)
    assert cache_activations(_cfg(reference, batch_size=3)) == reference


def test_missing_shard(copy):
    path = _shard(copy)
    path.unlink()
    with pytest.raises(
        CacheError, match=rf"{path} listed in the manifest is missing; fix: run `sparsedict cache verify"
    ):
        ActivationStore(copy, "resid_post.1")


def test_truncated_shard(copy):
    path = _shard(copy)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(
        CacheError, match=rf"{path} is truncated.*fix: run `sparsedict cache verify {copy} --repair`"
    ):
        ActivationStore(copy, "resid_post.1")


def test_corrupt_header(copy):
    path = _shard(copy)
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"{path} has a corrupt header"):
        ActivationStore(copy, "resid_post.1")


def test_checksum_mismatch(copy):
    path = _shard(copy)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01  # one flipped bit in the activations
    path.write_bytes(bytes(data))
    store = ActivationStore(copy, "resid_post.1", batch_size=50)  # cheap checks pass at open
    with pytest.raises(CacheError, match=rf"{path} fails its xxh3_128 check"):
        next(iter(store))  # the first batch already mixes rows of every shard
    with pytest.raises(CacheError, match="xxh3_128"):
        ActivationStore(copy, "resid_post.1").verify()


def test_dtype_and_dim_mismatch(copy):
    path = _shard(copy)
    rows = json.loads((copy / "manifest.json").read_text())["shards"][1]["rows"]
    save_file({"activations": torch.zeros(rows, 576, dtype=torch.float16)}, str(path))
    with pytest.raises(CacheError, match=rf"{path}.*F16\[{rows}, 576\] but the manifest says F32.*mismatch"):
        ActivationStore(copy, "resid_post.1")
    save_file({"activations": torch.zeros(rows, 575)}, str(path))
    with pytest.raises(CacheError, match=rf"{path}.*F32\[{rows}, 575\].*F32\[{rows}, 576\]"):
        ActivationStore(copy, "resid_post.1")


def test_nan_in_shard(copy):
    """A shard that holds NaN under a valid digest (as a writer before the NaN check could leave it)."""
    path = _shard(copy)
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n + 4 * 5 : 8 + n + 4 * 6] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(data))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][1]["files"]["resid_post.1"]["xxh3_128"] = xxhash.xxh3_128_hexdigest(bytes(data))
    (copy / "manifest.json").write_text(json.dumps(manifest))
    store = ActivationStore(copy, "resid_post.1", batch_size=50, loop=False)
    with pytest.raises(CacheError, match=rf"{path} holds NaN/inf"):
        list(store)


def test_nan_from_model_not_written(tmp_path, monkeypatch):
    from sparsedict.cache import hooks

    real = hooks.record

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return {k: v * float("inf") for k, v in out.items()}

    monkeypatch.setattr(hooks, "record", poisoned)
    with pytest.raises(CacheError, match=r"NaN/inf activations.*shard 0.*000000\.safetensors not written"):
        cache_activations(_cfg(tmp_path / "c"))
    assert not list((tmp_path / "c").glob("shards/resid_post.1/*.safetensors"))


def test_disk_full_keeps_done_shards_and_resumes(tmp_path, monkeypatch, reference):
    real, calls = writer_mod._write_bytes, []

    def flaky(path, data):
        calls.append(path)
        if len(calls) == 4:  # shard 0 (activations, tokens) done, shard 1 activations ok, its tokens fail
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(writer_mod, "_write_bytes", flaky)
    out = tmp_path / "c"
    with pytest.raises(
        CacheWriteError, match=r"tokens/000001\.safetensors \(the disk is full.*1 shard\(s\) already"
    ):
        cache_activations(_cfg(out))
    assert (out / "shards/_receipts/000000.json").exists() and not (
        out / "shards/_receipts/000001.json"
    ).exists()
    assert not list(out.glob("shards/**/.*tmp*")), "temp file left behind"
    monkeypatch.setattr(writer_mod, "_write_bytes", real)
    cache_activations(_cfg(out))
    got = json.loads((out / "manifest.json").read_text())
    want = json.loads((reference / "manifest.json").read_text())
    assert got["status"] == "complete"
    assert [s["files"] for s in got["shards"]] == [s["files"] for s in want["shards"]]

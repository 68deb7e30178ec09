"""Our checkpoint format, the model card, hub loading from an offline HF cache, push_to_hub, convert CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsedict.cli import main as cli_main
from sparsedict.dictionaries import build, from_pretrained, lookup, save_pretrained
from sparsedict.formats import FormatError
from sparsedict.hub import push_to_hub

D, N, K = 16, 64, 4
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def topk_model(seed=0):
    torch.manual_seed(seed)
    _, cfg_cls = lookup("topk")
    model = build(cfg_cls(d_in=D, n_latents=N, k=K, hookpoint="resid_post.3"))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 1.0)
    return model.eval()


def outputs(model, seed=1):
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(seed)) * 2
    with torch.no_grad():
        code = model.encode(x)
        return code.to_dense(), model.decode(code, x)


META = {
    "model": "HuggingFaceTB/SmolLM2-135M",
    "training_tokens": 12_500_000,
    "metrics": {"fvu": 0.1234, "l0": 4.0, "dead_fraction": 0.015625, "ce_loss_recovered": 0.91},
}


def test_save_load_roundtrip_and_model_card(tmp_path):
    model = topk_model()
    path = save_pretrained(model, tmp_path / "ckpt", META)
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((path / "config.json").read_text())
    assert (
        cfg["architecture"] == "topk"
        and "sparsedict_version" in cfg
        and cfg["meta"]["training_tokens"] == 12_500_000
    )
    back = from_pretrained(path)
    for a, b in zip(outputs(model), outputs(back)):
        torch.testing.assert_close(a, b)
    assert back.meta["metrics"]["fvu"] == 0.1234
    card = (path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sparsedict")
    assert "base_model: HuggingFaceTB/SmolLM2-135M" in card
    for needle in ["| architecture | topk |", "| hookpoint (input) | resid_post.3 |", "| latents | 64 |", "| k | 4 |",
                   "| training tokens | 12,500,000 |", "| fvu | 0.1234 |", "| ce_loss_recovered | 0.91 |"]:  # fmt: skip
        assert needle in card, needle
    # Without metrics the card says so instead of inventing numbers.
    card2 = (save_pretrained(model, tmp_path / "bare", {}) / "README.md").read_text()
    assert "No evaluation metrics were recorded" in card2 and "| training tokens | not recorded |" in card2


def test_our_format_errors(tmp_path):
    path = save_pretrained(topk_model(), tmp_path / "ckpt")
    sd = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if k != "b_enc"}, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \['b_enc'\]"):
        from_pretrained(path)
    save_file({**sd, "W_dec": sd["W_dec"][:-1].contiguous()}, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"W_dec has shape \[63, 16\] but config.json implies \[64, 16\]"):
        from_pretrained(path)
    with pytest.raises(ValueError, match=r"revision.*applies to hub repos"):
        from_pretrained(path, revision="main")


def test_unknown_format_lists_expected_files(tmp_path):
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "weights.bin").write_bytes(b"\0")
    with pytest.raises(FormatError) as err:
        from_pretrained(tmp_path / "weird")
    msg = str(err.value)
    for expected in ["weights.bin", "cfg.json + sae_weights.safetensors", "cfg.json + sae.safetensors", "ae.pt + config.json",
                     "config.json (with 'sparsedict_version') + model.safetensors"]:  # fmt: skip
        assert expected in msg
    with pytest.raises(FileNotFoundError, match="give a local directory"):
        from_pretrained(tmp_path / "does" / "not" / "exist")


def _fake_hf_cache(home: Path, repo: str, files: dict[str, Path]) -> Path:
    """HF cache layout: hub/models--org--name/{refs/main, snapshots/<commit>/<files>} (plain files, no blobs)."""
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / COMMIT
    for rel, src in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).write_bytes(src.read_bytes())
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snap


def test_hub_loading_from_offline_cache(tmp_path):
    model = topk_model()
    ours = save_pretrained(model, tmp_path / "ours", META)
    sp = tmp_path / "sp"
    sp.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"encoder.weight": torch.randn(N, D, generator=g), "encoder.bias": torch.zeros(N),
               "W_dec": torch.randn(N, D, generator=g), "b_dec": torch.randn(D, generator=g)}, str(sp / "sae.safetensors"))  # fmt: skip
    (sp / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": N, "k": K, "d_in": D}))
    home = tmp_path / "hf_home"
    _fake_hf_cache(
        home, "org/our-sae", {f: ours / f for f in ("config.json", "model.safetensors", "README.md")}
    )
    _fake_hf_cache(
        home, "org/sparsify-run", {f"layers.3/{f}": sp / f for f in ("cfg.json", "sae.safetensors")}
    )
    script = textwrap.dedent(f"""
        import json, sys, torch
        from safetensors.torch import save_file
        from sparsedict import from_pretrained
        x = torch.randn(32, {D}, generator=torch.Generator().manual_seed(1)) * 2
        out, errors = {{}}, {{}}
        for name, kw in [("ours", dict(path_or_repo_id="org/our-sae")),
                         ("ours_rev", dict(path_or_repo_id="org/our-sae", revision="{COMMIT}")),
                         ("sparsify", dict(path_or_repo_id="org/sparsify-run", subfolder="layers.3"))]:
            m = from_pretrained(**kw)
            with torch.no_grad():
                out[name] = m.decode(m.encode(x), x)
        for name, kw in [("run", dict(path_or_repo_id="org/sparsify-run")),
                         ("missing", dict(path_or_repo_id="org/not-cached"))]:
            try:
                from_pretrained(**kw)
            except Exception as err:
                errors[name] = type(err).__name__ + ": " + str(err)
        save_file(out, sys.argv[1])
        print(json.dumps(errors))
    """)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.safetensors")], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    errors = json.loads(res.stdout.strip().splitlines()[-1])
    got = load_file(str(tmp_path / "out.safetensors"))
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        ref = model.decode(model.encode(x), x)
        sp_model = from_pretrained(sp)
        ref_sp = sp_model.decode(sp_model.encode(x), x)
    torch.testing.assert_close(got["ours"], ref)
    torch.testing.assert_close(got["ours_rev"], ref)
    torch.testing.assert_close(got["sparsify"], ref_sp)
    assert "FormatError" in errors["run"] and "subfolder=<name>, one of: layers.3" in errors["run"]
    assert "FileNotFoundError" in errors["missing"] and "HF_HUB_OFFLINE is set" in errors["missing"]


def test_push_to_hub_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set"):
        push_to_hub(topk_model(), "org/name")


def test_push_to_hub_uploads_checkpoint_folder(monkeypatch, tmp_path):
    """No network here: HfApi's two calls are intercepted and the folder they would upload is inspected."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, **kw):
        calls["create"] = (repo_id, private, exist_ok)

    def upload_folder(
        self, repo_id, folder_path, path_in_repo=None, commit_message=None, revision=None, **kw
    ):
        calls["upload"] = (repo_id, path_in_repo, commit_message)
        calls["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return "https://example.invalid/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = topk_model()
    url = push_to_hub(model, "me/smollm2-topk", meta=META, private=True)
    assert url.endswith("/commit/1") and calls["create"] == ("me/smollm2-topk", True, True)
    assert calls["upload"][0] == "me/smollm2-topk" and calls["upload"][1] is None
    assert set(calls["files"]) == {"config.json", "model.safetensors", "README.md"}
    card = calls["files"]["README.md"].decode()
    assert (
        "# me/smollm2-topk" in card
        and 'from_pretrained("me/smollm2-topk")' in card
        and "| fvu | 0.1234 |" in card
    )
    pushed = tmp_path / "pushed"
    pushed.mkdir()
    for name, data in calls["files"].items():
        (pushed / name).write_bytes(data)
    for a, b in zip(outputs(model), outputs(from_pretrained(pushed))):
        torch.testing.assert_close(a, b)


def _saelens_dir(path: Path) -> Path:
    g = torch.Generator().manual_seed(2)
    path.mkdir(parents=True)
    save_file({"W_enc": torch.randn(D, N, generator=g), "b_enc": torch.randn(N, generator=g) * 0.1,
               "W_dec": torch.randn(N, D, generator=g), "b_dec": torch.randn(D, generator=g)},
              str(path / "sae_weights.safetensors"))  # fmt: skip
    cfg = {"architecture": "topk", "d_in": D, "d_sae": N, "k": K, "dtype": "float32", "apply_b_dec_to_input": True,
           "metadata": {"model_name": "gpt2", "hook_name": "blocks.5.hook_resid_pre", "sae_lens_version": "6.5.0"}}  # fmt: skip
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def convert_main(argv: list[str]) -> int:
    return cli_main(["convert", *argv])


def test_convert_cli(tmp_path, capsys):
    src = _saelens_dir(tmp_path / "saelens")
    assert convert_main([str(src), str(tmp_path / "ours")]) == 0
    assert "verified on 256 random inputs" in capsys.readouterr().out
    ours = from_pretrained(tmp_path / "ours")
    assert ours.meta["source_format"] == "saelens" and ours.cfg.hookpoint == "resid_pre.5"
    assert "| converted from | saelens |" in (tmp_path / "ours" / "README.md").read_text()
    assert convert_main([str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "saelens"]) == 0
    cfg = json.loads((tmp_path / "back" / "cfg.json").read_text())
    assert (
        cfg["metadata"]["hook_name"] == "blocks.5.hook_resid_pre"
        and cfg["metadata"]["sae_lens_version"] == "6.0.0"
    )
    for a, b in zip(outputs(from_pretrained(src)), outputs(from_pretrained(tmp_path / "back"))):
        torch.testing.assert_close(a, b)
    # Refuses to overwrite, and unknown targets are errors.
    assert convert_main([str(src), str(tmp_path / "ours")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert convert_main([str(src), str(tmp_path / "x"), "--to", "onnx"]) == 2
    assert "--to must be one of sparsedict, saelens" in capsys.readouterr().err

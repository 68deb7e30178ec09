"""A built wheel works like a checkout: it holds the kernels folder and the package data, and
``sparsedict quickstart`` runs from an unrelated directory in a clean venv that has only the wheel."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_kernels_folder():
    import sparsedict.kernels as k

    assert Path(k.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    assert callable(k.topk_encode) and callable(k.sparse_decode)


def test_quickstart_recipe_has_one_copy():
    from sparsedict.data import QUICKSTART_RECIPE

    link = ROOT / "recipes" / "smollm2-135m" / "quickstart.yaml"
    assert link.is_symlink() and link.resolve() == QUICKSTART_RECIPE


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy of the source: setuptools reuses a build/ folder, and one left over from an older
    # layout would put stale modules into the wheel (and this one would litter the checkout).
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".*_cache"))  # fmt: skip
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp),
                    str(src)], check=True)  # fmt: skip
    (path,) = tmp.glob("sparsedict-*.whl")
    return path


@pytest.mark.slow
def test_built_wheel_contains_kernels_and_data(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("sparsedict/kernels/topk_encode.py", "sparsedict/kernels/__init__.py", "sparsedict/cli/train.py",
                 "sparsedict/data/quickstart.yaml", "sparsedict/data/corpus_sample.jsonl", "sparsedict/cli/inspect.py",
                 "sparsedict/inspect/static/browser.js", "sparsedict/inspect/static/browser.css"):  # fmt: skip
        assert name in names, name
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)  # fmt: skip
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import sparsedict.kernels as k, torch;"
        "assert sys.argv[1] in k.__file__, k.__file__;"
        "v, i = k.topk_encode(torch.randn(3, 4), torch.randn(4, 8), torch.zeros(8), 2);"
        "print(tuple(v.shape))"
    )
    # run outside the repo so the editable install's path mapping cannot be what we import
    out = subprocess.run(
        [sys.executable, "-I", "-c", code, str(target)], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(3, 2)"


@pytest.mark.slow
def test_wheel_in_a_clean_venv_runs_the_quickstart(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    (venv_site,) = (Path(p) for p in subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True,
        check=True).stdout.split())  # fmt: skip
    # The dependencies come from this environment's site-packages, listed as plain paths: the .pth files
    # there (this checkout's editable install among them) are not processed, so only the wheel provides
    # sparsedict and nothing is downloaded.
    (venv_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPARSEDICT_DEBUG")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)],
                   check=True, env=env)  # fmt: skip
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([py, "-c", "import sparsedict.cli, sparsedict.data as d; print(d.QUICKSTART_RECIPE)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert where.startswith(str(venv_site)), where
    cmd = [str(venv / "bin" / "sparsedict"), "quickstart", "--out_dir", "qs", "--cache.dataset", "embedded-sample",
           "--eval_cache.dataset", "embedded-sample", "--cache.max_tokens", "600", "--eval_cache.max_tokens", "300",
           "--train.batch_size", "200", "--train.init_rows", "600", "--train.warmup_steps", "1",
           "--dictionaries.0.expansion", "1"]  # fmt: skip
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "[1/5] caching activations of smollm2-135m at ['resid_post.6']" in res.stdout
    assert "identical codes and reconstructions" in res.stdout and "FVU" in res.stdout
    assert (work / "qs" / "cache-train" / "manifest.json").exists()
    assert (work / "qs" / "train" / "topk-resid_post.6" / "model.safetensors").exists()
    assets = work / "qs" / "inspect" / "assets"  # the browser, its script shipped as package data
    assert (assets / "browser.js").read_text().startswith("/* sparsedict feature browser")
    assert not (ROOT / "qs").exists()

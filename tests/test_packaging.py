"""`sparsedict.kernels` (the top-level kernels/ folder) imports from an editable install and a built wheel."""

from __future__ import annotations

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


@pytest.mark.slow
def test_built_wheel_contains_and_imports_kernels(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(ROOT)],
        check=True,
    )
    (wheel,) = wheel_dir.glob("sparsedict-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sparsedict/kernels/topk_encode.py" in names and "sparsedict/kernels/__init__.py" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import sparsedict.kernels as k, torch;"
        "assert sys.argv[1] in k.__file__, k.__file__;"
        "v, i = k.topk_encode(torch.randn(3, 4), torch.randn(4, 8), torch.zeros(8), 2);"
        "print(tuple(v.shape))"
    )
    # run outside the repo so the editable install's path mapping cannot be what we import
    out = subprocess.run([sys.executable, "-I", "-c", code, str(target)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(3, 2)"

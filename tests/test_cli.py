"""The command line: one flag syntax for every command, and every input error as one clean line.

The error cases run the real ``python -m sparsedict`` in a subprocess and check what a user sees: exit
code 2, exactly one line on stderr naming the problem, no traceback (unless ``SPARSEDICT_DEBUG=1``).
The flag-syntax cases parse in-process (they start no model).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsedict.cli import COMMANDS, main
from sparsedict.cli.cache import build_config
from sparsedict.cli.train import parse_run
from sparsedict.config import ConfigError, parse_cli
from sparsedict.data import QUICKSTART_RECIPE
from sparsedict.sweep import ParetoConfig

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "smollm2-135m" / "quickstart.yaml")


def _run(*args: str, cwd: Path, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SPARSEDICT_DEBUG", None)
    if debug:
        env["SPARSEDICT_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "sparsedict", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.fixture
def typo_recipe(tmp_path) -> Path:
    text = Path(QUICKSTART).read_text().replace("  batch_size: 1024", "  batchsize: 1024")
    assert "batchsize" in text
    (tmp_path / "typo.yaml").write_text(text)
    return tmp_path / "typo.yaml"


ERRORS = {  # name: (argv, fragments the one stderr line must hold)
    "recipe key typo": (["train", "typo.yaml"], ["sparsedict train:", "unknown key 'train.batchsize'",
                                                 "did you mean 'batch_size'"]),
    "flag typo": (["train", QUICKSTART, "--train.lrr", "1e-3"], ["unknown flag --train.lrr",
                                                                "did you mean '--train.lr'"]),
    "missing recipe": (["train", "missing.yaml"], ["recipe missing.yaml does not exist"]),
    "missing checkpoint": (["eval", "no/such/checkpoint"], ["sparsedict eval:", "no checkpoint at no/such/checkpoint"]),
    "unparsable value": (["train", QUICKSTART, "--train.lr", "fast"], ["--train.lr", "invalid float value: 'fast'"]),
    "refused value": (["cache", "--max-tokens", "0"], ["sparsedict cache:", "max_tokens must be >= 1"]),
    "unknown command": (["trian"], ["unknown command 'trian'", "did you mean 'train'"]),
    # the real CLI reads a YAML list and dashed flags: the refusal quotes the parsed list back
    "list and dashes": (["train", QUICKSTART, "--cache.max-tokens", "500", "--cache.hookpoints",
                         "[resid_post.6, mlp_out.6]", "--dictionaries.0.hookpoint", "mlp_out.7"],
                        ["'mlp_out.7' is not cached; cache.hookpoints = ['resid_post.6', 'mlp_out.6']"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_clean_line(case, tmp_path, typo_recipe):
    argv, fragments = ERRORS[case]
    res = _run(*argv, cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and not res.stdout.strip()
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_debug_env_var_shows_the_traceback(tmp_path, typo_recipe):
    res = _run("train", "typo.yaml", cwd=tmp_path, debug=True)
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "ConfigError: unknown key 'train.batchsize'" in res.stderr


def test_train_flags_override_the_recipe():
    recipe, opts = parse_run(
        [QUICKSTART, "--train.lr", "3e-4", "--dictionaries.0.k", "64", "--cache.max_tokens", "2000",
         "--eval_cache.split", "train", "--eval_cache.max_tokens", "None", "--train.betas", "0.8", "0.99",
         "--no_resume"], "t", ""
    )  # fmt: skip
    (d,) = recipe.dictionaries
    assert recipe.train.lr == 3e-4 and d.k == 64 and d.expansion == 8 and d.name == "topk-resid_post.6"
    assert recipe.cache.max_tokens == 2000 and recipe.eval_cache.split == "train"
    assert recipe.eval_cache.max_tokens is None  # YAML's null: the whole split
    assert recipe.eval_cache.exclude_first_n == 2 and recipe.train.batch_size == 1024  # the recipe's values
    assert recipe.train.betas == (0.8, 0.99) and opts.no_resume


def test_dashes_equal_underscores():
    dashed, _ = parse_run([QUICKSTART, "--train.max-steps", "7", "--cache.max-tokens", "99", "--no-resume",
                           "--eval-cache.exclude-first-n", "1", "--out-dir", "/tmp/x"], "t", "")  # fmt: skip
    under, _ = parse_run([QUICKSTART, "--train.max_steps", "7", "--cache.max_tokens", "99", "--no_resume",
                          "--eval_cache.exclude_first_n", "1", "--out_dir", "/tmp/x"], "t", "")  # fmt: skip
    assert dataclasses.asdict(dashed) == dataclasses.asdict(under)
    assert (
        dashed.train.max_steps == 7
        and dashed.cache.max_tokens == 99
        and dashed.eval_cache.exclude_first_n == 1
    )
    assert build_config(["--max-tokens", "5"]) == build_config(["--max_tokens", "5"])


@pytest.mark.parametrize(
    "form",
    [["resid_post.6", "mlp_out.6"], ["[resid_post.6, mlp_out.6]"], ['["resid_post.6","mlp_out.6"]'],
     ["=[resid_post.6,mlp_out.6]"]],
    ids=["words", "yaml", "json", "equals"],
)  # fmt: skip
def test_list_flags_take_words_or_a_list(form):
    argv = [f"--hookpoints{form[0]}"] if form[0].startswith("=") else ["--hookpoints", *form]
    assert build_config(argv).hookpoints == ["resid_post.6", "mlp_out.6"]
    recipe, _ = parse_run(
        [QUICKSTART, *(a.replace("--hookpoints", "--cache.hookpoints") for a in argv)], "t", ""
    )
    assert recipe.cache.hookpoints == ["resid_post.6", "mlp_out.6"]
    with pytest.raises(ConfigError, match="not a list"):
        build_config(["--hookpoints", "[resid_post.6, mlp_out.6"])


def test_architecture_flag_picks_the_config_class():
    recipe, _ = parse_run([QUICKSTART, "--dictionaries.1.architecture", "relu", "--dictionaries.1.l1_coefficient",
                           "3", "--dictionaries.1.expansion", "2"], "t", "")  # fmt: skip
    topk, relu = recipe.dictionaries
    assert type(relu).__name__ == "ReLUConfig" and relu.l1_coefficient == 3 and relu.expansion == 2
    assert relu.name == "relu-resid_post.6" and relu.hookpoint == "resid_post.6" and topk.k == 32
    with pytest.raises(ConfigError, match=r"unknown flag --dictionaries\.0\.l1_coefficient"):
        parse_run([QUICKSTART, "--dictionaries.0.l1_coefficient", "3"], "t", "")  # a TopK has no L1
    with pytest.raises(ConfigError, match=r"unknown key 'dictionaries\[0\]\.k' for ReLUConfig"):
        parse_run([QUICKSTART, "--dictionaries.0.architecture", "relu"], "t", "")  # the recipe's k: 32 stays
    with pytest.raises(ConfigError, match=r"numbered 0\.\.0"):
        parse_run([QUICKSTART, "--dictionaries.2.architecture", "relu"], "t", "")


def test_run_directory_moves_every_output_but_explicit_flags_win():
    recipe, _ = parse_run(
        ["--out_dir", "/tmp/qs", "--train.out_dir", "/tmp/elsewhere"], "q", "", QUICKSTART_RECIPE
    )
    assert recipe.cache.out_dir == "/tmp/qs/cache-train" and recipe.eval_cache.out_dir == "/tmp/qs/cache-test"
    assert recipe.train.out_dir == "/tmp/elsewhere"
    assert recipe.source == str(QUICKSTART_RECIPE)


def test_recipe_free_train_from_flags():
    recipe, _ = parse_run(
        ["--cache.hookpoints", "resid_post.3", "--dictionaries.0.architecture", "topk"], "t", ""
    )
    assert recipe.cache.hookpoints == ["resid_post.3"] and recipe.dictionaries[0].hookpoint == "resid_post.3"
    assert recipe.eval_cache is None  # neither in a recipe nor flagged
    with pytest.raises(ConfigError, match="no dictionaries"):
        parse_run(["--cache.hookpoints", "resid_post.3"], "t", "")


def test_pareto_composes_the_stage_configs():
    cfg = parse_cli(ParetoConfig, ["--cache.max-tokens", "2000", "--train.batch_size", "256", "--eval.splice_tokens",
                                   "0", "--sweep", "[topk:k=4, relu:l1_coefficient=3]"], "p")  # fmt: skip
    assert cfg.cache.max_tokens == 2000 and cfg.train.batch_size == 256 and cfg.eval.splice_tokens == 0
    assert cfg.sweep == ["topk:k=4", "relu:l1_coefficient=3"]
    # every point trains with the package defaults (each architecture's preset and normalisation)
    assert (
        cfg.train.optimizer == "auto"
        and cfg.train.normalise_inputs == "auto"
        and cfg.eval.max_tokens == 10_000
    )
    with pytest.raises(ConfigError, match="one hookpoint"):
        parse_cli(ParetoConfig, ["--cache.hookpoints", "resid_post.3", "resid_post.4"], "p")
    tc = parse_cli(
        ParetoConfig, ["--cache.hookpoints", "mlp_in.3", "mlp_out.3", "--target", "mlp_out.3"], "p"
    )
    assert tc.target == "mlp_out.3"  # a transcoder sweep reads its input and its target


def test_help_shows_field_docstrings(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", QUICKSTART, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for doc in ("Tokens per optimiser step", "warmup <= 10 % of the run", "Active latents per token",
                "--dictionaries.0.k int", "--cache.max-tokens", "--eval_cache.split", "(default: 1024)"):  # fmt: skip
        assert doc in text, doc


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help(name, capsys):
    module = importlib.import_module(COMMANDS[name][0])
    with pytest.raises(SystemExit) as exit_:
        module.main(["pareto", "--help"] if name == "bench" else ["--help"])
    assert exit_.value.code == 0
    assert f"usage: sparsedict {name}" in capsys.readouterr().out

"""Config plumbing: strict recipes (unknown keys name the nearest valid key)."""

from __future__ import annotations

import pytest

from sparsedict.config import ConfigError
from sparsedict.dictionaries.topk import TopKConfig
from sparsedict.train.recipe import parse_recipe

BASE = {
    "cache": {"hookpoints": ["resid_post.6"], "max_tokens": 1000},
    "train": {"batch_size": 256},
    "dictionaries": [{"architecture": "topk", "k": 8}],
}


def _with(**changes):
    import copy

    data = copy.deepcopy(BASE)
    for path, value in changes.items():
        section, key = path.split("__")
        if section == "dict":
            data["dictionaries"][0][key] = value
        else:
            data[section][key] = value
    return data


def test_valid_recipe_parses_and_fills_hookpoint():
    recipe = parse_recipe(_with())
    (cfg,) = recipe.dictionaries
    assert isinstance(cfg, TopKConfig) and cfg.k == 8 and cfg.hookpoint == "resid_post.6"
    assert cfg.name == "topk-resid_post.6" and recipe.train.batch_size == 256


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with(train__batchsize=3), "unknown key 'train.batchsize'.*did you mean 'batch_size'"),
        (_with(dict__kk=3), r"unknown key 'dictionaries\[0\].kk'.*did you mean 'k'"),
        (_with(dict__architecture="topkk"), "did you mean 'topk'"),
        (_with(cache__max_tokenz=5), "did you mean 'max_tokens'"),
        (_with(train__optimizer="sgd"), "optimizer must be 'adam' or 'signum_sf'"),
        (_with(dict__hookpoint="resid_post.7"), "not cached"),
        ({**BASE, "trian": {}}, "unknown section 'trian'.*did you mean 'train'"),
    ],
)
def test_bad_recipes_name_the_problem(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe(data)

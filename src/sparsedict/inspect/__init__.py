"""Look at the features: per-latent statistics, max-activating contexts, logit lens, a static browser.

One streaming pass over an activation cache (dictionaries on the same hookpoint share it) computes,
per latent, firing density, mean and max activation, a log-spaced activation histogram, the exact
top-N activating examples and a random sample of firings shown in activation-quantile bands; each
example is a token window rebuilt from the cache's stored token ids with the latent's activation on
every token (positions the cache excluded have none). The decoder logit lens and nearest features by
decoder cosine follow. Outputs: arrays (safetensors + JSON), a static HTML browser, and optionally
Neuronpedia's export layout and a delphi latent cache::

    from sparsedict.inspect import inspect
    index = inspect(checkpoints=["runs/q/train/topk-resid_post.6"], cache="runs/q/cache-test", out="runs/q/inspect")

or ``sparsedict inspect <checkpoint...> --cache DIR --out DIR``.
"""

from sparsedict.inspect.config import InspectConfig
from sparsedict.inspect.result import Inspection
from sparsedict.inspect.run import collect
from sparsedict.inspect.write import inspect

__all__ = ["InspectConfig", "Inspection", "collect", "inspect"]

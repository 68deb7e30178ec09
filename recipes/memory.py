"""Expected memory per GPU (and host RAM per rank) of the multi-GPU recipes; optionally measured.

    python recipes/memory.py                  # the table in recipes/README.md (arithmetic only)
    python recipes/memory.py --measure        # + three training steps of each recipe's largest dictionary
                                              #   (a TopK, or a CLT on [b, L, d] batches) on this GPU at
                                              #   its per-GPU size (fused kernels, bf16 autocast), peak bytes

Per dictionary with input dim d, output dim d_out, n latents, k active, on G GPUs (s = 1/G when latents
are sharded, else 1) and per-GPU batch b (B/G in data parallel, the whole B when sharded):
  state      = 16 · (n·(d + d_out + 1))·s + 16·d_out   fp32 params + grads + Adam m and v
  transient  = 4·n·d·s + 4·b·n·s + 16·b·(d + d_out)  one fp32 [n, d] gradient temporary (backward),
               dense fp32 pre-activations [b, n] (AuxK over the dead latents, worst case all dead),
               inputs/targets/reconstruction in fp32 and bf16
A cross-layer transcoder over L layers with F features per layer has L encoders and L(L+1)/2 decoder blocks:
  state      = 16 · (L·F·(d + 1) + L(L+1)/2 · F·d_out)·s + 16·L·d_out
  transient  = 4·F·L·d_out·s + 12·b·L·F·s + 16·b·L·(d + d_out)   the largest decoder's gradient temporary,
               dense pre-activations, activations and their gradient [b, L, F], and the [b, L, d] batch
A transcoder set (``layers`` on another architecture) is L dictionaries of the first kind.
The trainer steps dictionaries one after another, so a GPU needs Σ state + max transient.
Host RAM per rank for the ActivationStores (one per (hookpoint, target) pair): RAM_SLACK · (d + d_out) ·
itemsize · rows per store (the shuffle window in the cache's dtype; sparsedict.cache.store), at most
DEFAULT_WINDOW_ROWS = 262,144 rows by default (fewer when half the host's available memory divided among the
local ranks is smaller; train.shuffle_ram_gib sets it explicitly).
Model dimensions are the published configs of each model (no download needed).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
GPUS = 8
RECIPES = ("gpt2/resid-topk.yaml", "pythia-410m/resid-and-transcoder.yaml", "gemma-2-2b/resid-topk.yaml",
           "llama-3.1-8b/resid-topk.yaml", "llama-3.1-8b/resid-131k-sharded.yaml",
           "gemma-2-2b/clt-sharded.yaml")  # fmt: skip
# (d_model, d_mlp) from each model's config.json
DIMS = {
    "openai-community/gpt2": (768, 3072),
    "EleutherAI/pythia-410m": (1024, 4096),
    "google/gemma-2-2b": (2304, 9216),
    "meta-llama/Llama-3.1-8B": (4096, 14336),
}


@dataclass
class Row:
    recipe: str
    dictionaries: int
    state_gib: float
    transient_gib: float
    total_gib: float
    host_gib: float
    largest: Largest
    """The dictionary of the recipe that needs the most memory per GPU (what ``--measure`` trains)."""


@dataclass
class Largest:
    """One dictionary at its per-GPU size: a TopK of ``n`` latents, or a CLT of ``n`` features per layer over
    ``layers`` layers (a transcoder set counts as one member: its members are stepped one after another)."""

    d: int
    d_out: int
    n: int
    """Latents (a CLT: features per layer) on one GPU."""
    k: int
    b: int
    """Rows per GPU per step."""
    layers: int = 0
    """Layers of a cross-layer transcoder (0: a single-layer dictionary)."""
    activation: str = "topk"
    """A CLT's activation (its config's ``activation``)."""
    estimate: float = 0.0
    """Its state + transient per GPU in bytes (the formulas above)."""

    def describe(self) -> str:
        shape = f"{self.d}, {self.d_out}, {self.n}, {self.k}, {self.b}"
        return f"clt {self.activation} × {self.layers} layers: {shape}" if self.layers else f"topk: {shape}"


def hook_dim(model: str, hookpoint: str) -> int:
    d_model, d_mlp = DIMS[model]
    return d_mlp if hookpoint.startswith("mlp_hidden") else d_model


def clt_state(d: int, d_out: int, n: int, layers: int, s: float = 1.0) -> float:
    """State bytes of a cross-layer transcoder over ``layers`` layers of ``n`` features (``s``: share per GPU)."""
    L = layers
    return 16 * (L * n * (d + 1) + L * (L + 1) // 2 * n * d_out) * s + 16 * L * d_out


def estimate(path: Path, gpus: int = GPUS) -> Row:
    from sparsedict.train.recipe import load_recipe

    recipe = load_recipe(path)
    model, tc = recipe.cache.model, recipe.train
    s = 1 / gpus if tc.shard_latents else 1
    b = tc.batch_size if tc.shard_latents else tc.batch_size // gpus
    state, transients, largest = 0.0, [], None
    for cfg in recipe.dictionaries:
        d = hook_dim(model, cfg.hookpoint)
        d_out = hook_dim(model, cfg.target) if cfg.is_transcoder else d
        n = cfg.n_latents or cfg.expansion * d
        if cfg.architecture == "clt":
            L = len(cfg.layers)
            one = clt_state(d, d_out, n, L, s)
            state += one
            transients.append(4 * n * L * d_out * s + 12 * b * L * n * s + 16 * b * L * (d + d_out))
            spec = Largest(d, d_out, int(n * s), cfg.k, b, L, cfg.activation, one + transients[-1])
        else:
            one = 16 * n * (d + d_out + 1) * s + 16 * d_out
            state += max(1, len(cfg.layers)) * one  # a set: one per layer
            transients.append(4 * n * d * s + 4 * b * n * s + 16 * b * (d + d_out))
            spec = Largest(d, d_out, int(n * s), cfg.k, b, estimate=one + transients[-1])
        if largest is None or spec.estimate > largest.estimate:
            largest = spec
    import torch

    from sparsedict.cache.store import DEFAULT_WINDOW_ROWS, RAM_SLACK

    itemsize = torch.empty((), dtype=getattr(torch, recipe.cache.dtype)).element_size()
    # one store per (hookpoint, target) pair; a multi-layer pair reads all its layers' hookpoints
    sources = {
        c.source_key: [*c.hookpoints, *(c.targets if c.is_transcoder else [])] for c in recipe.dictionaries
    }
    row = sum(hook_dim(model, h) for cols in sources.values() for h in cols if h)
    host = RAM_SLACK * row * itemsize * DEFAULT_WINDOW_ROWS
    name = str(path.relative_to(path.parents[1]))
    total = state + max(transients)
    return Row(
        name, len(recipe.dictionaries), state / GIB, max(transients) / GIB, total / GIB, host / GIB, largest
    )


def measure(spec: Largest, steps: int = 3, device: str = "cuda") -> tuple[float, float]:
    """Peak GPU bytes of ``steps`` training steps of ``spec``'s dictionary alone: a TopK (AuxK active: every latent
    starts dead), or a cross-layer transcoder on ``[b, L, d]`` batches.

    Returns ``(state_gib, peak_gib)`` where state is 16·params (measured after the first step); the peak is 0
    off CUDA.
    """
    import tempfile

    import torch

    from sparsedict.dictionaries import build
    from sparsedict.dictionaries.clt import CLTConfig
    from sparsedict.dictionaries.topk import TopKConfig
    from sparsedict.train import TensorSource, TrainConfig, Trainer

    torch.manual_seed(0)
    d, d_out, n, k, b, L = spec.d, spec.d_out, spec.n, spec.k, spec.b, spec.layers
    rows = (b * steps, L) if L else (b * steps,)
    x = torch.randn(*rows, d)
    y = torch.randn(*rows, d_out) if L or d_out != d else None
    if L:  # layers 0..L-1 (the names only key the source)
        cfg = CLTConfig(layers=list(range(L)), hookpoint="mlp_in", target="mlp_out", activation=spec.activation,
                        k=k, n_latents=n)  # fmt: skip
    else:
        cfg = TopKConfig(hookpoint="h", target="t" if y is not None else "", n_latents=n, k=k)
    model = build(cfg.resolved(d, d_out))
    key = cfg.source_key
    with tempfile.TemporaryDirectory() as tmp:
        tc = TrainConfig(batch_size=b, max_steps=steps, device=device, autocast="bf16", dead_tokens=1,
                         out_dir=tmp, init_rows=min(4096, b * steps), log_every=10**9, lr=1e-4)  # fmt: skip
        src = TensorSource(x, y, batch_size=b)
        trainer = Trainer({"m": model}, {key: src}, tc)
        trainer.initialise()
        it = iter(src)
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            trainer.train_step({key: next(it)})
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        params = sum(p.numel() for p in model.parameters())
        trainer.logger.close()
    return 16 * params / GIB, peak / GIB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="measure the largest dictionary of each recipe")
    args = ap.parse_args(argv)
    root = Path(__file__).parent
    print(
        f"| recipe ({GPUS} GPUs) | dicts | Σ state GiB | max transient GiB | per GPU GiB | host RAM/rank GiB |"
    )
    print("|---|---|---|---|---|---|")
    rows = [estimate(root / r) for r in RECIPES]
    for r in rows:
        print(f"| {r.recipe} | {r.dictionaries} | {r.state_gib:.1f} | {r.transient_gib:.1f} | "
              f"{r.total_gib:.1f} | {r.host_gib:.1f} |")  # fmt: skip
    if args.measure:
        import torch

        print(
            f"\nmeasured on {torch.cuda.get_device_name()} (torch {torch.__version__}): one dictionary, 3 steps"
        )
        print(
            "| recipe | dictionary: d, d_out, n/GPU, k, b/GPU | state GiB | estimate GiB (state+transient) "
            "| peak GiB |"
        )
        print("|---|---|---|---|---|")
        for r in rows:
            state, peak = measure(r.largest)
            print(
                f"| {r.recipe} | {r.largest.describe()} | {state:.2f} | {r.largest.estimate / GIB:.2f} "
                f"| {peak:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

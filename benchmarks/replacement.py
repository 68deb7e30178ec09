"""Where the time of ``evaluate_replacement`` goes, and the CLT's per-forward decode cache, A/B in one process.

    python benchmarks/replacement.py [--layers 3 4 5 6] [--n 2304] [--k 16] [--contexts 4] [--rounds 3]

``evaluate_replacement`` runs, per batch of contexts, one clean forward, a zero- and a mean-ablation forward for
the replacement model and for each layer alone (2·(1 + L)), and one forward per model and variant (1 + L each):
it prints that count. Then, alternating in one process (median of ``--rounds``): one forward of SmolLM2-135M on
``--contexts`` contexts of 128 tokens clean, with a TopK CLT replacing every MLP of the range (decoding each
layer's code once per forward, "cache", or once per output it writes, "no cache": what ``decode_layer`` did
without its ``contributions`` dict), and with a TopK transcoder set; and the decode alone of all the outputs of
one forward for L = 4 and 12 layers (512 rows). Times are wall-clock seconds; state the load beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from sparsedict.dictionaries import CLTConfig, TranscoderSet, build
from sparsedict.dictionaries.attach import LayeredAttachment
from sparsedict.dictionaries.clt import CLT
from sparsedict.dictionaries.topk import TopKConfig
from sparsedict.lm import load_model


def _no_cache(self, j, codes, x=None, contributions=None):
    return CLT.decode_layer(self, j, codes, x, None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 4, 5, 6])
    ap.add_argument("--n", type=int, default=2304)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    L = len(args.layers)
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    print(
        f"forwards per batch, one model: {1 + 2 * (1 + L) + (1 + L)}; two models: {1 + 2 * (1 + L) + 2 * (1 + L)}"
    )
    torch.manual_seed(0)
    lm, _ = load_model("smollm2-135m")
    clt = build(
        CLTConfig(layers=args.layers, activation="topk", n_latents=args.n, k=args.k).resolved(576)
    ).eval()
    tset = TranscoderSet(TopKConfig(layers=args.layers, hookpoint="mlp_in", target="mlp_out", n_latents=args.n,
                                    k=args.k).resolved(576)).eval()  # fmt: skip
    ids = torch.randint(100, 40_000, (args.contexts, 128), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)

    def forward(model=None, cache=True):
        if model is None:
            return lm(input_ids=ids, attention_mask=attn, use_cache=False).logits
        if not cache:
            model.decode_layer = _no_cache.__get__(model)
        try:
            with LayeredAttachment(model, lm, "splice"):
                return lm(input_ids=ids, attention_mask=attn, use_cache=False).logits
        finally:
            model.__dict__.pop("decode_layer", None)

    cases = {"clean": lambda: forward(), "CLT replacement, cache": lambda: forward(clt),
             "CLT replacement, no cache": lambda: forward(clt, cache=False), "PLT replacement": lambda: forward(tset)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        forward(clt)  # warm-up
        same = torch.equal(forward(clt), forward(clt, cache=False))
        for _ in range(args.rounds):
            for name, fn in cases.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    print(
        f"\none forward of {args.contexts} x 128 tokens (median of {args.rounds}; cache == no cache bitwise: {same})"
    )
    for name, ts in times.items():
        print(f"  {name:28s} {statistics.median(ts):7.3f} s   {[round(t, 3) for t in ts]}")

    print("\ndecode of every output of one forward, 512 rows (median of rounds)")
    for n_layers in (4, 12):
        m = build(
            CLTConfig(layers=list(range(n_layers)), activation="topk", n_latents=args.n, k=args.k).resolved(
                576
            )
        )
        x = torch.randn(512, n_layers, 576)
        with torch.no_grad():
            codes = [m.encode_layer(i, x[:, i]) for i in range(n_layers)]
            ab: dict[str, list[float]] = {"cache": [], "no cache": []}
            for _ in range(args.rounds):
                for name in ab:
                    t = time.perf_counter()
                    cache = {} if name == "cache" else None
                    for j in range(n_layers):
                        m.decode_layer(j, codes, x[:, j], {} if cache is None else cache)
                    ab[name].append(time.perf_counter() - t)
        blocks = n_layers * (n_layers + 1) // 2
        redone = sum((n_layers - i) * (n_layers - i) for i in range(n_layers))  # layer i decoded L - i times
        print(f"  L={n_layers:2d}: cache {statistics.median(ab['cache']):.4f} s ({blocks} decoder blocks), no cache "
              f"{statistics.median(ab['no cache']):.4f} s ({redone} blocks)")  # fmt: skip
        del m
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

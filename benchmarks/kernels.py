"""Kernel benchmark: fused Triton vs plain-torch reference, in one run, with ratios and memory.

    python benchmarks/kernels.py                 # issue shape set (GPU) / small reference set (CPU)
    python benchmarks/kernels.py --quick         # d=768, n=32768, k=32, B=4096 only
    python benchmarks/kernels.py --json rows.jsonl --dtype bfloat16
    python benchmarks/kernels.py --quick --tune  # + tile/threshold variants of the encode and grouped sums

Ops (registry ``OPS``): ``topk_encode`` (fwd / bwd / full), ``sparse_decode`` (fwd / bwd / full),
``normalised_adam`` (the decoder update, one mode) and ``topk_step`` (a whole TopK SAE training step:
encode, decode, MSE, backward, Adam on every parameter with the decoder-normalised update on W_dec).
Providers: ``ref`` (the plain-torch references in ``sparsedict.kernels``) and ``triton`` in variants
(``VARIANTS``): the encode forward algorithm (``topk_encode[merge]`` / ``topk_encode[filter]``, also for
``topk_step``) and the grouped W-gradient sums of the decode backward (``sparse_decode[tiled]`` = the
Triton kernel, ``sparse_decode[torch]`` = torch ``embedding_bag``). Every variant's line shows the same
``ref`` numbers and its speedup over them. Times are the p20/p50/p80 of ``triton.testing.do_bench`` on GPU
(a simple timer on CPU); memory is the peak allocated above what the inputs already hold. The encoder
GEMM roofline fraction = time of ``torch.matmul(x, W_enc)`` (same shape and dtype, measured in the same
run) / time of the fused encode forward, per algorithm; ``# best`` lines name the fastest variant.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from sparsedict.kernels import normalised_adam_step, sparse_decode, topk_encode

SHAPES_GPU = [(4096, d, m * d, k) for d in (576, 768, 2304, 4096) for m in (8, 32) for k in (32, 64)]
SHAPES_CPU = [(1024, 576, 4608, 32), (1024, 576, 4608, 64)]
QUICK = [(4096, 768, 32768, 32)]
QUICK_CPU = [(512, 576, 4608, 32)]


def timer(fn: Callable[[], object], cuda: bool, reps: int) -> list[float]:
    """(p20, p50, p80) in ms."""
    if cuda:
        from triton.testing import do_bench

        return list(do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=10, rep=60))
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    q = statistics.quantiles(ts, n=10) if len(ts) > 1 else ts * 9
    return [q[1], statistics.median(ts), q[7]]


def peak_mb(fn: Callable[[], object], cuda: bool) -> float | None:
    if not cuda:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# -- op registry: setup(B, d, n, k, dtype, device, provider) -> {mode: fn} ------------------------------


def _params(B, d, n, dtype, device, grad=True):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, d, device=device, generator=g).to(dtype)
    W_dec = torch.randn(n, d, device=device, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.contiguous().to(dtype).requires_grad_(grad)
    b_enc = torch.zeros(n, device=device, dtype=dtype, requires_grad=grad)
    return x, W_enc, b_enc, W_dec.to(dtype).requires_grad_(grad)


def setup_topk_encode(B, d, n, k, dtype, device, provider, algorithm=None):
    x, W_enc, b_enc, _ = _params(B, d, n, dtype, device)
    x.requires_grad_()
    g = torch.randn(B, k, device=device, dtype=dtype)
    kw = {"backend": provider, "algorithm": algorithm}

    def fwd():
        with torch.no_grad():
            return topk_encode(x, W_enc, b_enc, k, **kw)

    def full():
        v, _ = topk_encode(x, W_enc, b_enc, k, **kw)
        v.backward(g)

    v, _ = topk_encode(x, W_enc, b_enc, k, **kw)
    return {"fwd": fwd, "bwd": lambda: v.backward(g, retain_graph=True), "full": full}


def setup_sparse_decode(B, d, n, k, dtype, device, provider, **_):
    _, _, _, W_dec = _params(B, d, n, dtype, device)
    gen = torch.Generator(device=device).manual_seed(1)
    idx = torch.rand(B, n, device=device, generator=gen).topk(k, dim=-1).indices
    val = torch.rand(B, k, device=device, dtype=dtype, requires_grad=True)
    b_dec = torch.zeros(d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(B, d, device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            return sparse_decode(idx, val, W_dec, b_dec, backend=provider)

    def full():
        sparse_decode(idx, val, W_dec, b_dec, backend=provider).backward(g)

    out = sparse_decode(idx, val, W_dec, b_dec, backend=provider)
    return {"fwd": fwd, "bwd": lambda: out.backward(g, retain_graph=True), "full": full}


def setup_normalised_adam(B, d, n, k, dtype, device, provider, **_):
    W = torch.randn(n, d, device=device, dtype=torch.float32)
    W = (W / W.norm(dim=1, keepdim=True)).requires_grad_()
    W.grad = torch.randn_like(W) * 1e-3
    state: dict = {}
    return {"step": lambda: normalised_adam_step(W, state, 1e-4, backend=provider)}


def setup_topk_step(B, d, n, k, dtype, device, provider, algorithm=None):
    """A whole training step. Parameters fp32 (master), compute in ``dtype`` (cast per step, as autocast)."""
    x, W_enc, b_enc, W_dec = _params(B, d, n, torch.float32, device)
    b_dec = torch.zeros(d, device=device, requires_grad=True)
    x = x.to(dtype)
    opt = torch.optim.Adam([W_enc, b_enc, b_dec] + ([W_dec] if provider == "ref" else []), lr=1e-4)
    dec_state: dict = {}

    def step():
        xc = x - b_dec.to(dtype)
        v, i = topk_encode(xc, W_enc.to(dtype), b_enc.to(dtype), k, backend=provider, algorithm=algorithm)
        x_hat = sparse_decode(i, v, W_dec.to(dtype), b_dec.to(dtype), backend=provider)
        loss = (x_hat.float() - x.float()).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        W_dec.grad = None
        loss.backward()
        if provider == "ref":
            with torch.no_grad():  # the unfused decoder update: project, Adam, renormalise
                w = W_dec / (W_dec.norm(dim=1, keepdim=True) + 1e-8)
                W_dec.grad.sub_((W_dec.grad * w).sum(1, keepdim=True) * w)
            opt.step()
            with torch.no_grad():
                W_dec.div_(W_dec.norm(dim=1, keepdim=True) + 1e-8)
        else:
            opt.step()
            normalised_adam_step(W_dec, dec_state, 1e-4, backend=provider)

    return {"step": step}


OPS = {
    "topk_encode": setup_topk_encode,
    "sparse_decode": setup_sparse_decode,
    "normalised_adam": setup_normalised_adam,
    "topk_step": setup_topk_step,
}

# Triton variants per op: label -> options (``algorithm`` goes to topk_encode, ``gsum`` selects the grouped
# W-gradient sums of sparsedict.kernels.sparse_decode for the time of the measurement)
VARIANTS: dict[str, dict[str, dict]] = {
    "topk_encode": {"merge": {"algorithm": "merge"}, "filter": {"algorithm": "filter"}},
    "sparse_decode": {"tiled": {"gsum": "tiled"}, "torch": {"gsum": "torch"}},
    "normalised_adam": {"": {}},
    "topk_step": {"merge": {"algorithm": "merge"}, "filter": {"algorithm": "filter"}},
}


def _sd_module():
    return importlib.import_module("sparsedict.kernels.sparse_decode")


@contextlib.contextmanager
def variant_options(opts: dict):
    """Apply a variant's module-level options (the grouped-sum implementation) while it is measured."""
    mod = _sd_module()
    old = mod.GROUPED_SUM_IMPL
    if "gsum" in opts:
        mod.GROUPED_SUM_IMPL = opts["gsum"]
    try:
        yield
    finally:
        mod.GROUPED_SUM_IMPL = old


def machine_line(cuda: bool) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if cuda:
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = (
            f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True
        )
        info["commit"] = out.stdout.strip() or None
    except OSError:
        info["commit"] = None
    return info


def gemm_ms(B, d, n, dtype, device, cuda, reps) -> float:
    x = torch.randn(B, d, device=device, dtype=dtype)
    W = torch.randn(d, n, device=device, dtype=dtype)
    return timer(lambda: torch.matmul(x, W), cuda, reps)[1]


MERGE_TUNE = [  # (config, splits); the first is the default
    ({}, None),
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}, 4),
    ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}, 4),
]
FILTER_TUNE = [  # overrides of default_filter_config; the first is the default
    {},
    {"GROUP_M": 8},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"S": 8},
    {"S": 32},
    {"C": "4kS"},
    {"select": "torch"},
    {"slots": "scan"},
]
GSUM_TUNE = [  # grouped-sum tiles (sparse_decode.GROUPED_SUM_CONFIG overrides); the first is the default
    {},
    {"LAT_BLOCK": 16, "BLOCK_E": 32},
    {"LAT_BLOCK": 64, "BLOCK_E": 64},
    {"BLOCK_D": 256, "num_warps": 8},
    {"BLOCK_D": 64},
    {"LAT_BLOCK": 32, "BLOCK_E": 128, "num_warps": 8},
]


def tune(B, d, n, k, dtype, device, t_gemm: float, json_out=None, info=None) -> None:
    """Time the encode forward's algorithms and configs and the grouped-sum kernel's tiles; print one line
    each, then a ``# tune best`` line per group."""
    enc = importlib.import_module("sparsedict.kernels.topk_encode")
    shape = f"{B},{d},{n},{k}"
    x, W_enc, b_enc, _ = _params(B, d, n, dtype, device, grad=False)
    rows: list[tuple[float, str]] = []

    def record(group: str, label: str, fn) -> float | None:
        try:
            t = timer(fn, x.is_cuda, 2)[1]
        except Exception as e:  # one failing config must not end the run
            print(f"# tune {group} {shape} {label}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            return None
        if json_out:
            rec = {"op": f"tune_{group}", "shape": [B, d, n, k], "config": label, "ms_p50": t, **(info or {})}
            json_out.write(json.dumps(rec) + "\n")
        return t

    for cfg, splits in MERGE_TUNE:
        label = f"merge splits={splits} {cfg or 'default'}"
        t = record(
            "encode", label, lambda c=cfg, s=splits: enc.topk_encode_fwd(x, W_enc, b_enc, k, s, c, "merge")
        )
        if t is not None:
            rows.append((t, label))
            print(f"# tune encode {shape} {label}: {t:.3f} ms = {t_gemm / t:.0%} of GEMM", flush=True)
    S0 = enc.default_filter_config(k, n, dtype)["S"]
    t_a = record("encode", "filter stage A", lambda: enc.filter_threshold(x, W_enc, b_enc, k, S0))
    if t_a is not None:
        print(f"# tune encode {shape} filter stage A alone (sample GEMM + topk, S={S0}): {t_a:.3f} ms")
    for over in FILTER_TUNE:
        cfg = dict(over)
        if cfg.get("C") == "4kS":
            cfg["C"] = enc.next_pow2(4 * k * S0)
        full = {**enc.default_filter_config(k, n, dtype), **cfg}
        if "S" in cfg and "C" not in cfg:
            full["C"] = enc.next_pow2(2 * k * cfg["S"])
        label = f"filter {cfg or 'default'} (S={full['S']} C={full['C']})"
        stats: dict = {}
        try:
            enc.topk_encode_fwd(x, W_enc, b_enc, k, config=cfg, algorithm="filter", stats=stats)
            c = stats["counts"].float()
            fb = int(((c < k) | (c > full["C"])).sum())
            extra = f"; counts mean {c.mean():.0f} max {c.max():.0f}, fallback rows {fb}"
        except Exception as e:
            print(f"# tune encode {shape} {label}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        t = record("encode", label, lambda c=cfg: enc.topk_encode_fwd(x, W_enc, b_enc, k, None, c, "filter"))
        if t is not None:
            rows.append((t, label))
            print(f"# tune encode {shape} {label}: {t:.3f} ms = {t_gemm / t:.0%} of GEMM{extra}", flush=True)
    if rows:
        t, label = min(rows)
        print(
            f"# tune best encode fwd {shape}: {label}: {t:.3f} ms = {t_gemm / t:.0%} of the GEMM", flush=True
        )

    sd = _sd_module()
    gen = torch.Generator(device=device).manual_seed(1)
    idx = torch.rand(B, n, device=device, generator=gen).topk(k, dim=-1).indices
    coef = torch.rand(B, k, device=device, generator=gen).to(dtype)
    g = torch.randn(B, d, device=device, dtype=dtype)
    grows: list[tuple[float, str]] = []
    variants = [("tiled", c) for c in GSUM_TUNE] + [("torch", {})]
    for impl, cfg in variants:
        label = f"{impl} {cfg or 'default'}"
        t = record(
            "gsum",
            label,
            lambda i=impl, c=cfg: sd.segment_sum(idx, coef, g, n, out_dtype=dtype, impl=i, config=c),
        )
        if t is not None:
            grows.append((t, label))
            print(f"# tune grouped sum (dW_dec, incl. grouping) {shape} {label}: {t:.3f} ms", flush=True)
    if grows:
        t, label = min(grows)
        print(f"# tune best grouped sum {shape}: {label}: {t:.3f} ms", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only d=768, n=32768, k=32, B=4096 (smaller on CPU)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma list of {list(OPS)}")
    ap.add_argument(
        "--dtype",
        default="",
        choices=["", "bfloat16", "float32"],
        help="compute dtype (default: bf16 on GPU, fp32 on CPU)",
    )
    ap.add_argument("--json", default="", help="append one JSON row per measurement to this file")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU")
    ap.add_argument("--max-seconds", type=float, default=0, help="stop starting new shapes after this long")
    ap.add_argument("--tune", action="store_true", help="also time encode / grouped-sum configs (GPU)")
    ap.add_argument(
        "--variants",
        default="",
        help="comma list of Triton variant labels to run (default all: merge,filter,tiled,torch)",
    )
    ap.add_argument("--shape", action="append", default=[], help="B,d,n,k (repeatable) instead of the set")
    ap.add_argument(
        "--interpret",
        action="store_true",
        help="without a GPU: also run the Triton variants (and --tune) on CPU in Triton's interpreter "
        "(very slow, tiny shapes only: it checks the script, the times mean nothing)",
    )
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.interpret and not cuda:  # before triton is first imported (the interpreter binds at import)
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["SPARSEDICT_FORCE_TRITON"] = "1"
    tri = cuda or args.interpret
    device = "cuda" if cuda else "cpu"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    dtype = getattr(torch, args.dtype)
    if args.shape:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape]
    else:
        shapes = (QUICK if cuda else QUICK_CPU) if args.quick else (SHAPES_GPU if cuda else SHAPES_CPU)
    wanted = set(filter(None, args.variants.split(",")))
    info = machine_line(cuda)
    print("# machine:", json.dumps(info))
    if not tri:
        print("# no CUDA device: running the plain-torch reference only; the Triton numbers need a GPU")
    fout = open(args.json, "a") if args.json else None  # noqa: SIM115
    t_start = time.time()
    hdr = f"{'op':24} {'B,d,n,k':24} {'mode':5} {'ref p50 ms':>13} {'ref MB':>9}"
    if tri:
        hdr += f" {'triton p50 ms':>13} {'triton MB':>9}   speedup"
    print(hdr)
    for B, d, n, k in shapes:
        if args.max_seconds and time.time() - t_start > args.max_seconds:
            print(f"# stopped after {args.max_seconds:.0f}s (--max-seconds); remaining shapes not run")
            break
        shape = f"{B},{d},{n},{k}"
        t_gemm = gemm_ms(B, d, n, dtype, device, cuda, args.reps)
        tflops = 2 * B * d * n / t_gemm / 1e9
        best: dict[str, dict[str, float]] = {}  # "op mode" -> {variant: ms}
        for op in args.ops.split(","):
            runs = [("ref", "ref", {})]
            if tri:
                runs += [
                    (label, "triton", opts)
                    for label, opts in VARIANTS[op].items()
                    if not wanted or not label or label in wanted
                ]
            results: dict[str, dict[str, tuple[list[float], float | None]]] = {}
            for label, provider, opts in runs:
                try:
                    with variant_options(opts):
                        kw = {"algorithm": opts["algorithm"]} if "algorithm" in opts else {}
                        fns = OPS[op](B, d, n, k, dtype, device, provider, **kw)
                        results[label] = {
                            m: (timer(fn, cuda, args.reps), peak_mb(fn, cuda)) for m, fn in fns.items()
                        }
                except Exception as e:  # one failing provider must not end the run
                    results[label] = {}
                    print(f"# {op} {shape} {label or provider}: {type(e).__name__}: {str(e)[:200]}")
                finally:
                    if cuda:
                        torch.cuda.empty_cache()
            modes = next((list(r) for r in results.values() if r), [])
            ref = results.get("ref", {})
            for label, provider, _opts in runs[1:] if tri else runs:
                name = f"{op}[{label}]" if provider == "triton" and label else op
                for m in modes:
                    rq, rmb = ref.get(m, ([float("nan")] * 3, None))
                    line = f"{name:24} {shape:24} {m:5} {rq[1]:13.3f} {(f'{rmb:9.0f}' if rmb is not None else '        -')}"
                    if provider == "triton":
                        q, mb = results[label].get(m, ([float("nan")] * 3, None))
                        line += f" {q[1]:13.3f} {(f'{mb:9.0f}' if mb is not None else '        -')}"
                        line += f"   {rq[1] / q[1]:7.2f}x"
                        best.setdefault(f"{op} {m}", {})[label or "triton"] = q[1]
                    print(line, flush=True)
            if fout:
                for label, provider, _opts in runs:
                    for m, (q, mb) in results[label].items():
                        rec = {
                            "op": op,
                            "provider": provider,
                            "variant": label,
                            "mode": m,
                            "shape": [B, d, n, k],
                        }
                        rec.update({"dtype": args.dtype, "ms_p20": q[0], "ms_p50": q[1], "ms_p80": q[2]})
                        fout.write(json.dumps({**rec, "peak_mb": mb, **info}) + "\n")
        roof = f"# GEMM x@W_enc {shape} {args.dtype}: {t_gemm:.3f} ms = {tflops:.1f} TFLOP/s"
        enc = best.get("topk_encode fwd", {})
        for label, ms in enc.items():
            roof += f"; encode fwd [{label}] {ms:.3f} ms = {t_gemm / ms:.0%} of that GEMM"
        print(roof, flush=True)
        for key, times in best.items():
            if len(times) > 1:
                label = min(times, key=times.get)
                others = ", ".join(f"{v} {t:.3f}" for v, t in times.items() if v != label)
                print(f"# best {key} {shape}: [{label}] {times[label]:.3f} ms (others: {others})", flush=True)
        if fout:
            rec = {
                "op": "gemm",
                "shape": [B, d, n, k],
                "dtype": args.dtype,
                "ms_p50": t_gemm,
                "enc_fwd_ms": enc,
            }
            fout.write(json.dumps({**rec, **info}) + "\n")
        if args.tune and tri:
            tune(B, d, n, k, dtype, device, t_gemm, fout, info)
    if fout:
        fout.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

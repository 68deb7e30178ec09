"""Kernel benchmark: fused Triton vs plain-torch reference, in one run, with ratios and memory.

    python benchmarks/kernels.py                 # issue shape set (GPU) / small reference set (CPU)
    python benchmarks/kernels.py --quick         # d=768, n=32768, k=32, B=4096 only
    python benchmarks/kernels.py --json rows.jsonl --dtype bfloat16

Ops (registry ``OPS``): ``topk_encode`` (fwd / bwd / full), ``sparse_decode`` (fwd / bwd / full),
``normalised_adam`` (the decoder update, one mode) and ``topk_step`` (a whole TopK SAE training step:
encode, decode, MSE, backward, Adam on every parameter with the decoder-normalised update on W_dec).
Providers: ``ref`` (the plain-torch references in ``sparsedict.kernels``) and ``triton``. Times are the
p20/p50/p80 of ``triton.testing.do_bench`` on GPU (a simple timer on CPU); memory is the peak allocated
above what the inputs already hold. The encoder GEMM roofline fraction = time of ``torch.matmul(x, W_enc)``
(same shape and dtype, measured in the same run) / time of the fused encode forward.
"""

from __future__ import annotations

import argparse
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


def setup_topk_encode(B, d, n, k, dtype, device, provider):
    x, W_enc, b_enc, _ = _params(B, d, n, dtype, device)
    x.requires_grad_()
    g = torch.randn(B, k, device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            return topk_encode(x, W_enc, b_enc, k, backend=provider)

    def full():
        v, _ = topk_encode(x, W_enc, b_enc, k, backend=provider)
        v.backward(g)

    v, _ = topk_encode(x, W_enc, b_enc, k, backend=provider)
    return {"fwd": fwd, "bwd": lambda: v.backward(g, retain_graph=True), "full": full}


def setup_sparse_decode(B, d, n, k, dtype, device, provider):
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


def setup_normalised_adam(B, d, n, k, dtype, device, provider):
    W = torch.randn(n, d, device=device, dtype=torch.float32)
    W = (W / W.norm(dim=1, keepdim=True)).requires_grad_()
    W.grad = torch.randn_like(W) * 1e-3
    state: dict = {}
    return {"step": lambda: normalised_adam_step(W, state, 1e-4, backend=provider)}


def setup_topk_step(B, d, n, k, dtype, device, provider):
    """A whole training step. Parameters fp32 (master), compute in ``dtype`` (cast per step, as autocast)."""
    x, W_enc, b_enc, W_dec = _params(B, d, n, torch.float32, device)
    b_dec = torch.zeros(d, device=device, requires_grad=True)
    x = x.to(dtype)
    opt = torch.optim.Adam([W_enc, b_enc, b_dec] + ([W_dec] if provider == "ref" else []), lr=1e-4)
    dec_state: dict = {}

    def step():
        xc = x - b_dec.to(dtype)
        v, i = topk_encode(xc, W_enc.to(dtype), b_enc.to(dtype), k, backend=provider)
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


TUNE_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
]


def tune_encode(B, d, n, k, dtype, device) -> None:
    """Time the fused encode forward under a few tile configs and split counts (information for tuning)."""
    from sparsedict.kernels.topk_encode import topk_encode_fwd

    x, W_enc, b_enc, _ = _params(B, d, n, dtype, device, grad=False)
    for cfg in TUNE_CONFIGS:
        for splits in (None, 1, 4, 16):
            try:
                t = timer(
                    lambda c=cfg, s=splits: topk_encode_fwd(x, W_enc, b_enc, k, splits=s, config=c), True, 1
                )[1]
                print(f"# tune {B},{d},{n},{k} splits={splits} {cfg}: {t:.3f} ms", flush=True)
            except Exception as e:
                print(f"# tune {cfg} splits={splits}: {type(e).__name__}: {str(e)[:120]}")


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
    ap.add_argument("--tune", action="store_true", help="also time a few fused-encode tile configs")
    ap.add_argument("--shape", action="append", default=[], help="B,d,n,k (repeatable) instead of the set")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    dtype = getattr(torch, args.dtype)
    if args.shape:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape]
    else:
        shapes = (QUICK if cuda else QUICK_CPU) if args.quick else (SHAPES_GPU if cuda else SHAPES_CPU)
    providers = ["ref", "triton"] if cuda else ["ref"]
    info = machine_line(cuda)
    print("# machine:", json.dumps(info))
    if not cuda:
        print("# no CUDA device: running the plain-torch reference only; the Triton numbers need a GPU")
    fout = open(args.json, "a") if args.json else None  # noqa: SIM115
    t_start = time.time()
    hdr = f"{'op':16} {'B,d,n,k':24} {'mode':5} " + " ".join(
        f"{p + ' p50 ms':>13} {p + ' MB':>9}" for p in providers
    )
    print(hdr + ("   speedup" if len(providers) > 1 else ""))
    for B, d, n, k in shapes:
        if args.max_seconds and time.time() - t_start > args.max_seconds:
            print(f"# stopped after {args.max_seconds:.0f}s (--max-seconds); remaining shapes not run")
            break
        shape = f"{B},{d},{n},{k}"
        t_gemm = gemm_ms(B, d, n, dtype, device, cuda, args.reps)
        tflops = 2 * B * d * n / t_gemm / 1e9
        enc_ms = None
        for op in args.ops.split(","):
            results: dict[str, dict[str, tuple[list[float], float | None]]] = {}
            for p in providers:
                try:
                    fns = OPS[op](B, d, n, k, dtype, device, p)
                    results[p] = {m: (timer(fn, cuda, args.reps), peak_mb(fn, cuda)) for m, fn in fns.items()}
                except Exception as e:  # one failing provider must not end the run
                    results[p] = {}
                    print(f"# {op} {shape} {p}: {type(e).__name__}: {str(e)[:200]}")
                finally:
                    if cuda:
                        torch.cuda.empty_cache()
            if op == "topk_encode" and "fwd" in results.get("triton", {}):
                enc_ms = results["triton"]["fwd"][0][1]
            modes = next((list(r) for r in results.values() if r), [])
            for m in modes:
                cells, row = [], {}
                for p in providers:
                    q, mb = results[p].get(m, ([float("nan")] * 3, None))
                    cells.append(f"{q[1]:13.3f} {(f'{mb:9.0f}' if mb is not None else '        -')}")
                    row[p] = (q, mb)
                    if fout:
                        rec = {"op": op, "provider": p, "mode": m, "shape": [B, d, n, k], "dtype": args.dtype}
                        rec.update({"ms_p20": q[0], "ms_p50": q[1], "ms_p80": q[2], "peak_mb": mb, **info})
                        fout.write(json.dumps(rec) + "\n")
                line = f"{op:16} {shape:24} {m:5} " + " ".join(cells)
                if len(providers) > 1:
                    line += f"   {row['ref'][0][1] / row['triton'][0][1]:7.2f}x"
                print(line, flush=True)
        if args.tune and cuda:
            tune_encode(B, d, n, k, dtype, device)
        roof = f"# GEMM x@W_enc {shape} {args.dtype}: {t_gemm:.3f} ms = {tflops:.1f} TFLOP/s"
        if enc_ms is not None:
            roof += f"; fused encode fwd {enc_ms:.3f} ms = {t_gemm / enc_ms:.0%} of that GEMM"
        print(roof, flush=True)
        if fout:
            rec = {
                "op": "gemm",
                "shape": [B, d, n, k],
                "dtype": args.dtype,
                "ms_p50": t_gemm,
                "enc_fwd_ms": enc_ms,
            }
            fout.write(json.dumps({**rec, **info}) + "\n")
    if fout:
        fout.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

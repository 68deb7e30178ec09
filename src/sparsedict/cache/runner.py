"""``cache_activations(cfg)``: run the model over the text and write shards + manifest.

Resumable and kill -9 safe: a shard counts as done only once its files are renamed into place and its
receipt is written; a re-run skips done shards and recomputes the rest (the plan is deterministic, so
the result equals an uninterrupted run). Under ``torchrun`` every rank runs the same plan and computes
the shards ``i`` with ``i % world_size == rank``; rank 0 keeps the manifest.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch

from sparsedict.cache import hooks
from sparsedict.cache.config import CacheConfig
from sparsedict.cache.digest import ShardError
from sparsedict.cache.manifest import (
    FORMAT,
    TOKENS,
    VERSION,
    CacheError,
    hookpoint_dir,
    read_manifest,
    read_receipts,
    rebuild,
    receipt_file,
    shard_file,
)  # fmt: skip
from sparsedict.cache.tokens import RULES, ShardPlan, plan_shards
from sparsedict.cache.writer import check_shard, expected_tensors, write_shard
from sparsedict.distributed import init_process_group
from sparsedict.util import write_json_atomic


def _dist() -> tuple[int, int, int]:
    """``(rank, world_size, local_world_size)``; initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and torch.distributed.is_available() and not torch.distributed.is_initialized():
        init_process_group("nccl" if torch.cuda.is_available() else "gloo", datetime.timedelta(minutes=30))
    if world > 1:
        return torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return 0, 1, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _new_manifest(cfg: CacheConfig, model, tok, hps: list[hooks.Hookpoint], dims: dict[str, int]) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": cfg.content_dict(),
        "config_hash": cfg.config_hash(),
        "model": {"id": cfg.model, "class": type(model).__name__, "name_or_path": model.config.name_or_path,
                  "revision": getattr(model.config, "_commit_hash", None), "dtype": cfg.model_dtype},
        "tokenizer": {"name_or_path": tok.name_or_path, "vocab_size": len(tok), "bos_id": tok.bos_token_id,
                      "pad_id": tok.pad_token_id, "special_ids": sorted(set(tok.all_special_ids))},
        "dataset": {"name": cfg.dataset, "config": cfg.dataset_config, "split": cfg.split,
                    "text_column": cfg.text_column},
        "context_length": cfg.context_length,
        "hookpoints": {hp.name: {"module_path": hp.module_path, "side": hp.side, "path": hp.path,
                                 "layer": hp.layer, "d": dims[hp.name], "dtype": cfg.dtype,
                                 "dir": f"shards/{hookpoint_dir(hp.name)}", **_heads(model, hp, dims[hp.name])}
                       for hp in hps},
        "exclusions": {"rules": {"prepend_bos": cfg.prepend_bos, "exclude_bos": cfg.exclude_bos,
                                 "exclude_first_n": cfg.exclude_first_n, "exclude_special": cfg.exclude_special,
                                 "order": list(RULES)},
                       "dropped": {r: 0 for r in RULES}},
        "n_shards": None,
        "status": "in_progress",
        "stats": {},
        "shards": [],
    }  # fmt: skip


def _heads(model, hp: hooks.Hookpoint, d: int) -> dict:
    """Head layout recorded for attention z: ``{"n_heads", "d_head"}`` (all heads) or ``{"head", "d_head"}`` (one head)."""
    if hp.head is not None:
        return {"head": hp.head, "d_head": hp.d_head}
    layout = hooks.head_layout(model, hp)
    if layout is None or layout[0] * layout[1] != d:
        return {}
    return {"n_heads": layout[0], "d_head": layout[1]}


def _shard_done(root: Path, rec: dict | None, manifest: dict) -> bool:
    """A receipt exists and every file it names is present with the right size, dtype, shape and digest (a
    shard that fails a check is reported and recomputed)."""
    if rec is None:
        return False
    try:
        for name in [*manifest["hookpoints"], TOKENS]:
            check_shard(root / rec["files"][name]["file"], rec["files"][name],
                        expected_tensors(manifest, rec, name), checksum=True)  # fmt: skip
    except KeyError as err:
        print(
            f"sparsedict cache: receipt of shard {rec.get('index')} lacks {err}; recomputing it",
            file=sys.stderr,
        )
        return False
    except CacheError as err:
        problem = err.problem if isinstance(err, ShardError) else str(err)
        print(f"sparsedict cache: {problem}; recomputing shard {rec['index']}", file=sys.stderr)
        return False
    return True


def compute_shard(model, hps, plan: ShardPlan, cfg: CacheConfig, device: torch.device, bar=None,
                  contexts: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Forward the shard's contexts in batches of ``cfg.batch_size``; return ``{hookpoint: [rows, d]}`` (the
    kept positions, in order) in the storage dtype ``cfg.dtype``, on the CPU.

    ``contexts=(a, b)`` forwards only contexts ``[a, b)``, ``a`` a multiple of the batch size and ``b`` one or
    the shard's end, so every forward batch is one of the whole shard's: the disk cache and the live source
    run the same GEMM shapes on the same contexts, and so get the same values.
    """
    store_dtype = getattr(torch, cfg.dtype)
    first, stop = contexts or (0, len(plan.token_ids))
    out: dict[str, list[torch.Tensor]] = {hp.name: [] for hp in hps}
    for a in range(first, stop, cfg.batch_size):
        b = min(a + cfg.batch_size, stop)
        ids = torch.from_numpy(plan.token_ids[a:b]).long().to(device)
        attn = torch.from_numpy(plan.attention_mask[a:b]).long().to(device)
        keep = torch.from_numpy(plan.keep[a:b]).to(device)
        acts = hooks.record(model, hps, ids, attention_mask=attn, stop_after=True)
        for hp in hps:
            out[hp.name].append(acts[hp.name][keep].to(store_dtype).cpu())
        if bar is not None:
            bar.update(int(keep.sum()))
    return {name: torch.cat(parts) for name, parts in out.items()}


def check_finite(name: str, x: torch.Tensor, cfg: CacheConfig, where: str) -> None:
    """Raise naming ``where`` when the activations ``x`` of hookpoint ``name`` hold NaN/inf."""
    if torch.isfinite(x).all():
        return
    bad = int((~torch.isfinite(x)).any(dim=1).sum())
    hint = " (float16 overflows above 65504: use dtype bfloat16 or float32)" if cfg.dtype == "float16" else ""
    raise CacheError(
        f"hookpoint {name!r} has NaN/inf activations in {bad} rows of {where}{hint}; run the model in float32 "
        "(model_dtype) and check the model weights."
    )


def _write(
    root: Path, plan: ShardPlan, acts: dict[str, torch.Tensor], cfg: CacheConfig, rank: int, done: int
) -> None:
    files = {}
    for name, x in acts.items():
        check_finite(name, x, cfg, f"shard {plan.index} ({root / shard_file(name, plan.index)} not written)")
        files[name] = {
            "file": shard_file(name, plan.index),
            **write_shard(root / shard_file(name, plan.index), {"activations": x}, done),
        }
    keep = torch.from_numpy(plan.keep)
    ctx, pos = keep.nonzero(as_tuple=True)
    tok = {"token_ids": torch.from_numpy(plan.token_ids), "attention_mask": torch.from_numpy(plan.attention_mask),
           "keep": keep, "row_context": ctx + plan.first_context, "row_position": pos.int(),
           "doc_index": torch.from_numpy(plan.doc_index)}  # fmt: skip
    files[TOKENS] = {
        "file": shard_file(TOKENS, plan.index),
        **write_shard(root / shard_file(TOKENS, plan.index), tok, done),
    }
    receipt = {"index": plan.index, "rows": plan.rows, "contexts": len(plan.token_ids),
               "first_context": plan.first_context, "tokens_seen": int(plan.attention_mask.sum()),
               "dropped": plan.dropped, "files": files, "status": "complete", "rank": rank}  # fmt: skip
    (root / receipt_file(plan.index)).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / receipt_file(plan.index), receipt)


def _prepare(root: Path, cfg: CacheConfig, model, tok, hps, device, rank: int) -> dict:
    """Create or validate the manifest (rank 0); refuse a different config."""
    path = root / "manifest.json"
    if path.exists():
        manifest = read_manifest(root)
        if manifest["config_hash"] != cfg.config_hash():
            old = manifest["config"]
            diff = {k: (old.get(k), v) for k, v in cfg.content_dict().items() if old.get(k) != v}
            raise CacheError(
                f"{root} already holds a cache made with another config (differences, old -> new: {diff}). "
                "Use another out_dir, or delete the directory to start over; to resume, re-run with the "
                "original config."
            )
        return manifest
    probe = torch.tensor([[tok.bos_token_id or 0, 1, 2]], device=device)
    dims = {k: int(v.shape[-1]) for k, v in hooks.record(model, hps, probe).items()}
    manifest = _new_manifest(cfg, model, tok, hps, dims)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, manifest)
    return manifest


def forward_threads(cfg: CacheConfig, local_world: int) -> int:
    """CPU threads for the model: ``cfg.num_threads``, else the machine's cores over the ranks on this node."""
    return cfg.num_threads or max(1, (os.cpu_count() or 1) // local_world)


def model_device(cfg: CacheConfig, world: int) -> torch.device:
    """The model's device: ``cfg.device``, or under torchrun on GPUs (``world > 1``) this process's local GPU."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def cache_activations(cfg: CacheConfig) -> Path:
    """Cache ``cfg.hookpoints`` of ``cfg.model`` over ``cfg.dataset``; return the cache directory."""
    from sparsedict.lm import load_model

    rank, world, local_world = _dist()
    torch.set_num_threads(forward_threads(cfg, local_world))
    device = model_device(cfg, world)
    root = Path(cfg.out_dir)
    model, tok = load_model(cfg.model, device=str(device), dtype=cfg.model_dtype)
    hps = [hooks.resolve(model, name) for name in cfg.hookpoints]
    if rank == 0:
        _prepare(root, cfg, model, tok, hps, device, rank)
    _barrier(world)
    manifest = _prepare(root, cfg, model, tok, hps, device, rank) if rank else read_manifest(root)
    for stale in root.glob("shards/**/.*.tmp-*"):  # temp files of a killed run (never a complete file)
        if rank == 0 and stale.is_file():
            stale.unlink(missing_ok=True)
    receipts = read_receipts(root)
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        total = cfg.max_tokens // world if cfg.max_tokens else None
        bar = tqdm(
            total=total, unit="tok", unit_scale=True, desc=f"cache {','.join(cfg.hookpoints)}", smoothing=0.1
        )
    n_shards, done = 0, len(receipts)
    for plan in plan_shards(cfg, tok):
        n_shards = plan.index + 1
        if plan.index % world != rank:
            continue
        if _shard_done(root, receipts.get(plan.index), manifest):
            if bar is not None:
                bar.update(plan.rows)
            continue
        acts = compute_shard(model, hps, plan, cfg, device, bar)
        _write(root, plan, acts, cfg, rank, done)
        done += 1
        if rank == 0:
            manifest = rebuild(root, manifest)
    if bar is not None:
        bar.close()
    _barrier(world)
    if rank == 0:
        manifest = rebuild(root, manifest, n_shards=n_shards)
        if manifest["status"] != "complete":
            raise CacheError(f"{root}: shards missing after the run ({manifest['shards']}); re-run to resume")
    _barrier(world)
    return root

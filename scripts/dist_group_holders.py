"""Show what keeps a gloo process group alive after ``destroy_process_group`` (2 ranks under torchrun).

    torchrun --standalone --nproc-per-node 2 scripts/dist_group_holders.py after   # torch._dynamo after init
    torchrun --standalone --nproc-per-node 2 scripts/dist_group_holders.py first   # before init (the fix)

``after`` imports ``torch._dynamo`` once the group exists, as loading a transformers model or the first
optimiser's ``add_param_group`` does lazily; ``first`` imports it before ``init_process_group``, as
``sparsedict.distributed.init_process_group`` does. Rank 0 prints, after destroy: the functions whose default
arguments hold the group, the group's reference count besides this script's own name, and the gloo threads
still running once the script drops its own reference (threads that outlive the group race interpreter
shutdown).
"""

from __future__ import annotations

import datetime
import importlib
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from dist_worker import gloo_threads  # the thread list the distributed tests check


def default_holders(pg: object) -> list[str]:
    """``module.function`` for every module-level function with ``pg`` among its default arguments."""
    found = []
    for mod in list(sys.modules.values()):
        for name, f in list(vars(mod).items()) if mod else []:
            try:
                d = f.__defaults__ if callable(f) and hasattr(type(f), "__defaults__") else None
            except Exception:
                d = None
            if isinstance(d, tuple) and any(v is pg for v in d):
                found.append(f"{mod.__name__}.{name}")
    return sorted(set(found))


def main(when: str) -> None:
    if when == "first":
        importlib.import_module("torch._dynamo")
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=1))
    if when == "after":
        importlib.import_module("torch._dynamo")
    t = torch.ones(4)
    dist.all_reduce(t)
    pg = dist.group.WORLD
    dist.barrier()
    dist.destroy_process_group()
    holders = default_holders(pg)
    refs = sys.getrefcount(pg) - 2  # less this function's name and getrefcount's argument
    del pg  # the last reference of ours: with no other, the group is freed here and joins its threads
    if int(os.environ["RANK"]) == 0:
        print(f"[{when}] other references to the group after destroy: {refs}")
        print(f"[{when}] functions holding it as a default argument: {len(holders)} {holders[:4]}")
        print(f"[{when}] gloo threads after destroy: {gloo_threads()}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "after")

"""Check a whole cache directory, and repair what can be recomputed.

    report = verify_cache("runs/cache")     # every hookpoint's shards and the tokens shards
    print(*report.problems, report.summary(), sep="\\n")
    report = repair_cache("runs/cache")     # recompute bad shards; add xxh3_128 to sha256-only entries

``verify_cache`` reads every file in full (its digest), so it also finds what readers would find only when they
reach a shard. ``repair_cache`` re-runs the caching with the config recorded in the manifest: the resume
checks every done shard and recomputes those that fail (the plan is deterministic, so a recomputed shard equals
the original), then checks the whole cache again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sparsedict.cache.digest import WRITTEN, ShardError, repair_hint, verify_file
from sparsedict.cache.manifest import TOKENS, CacheError, read_manifest, receipt_file
from sparsedict.cache.writer import check_shard, expected_tensors
from sparsedict.util import write_json_atomic


@dataclass
class VerifyReport:
    """What :func:`verify_cache` found in the cache at ``root``."""

    root: Path
    problems: list[str] = field(default_factory=list)
    """One line per problem (the cache as a whole, or one file)."""
    bad_shards: set[int] = field(default_factory=set)
    """Indices of the shards with a problem file (recomputed by :func:`repair_cache`)."""
    n_shards: int = 0
    files: int = 0
    """Files checked."""
    bytes: int = 0
    """Bytes hashed."""
    digests: dict[str, int] = field(default_factory=dict)
    """Files checked per digest algorithm."""
    upgrades: dict[tuple[int, str], str] = field(default_factory=dict)
    """``(shard, kind) -> xxh3_128`` of the files that passed a sha256-only check (recorded by a repair)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        checked = (f"{self.files} files ({self.bytes / 1e6:.1f} MB) in {self.n_shards} shards, digests "
                   + ", ".join(f"{k}: {v}" for k, v in sorted(self.digests.items())))  # fmt: skip
        if self.ok:
            return f"{self.root}: OK, {checked}"
        return (f"{self.root}: {len(self.problems)} problem(s), {len(self.bad_shards)} bad shard(s); checked "
                f"{checked}. Fix: {repair_hint(self.root)}")  # fmt: skip


def verify_cache(path: str | Path, fresh: bool = True) -> VerifyReport:
    """Check every file of the cache at ``path`` (presence, header, dtype, shape, size, digest) and the shard
    list; never raises for a bad cache. ``fresh=False`` skips files this process already checked."""
    root = Path(path)
    report = VerifyReport(root)
    try:
        manifest = read_manifest(root)
    except (FileNotFoundError, CacheError) as err:
        report.problems.append(str(err))
        return report
    shards = manifest["shards"]
    report.n_shards = len(shards)
    done = sorted(s["index"] for s in shards)
    total = manifest.get("n_shards")
    if manifest.get("status") != "complete" or total is None or done != list(range(total)):
        report.problems.append(
            f"{root} is an incomplete cache ({len(done)} of {total if total is not None else '?'} shards done); "
            "run the same `sparsedict cache` command again to finish it"
        )
    for shard in shards:
        for kind in [*manifest["hookpoints"], TOKENS]:
            entry = shard["files"].get(kind)
            if entry is None:
                report.problems.append(f"shard {shard['index']} of {root} has no {kind} file in the manifest")
                report.bad_shards.add(shard["index"])
                continue
            file = root / entry["file"]
            try:
                check_shard(file, entry, expected_tensors(manifest, shard, kind), checksum=False)
                also = [WRITTEN] if WRITTEN not in entry else []
                got = verify_file(file, entry, fresh=fresh, also=also)
            except ShardError as err:
                report.problems.append(err.problem)
                report.bad_shards.add(shard["index"])
                continue
            except CacheError as err:
                report.problems.append(f"{file}: {err}")
                report.bad_shards.add(shard["index"])
                continue
            report.files += 1
            report.bytes += entry["bytes"]
            name = WRITTEN if WRITTEN in entry else "sha256"
            report.digests[name] = report.digests.get(name, 0) + 1
            if also and got:
                report.upgrades[(shard["index"], kind)] = got[WRITTEN]
    return report


def _record_digests(root: Path, upgrades: dict[tuple[int, str], str]) -> None:
    """Add the ``xxh3_128`` digests ``upgrades`` to the receipts and the manifest (atomically, file by file)."""
    by_shard: dict[int, dict[str, str]] = {}
    for (index, kind), value in upgrades.items():
        by_shard.setdefault(index, {})[kind] = value
    for index, kinds in by_shard.items():
        path = root / receipt_file(index)
        if path.exists():
            rec = json.loads(path.read_text())
            for kind, value in kinds.items():
                rec["files"][kind][WRITTEN] = value
            write_json_atomic(path, rec)
    manifest = read_manifest(root)
    for shard in manifest["shards"]:
        for kind, value in by_shard.get(shard["index"], {}).items():
            shard["files"][kind][WRITTEN] = value
    write_json_atomic(root / "manifest.json", manifest)


def repair_cache(path: str | Path, **runtime) -> VerifyReport:
    """Recompute the bad or missing shards of the cache at ``path`` with the config its manifest records
    (``runtime`` overrides fields that do not change the content: ``device``, ``batch_size``, ``num_threads``,
    ``progress``), add ``xxh3_128`` to entries that record only ``sha256``, and return a fresh report."""
    from sparsedict.cache.config import CacheConfig
    from sparsedict.cache.runner import cache_activations
    from sparsedict.config import from_dict

    root = Path(path)
    report = verify_cache(root)
    manifest = read_manifest(root)  # an unreadable manifest cannot be repaired here: its error says how
    upgrades = {k: v for k, v in report.upgrades.items() if k[0] not in report.bad_shards}
    if upgrades:
        _record_digests(root, upgrades)
    if not report.ok:
        cfg = from_dict(CacheConfig, {**manifest["config"], **runtime, "out_dir": str(root)}, where="cache.")
        cache_activations(cfg)
    return verify_cache(root, fresh=False)


__all__ = ["VerifyReport", "repair_cache", "verify_cache"]

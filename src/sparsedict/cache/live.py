"""Training batches straight from the running model, no disk: :class:`LiveStream` and its :class:`LiveSource` views.

A :class:`LiveStream` runs the model over the plan the disk cache of the same :class:`CacheConfig` would hold
(:func:`~sparsedict.cache.tokens.plan_shards`: the same contexts and exclusion mask), in the same forward
batches (:func:`~sparsedict.cache.runner.compute_shard`, ``cfg.batch_size`` contexts at a time) and rounded to
the same storage dtype ``cfg.dtype``, recording every hookpoint it serves in one forward. It cuts the rows
into batches in the window order of :class:`~sparsedict.cache.source.WindowOrder`: the order of
``ActivationStore(cache, ..., shuffle="window")`` over that cache with the same seed, batch size, ranks and
``shuffle_buffer_rows``. Where the model computes the same values twice (one CPU process, the same thread
count and device as the cache was written with) the batches and :meth:`LiveStream.sample` are bitwise the
store's, so live training equals training from the cache.

An epoch is one pass over the plan: rows in plan order, windows of ``shuffle_buffer_rows`` rows, each
permuted. Data parallel (``world_size`` ranks): rank ``r`` serves rows ``[r·N/W, (r+1)·N/W)`` of the epoch, as
the store does, and forwards only the batches of contexts that hold them (neighbouring ranks share at most one
forward batch); ``N`` is counted once by planning the epoch (tokenising the text, no forward), which needs
``cfg.max_tokens``. Resuming at batch ``j`` plans (tokenises) the epoch up to the window holding it and
forwards that window's contexts again; nothing else is recomputed.

:class:`LiveSource` is one ``(hookpoint, target)`` view of a stream, a
:class:`~sparsedict.cache.source.Source`: views of one stream share each forward, so several dictionaries on
several hookpoints cost one model pass (:func:`live_sources`). A view of lists of hookpoints serves their rows
stacked ``[B, L, d]`` (a cross-layer transcoder's or a transcoder set's batches), as the store does. Views are read in lockstep (the trainer reads
every source once a step); a view that reads ahead of the others makes the stream recompute the window the
others are in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple, TypeAlias

import numpy as np
import torch

from sparsedict.cache import hooks
from sparsedict.cache.config import CacheConfig
from sparsedict.cache.runner import check_finite, compute_shard, model_device
from sparsedict.cache.source import (
    WINDOW_ROWS,
    EpochIterator,
    Window,
    WindowOrder,
    check_order,
    check_widths,
    sample_rows,
)
from sparsedict.cache.tokens import ShardPlan, plan_shards
from sparsedict.lm import load_model

Names: TypeAlias = str | Sequence[str]
"""One hookpoint name, or a list (tuple) of them served stacked as ``[B, L, d]``."""


class _Segment(NamedTuple):
    """Computed rows ``[a, b)`` of a rank's epoch stream: ``{hookpoint: [b - a, d]}`` in the storage dtype."""

    a: int
    b: int
    acts: dict[str, torch.Tensor]


def _listed(names: Names | None) -> list[str]:
    """The hookpoint names of ``names``: one name, a list or tuple of them, or None/``""`` (none)."""
    if not names:
        return []
    return [names] if isinstance(names, str) else [n for n in names if n]


class LiveStream(WindowOrder):
    """The model run over ``cfg``'s plan: batches ``{hookpoint: [B, d]}`` of every name in ``hookpoints`` (names,
    or lists of them, flattened).

    ``batch_size`` is this rank's batch; ``rank``/``world_size`` split every epoch as the store does. The model
    is ``model``/``tokenizer`` when given, else ``cfg.model`` loaded on ``cfg.device`` (under torchrun on GPUs,
    this process's local GPU) in ``cfg.model_dtype``. Batches come out in ``dtype``.
    """

    def __init__(self, cfg: CacheConfig, hookpoints: Iterable[Names], batch_size: int = 4096, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle_buffer_rows: int = WINDOW_ROWS,
                 dtype: torch.dtype = torch.float32, model=None, tokenizer=None) -> None:  # fmt: skip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.cfg = cfg
        self.hookpoints = list(dict.fromkeys(h for names in hookpoints for h in _listed(names)))
        if not self.hookpoints:
            raise ValueError("a live stream needs at least one hookpoint")
        if model is None:
            model, tokenizer = load_model(cfg.model, str(model_device(cfg, world_size)), cfg.model_dtype)
        self.model, self.tok = model, tokenizer
        self.device = next(model.parameters()).device
        self._hps = [hooks.resolve(model, name) for name in self.hookpoints]
        probe = torch.tensor([[tokenizer.bos_token_id or 0, 1, 2]], device=self.device)
        self.dims = {k: int(v.shape[-1]) for k, v in hooks.record(model, self._hps, probe).items()}
        """Width of each hookpoint."""
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle_buffer_rows, self.dtype = max(1, int(shuffle_buffer_rows)), dtype
        self.epoch, self._batch = 0, 0
        self._n_rows: int | None = None
        self._reset()

    def _reset(self) -> None:
        """Forget the batch being produced and the ones kept for lagging views."""
        self._gen: Iterator | None = None
        self._next: tuple[int, int] | None = None  # (epoch, batch) that _gen yields next
        self._last: tuple[tuple[int, int], dict[str, torch.Tensor]] | None = None
        self._end: tuple[int, int] | None = None  # (epoch, batch) past the last batch of an epoch
        self._sampled: tuple[tuple[int, int], dict[str, torch.Tensor]] | None = None

    @property
    def meta(self) -> dict:
        """Provenance for the checkpoints: the data config (no cache path: nothing is on disk) and exclusion rules."""
        cfg = self.cfg
        rules = {"prepend_bos": cfg.prepend_bos, "exclude_bos": cfg.exclude_bos,
                 "exclude_first_n": cfg.exclude_first_n, "exclude_special": cfg.exclude_special}  # fmt: skip
        return {
            "live": {"config": cfg.content_dict(), "config_hash": cfg.config_hash()},
            "exclusions": {"rules": rules},
        }

    @property
    def n_rows(self) -> int | None:
        """Rows in one epoch over all ranks: counted once by planning the epoch (tokenising, no forward); None
        when ``cfg.max_tokens`` is None (the whole dataset, not counted)."""
        if self.cfg.max_tokens is None:
            return None
        if self._n_rows is None:
            self._n_rows = sum(plan.rows for plan in plan_shards(self.cfg, self.tok))
        return self._n_rows

    @property
    def batches_per_epoch(self) -> int | None:
        """This rank's batches in one epoch (None in one process: full batches until the plan ends)."""
        if self.world_size == 1:
            return None
        lo, hi = self._part()
        return (hi - lo) // self.batch_size

    def _part(self) -> tuple[int, int | None]:
        """Rows ``[lo, hi)`` of the epoch this rank serves (``hi`` None: to the end of the plan)."""
        if self.world_size == 1:
            return 0, None
        if self.n_rows is None:
            raise ValueError(
                f"data-parallel live training ({self.world_size} ranks) needs cache.max_tokens: each rank serves "
                "a contiguous 1/world_size of the epoch's rows, so the epoch's length must be known"
            )
        per = self.n_rows // self.world_size
        return self.rank * per, (self.rank + 1) * per

    def _too_few(self) -> str:
        return (f"the live plan of {self.cfg.dataset!r} (max_tokens={self.cfg.max_tokens}) over {self.world_size} "
                f"rank(s) cannot fill one batch of {self.batch_size}; raise max_tokens or lower batch_size")  # fmt: skip

    # ---------------------------------------------------------------- computing rows
    def _forward(self, plan: ShardPlan, base: int, r0: int, r1: int) -> _Segment:
        """Rows ``[r0, r1)`` of ``plan`` (whose first row is row ``base`` of the stream), computed in the forward
        batches of the whole shard that hold them; the segment keeps every row those batches give."""
        per_ctx = plan.keep.sum(1)
        cum = np.cumsum(per_ctx)
        bs = self.cfg.batch_size
        c0 = int(np.searchsorted(cum, r0, side="right")) // bs * bs
        c1 = min((int(np.searchsorted(cum, r1 - 1, side="right")) // bs + 1) * bs, len(per_ctx))
        acts = compute_shard(self.model, self._hps, plan, self.cfg, self.device, contexts=(c0, c1))
        for name, x in acts.items():
            check_finite(name, x, self.cfg, f"shard {plan.index} of the live plan")
        first = int(cum[c0] - per_ctx[c0])
        return _Segment(base + first, base + int(cum[c1 - 1]), acts)

    def _windows(self, epoch: int, first: int) -> Iterator[Window]:
        lo, hi = self._part()
        S = self.shuffle_buffer_rows
        plans = plan_shards(self.cfg, self.tok)
        seg: _Segment | None = None
        offset, k, ended = 0, first, False  # offset: stream row of the next plan's first row
        while not ended:
            w_lo = lo + k * S
            w_hi = w_lo + S if hi is None else min(w_lo + S, hi)
            if w_lo >= w_hi:
                return
            parts: list[dict[str, torch.Tensor]] = []
            at = w_lo
            while at < w_hi:
                if seg is None or seg.b <= at:
                    plan = next(plans, None)
                    if plan is None:
                        ended = True
                        break
                    base, offset = offset, offset + plan.rows
                    if offset <= at:  # before the rows still to serve: tokenised, never forwarded
                        continue
                    end = plan.rows if hi is None else min(plan.rows, hi - base)
                    seg = self._forward(plan, base, at - base, end)
                stop = min(seg.b, w_hi)
                parts.append({n: x[at - seg.a : stop - seg.a] for n, x in seg.acts.items()})
                at = stop
            if at == w_lo:
                return
            cols = tuple(torch.cat([p[n] for p in parts]) for n in self.hookpoints)
            parts = []

            def take(idx: torch.Tensor, cols=cols) -> tuple[torch.Tensor, ...]:
                return tuple(c[idx].to(self.dtype) for c in cols)

            yield Window(at - w_lo, take, False)  # never a partial batch: the epoch drops its last rows < B
            cols = take = None
            k += 1

    def _serve(self, cols: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
        return cols

    # ---------------------------------------------------------------- what the views read
    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor] | None:
        """Batch ``index`` of epoch ``epoch`` as ``{hookpoint: [B, d]}``; None past the epoch's last batch.

        The next batch is produced from the windows being served; the last one produced is kept for the views
        still to read it; any other position restarts production there (its window is computed again).
        """
        key = (epoch, index)
        self._sampled = None  # initialisation is over
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if key == self._end:
            return None
        if self._gen is None or self._next != key:
            if self._gen is not None:
                self._gen.close()
            self.epoch, self._batch = key
            self._gen = self._epoch_batches()
        try:
            cols = next(self._gen)
        except StopIteration:
            self._gen, self._end = None, key
            return None
        except BaseException:
            self._gen = None
            raise
        self._next = (epoch, index + 1)
        self._last = (key, dict(zip(self.hookpoints, cols)))
        return self._last[1]

    def sample(self, n_rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """``{hookpoint: [n, d]}``: ``n_rows`` rows drawn with ``seed`` from the first shards of the plan that hold
        at least ``n_rows`` (all of it when shorter), the same on every rank and the same rows as the store's
        ``sample`` under ``shuffle="window"``."""
        if self._sampled is not None and self._sampled[0] == (n_rows, seed):
            return self._sampled[1]
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.hookpoints}
        have = 0
        for plan in plan_shards(self.cfg, self.tok):
            seg = self._forward(plan, 0, 0, plan.rows)
            for n, x in seg.acts.items():
                parts[n].append(x)
            have += plan.rows
            if have >= n_rows:
                break
        if not have:
            raise ValueError(f"{self.cfg.dataset!r} gave no rows for {self.hookpoints}: nothing to sample")
        rows, order = sample_rows(have, n_rows, seed)
        idx = torch.from_numpy(rows)
        out = {n: torch.cat(v)[idx][order].to(self.dtype) for n, v in parts.items()}
        self._sampled = ((n_rows, seed), out)
        return out

    def sources(self, keys: Iterable[tuple[Names, Names]], loop: bool = True) -> dict[tuple, LiveSource]:
        """One :class:`LiveSource` view per ``(hookpoint, target)`` key (target ``""``: none; tuples of names: a
        view serving ``[B, L, d]`` batches)."""
        return {key: LiveSource.view(self, key[0], key[1] or None, loop) for key in keys}


class LiveSource(EpochIterator):
    """Batches ``(x [B, d_in], y [B, d_out] | None)`` from model hooks: the :class:`~sparsedict.cache.source.Source`
    of ``cfg`` without a disk cache.

    ``LiveSource(cfg, hookpoint, target, ...)`` runs its own :class:`LiveStream` of those hookpoints;
    :meth:`view` (or :meth:`LiveStream.sources`) makes views sharing one stream. A string ``cfg`` names the model
    (``hookpoint`` default ``resid_post.14``). ``n_rows`` is the plan's row count (None with
    ``max_tokens=None``). Several hookpoints in one batch, as the store serves them: a list (or tuple) for
    ``hookpoint`` and/or ``target`` serves the same rows of every listed hookpoint stacked along dim 1,
    ``x [B, L, d_in]`` (``y [B, L', d_out]``), the listed hookpoints of one width; ``x_shape``/``y_shape`` give a
    row's shape. Its batches and ``sample`` are those of ``ActivationStore(cache, hookpoint, target,
    shuffle="window")`` with the same lists.
    """

    def __init__(self, cfg: CacheConfig | str = "smollm2-135m", hookpoint: Names | None = None,
                 target: Names | None = None, batch_size: int = 4096, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_buffer_rows: int = WINDOW_ROWS, dtype: torch.dtype = torch.float32,
                 loop: bool = True, model=None, tokenizer=None) -> None:  # fmt: skip
        if isinstance(cfg, str):
            names = [*_listed(hookpoint or "resid_post.14"), *_listed(target)]
            cfg = CacheConfig(model=cfg, hookpoints=names, progress=False)
        hookpoint = hookpoint or cfg.hookpoints[0]
        stream = LiveStream(cfg, [hookpoint, target], batch_size, seed, rank, world_size,
                            shuffle_buffer_rows, dtype, model, tokenizer)  # fmt: skip
        self._attach(stream, hookpoint, target, loop)

    @classmethod
    def view(
        cls, stream: LiveStream, hookpoint: Names, target: Names | None = None, loop: bool = True
    ) -> LiveSource:
        """A source reading ``(hookpoint, target)`` of ``stream`` (names, or lists of names, among
        ``stream.hookpoints``)."""
        self = cls.__new__(cls)
        self._attach(stream, hookpoint, target, loop)
        return self

    def _attach(self, stream: LiveStream, hookpoint: Names, target: Names | None, loop: bool) -> None:
        self.stream, self.loop = stream, loop
        self.hookpoint, self.d_in, self.x_shape = self._names(hookpoint, "hookpoint")
        self.target, self.d_out, self.y_shape = None, None, None
        if target is not None and target != "":
            self.target, self.d_out, self.y_shape = self._names(target, "target")
        self.world_size = stream.world_size
        self.epoch, self._batch = 0, 0
        self.meta: dict = stream.meta
        """Provenance recorded in the checkpoints trained on this source."""

    def _names(self, names: Names, what: str) -> tuple[str | list[str], int, tuple[int, ...]]:
        """``(name or list of names, width, row shape)`` of one hookpoint or a list of them (one width)."""
        listed = _listed(names)
        if not listed:
            raise ValueError(f"{what}: an empty list of hookpoints; name at least one")
        for name in listed:
            if name not in self.stream.hookpoints:
                raise KeyError(
                    f"hookpoint {name!r} is not computed by this live stream ({self.stream.hookpoints})"
                )
        widths = [self.stream.dims[n] for n in listed]
        check_widths(what, listed, widths)
        if isinstance(names, str):
            return names, widths[0], (widths[0],)
        return listed, widths[0], (len(listed), widths[0])

    @property
    def cfg(self) -> CacheConfig:
        return self.stream.cfg

    @property
    def n_rows(self) -> int | None:
        return self.stream.n_rows

    def _pick(self, b: dict[str, torch.Tensor], names: str | list[str] | None) -> torch.Tensor | None:
        """The batch of ``names`` in ``b``: one hookpoint's ``[B, d]``, a list's stacked ``[B, L, d]``, or None."""
        if names is None:
            return None
        return b[names] if isinstance(names, str) else torch.stack([b[n] for n in names], 1)

    def _epoch_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        while (b := self.stream.batch(self.epoch, self._batch)) is not None:
            self._batch += 1
            yield self._pick(b, self.hookpoint), self._pick(b, self.target)
        self.epoch, self._batch = self.epoch + 1, 0

    def sample(self, n_rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x [n, *x_shape], y [n, *y_shape] | None)`` from :meth:`LiveStream.sample` (one forward for every
        view)."""
        out = self.stream.sample(n_rows, seed)
        return self._pick(out, self.hookpoint), self._pick(out, self.target)

    def state_dict(self) -> dict:
        """The position (``epoch``, ``batch``, ``seed``) and what fixes the order, checked on resume (the keys a
        store records too: a run may resume from a cache read in window order where it trained live)."""
        s = self.stream
        return {"epoch": self.epoch, "batch": self._batch, "seed": s.seed, "rank": s.rank, **self._order()}

    def _order(self) -> dict:
        s = self.stream
        order = {"world_size": s.world_size, "batch_size": s.batch_size, "shuffle": "window",
                 "shuffle_buffer_rows": s.shuffle_buffer_rows, "config_hash": s.cfg.config_hash()}  # fmt: skip
        return {**order, "n_rows": s._n_rows} if s._n_rows is not None else order

    def load_state_dict(self, state: dict) -> None:
        check_order(state, self._order(), "live source")
        s = self.stream
        if int(state["seed"]) != s.seed:
            s.seed = int(state["seed"])
            s._reset()
        self.epoch, self._batch = int(state["epoch"]), int(state["batch"])


def live_sources(
    cfg: CacheConfig, keys: Iterable[tuple[Names, Names]], **stream_kw
) -> dict[tuple, LiveSource]:
    """One :class:`LiveSource` per ``(hookpoint, target)`` key (tuples of names: ``[B, L, d]`` batches), all views
    of one :class:`LiveStream` of ``cfg`` computing every hookpoint the keys name in one forward (``stream_kw``:
    the stream's arguments)."""
    keys = list(dict.fromkeys(keys))
    stream = LiveStream(cfg, [h for key in keys for h in key], **stream_kw)
    return stream.sources(keys)

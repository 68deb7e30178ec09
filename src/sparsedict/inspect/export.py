"""Exports of an inspection for peer tools, written from the pass without re-running the model.

**Neuronpedia export layout** (what Neuronpedia's importer reads; the rows follow its database models,
as its ``convert-saedashboard-to-neuronpedia-export`` script writes them from sae-dashboard 0.8.0's
``NeuronpediaRunner`` batches)::

    <model>/<source>/model.jsonl, sourceset.jsonl, source.jsonl   one row each
    <model>/<source>/features/batch-<b>.jsonl.gz                 one Feature row per latent
    <model>/<source>/activations/batch-<b>.jsonl.gz              one Activation row per example

``<source>`` is ``<layer>-<set>``; batch ``b`` holds latents ``[128·b, 128·b + 128)`` (sae-dashboard's
``n_features_at_a_time``). A Feature row carries ``frac_nonzero`` (density), ``maxActApprox``,
``pos_str``/``pos_values`` and ``neg_str``/``neg_values`` (logit lens), the activation histogram as
``freq_hist_data_bar_values`` (bin centres) / ``freq_hist_data_bar_heights`` (counts), the logit
histogram likewise, and ``topkCosSimIndices``/``Values`` (nearest features by decoder cosine); the fields
sparsedict does not compute (neuron alignment, correlations, DFA, vectors) are empty. An Activation row
is one example window: ``tokens`` (decoded token text), ``values`` (0 at positions the cache excluded),
``maxValue``, ``maxValueTokenIndex``, ``minValue``, ``qualifyingTokenIndex`` (the firing token),
``binMin``/``binMax``/``binContains`` (top examples: ``binMin = -1`` and ``binMax`` = max as in
sae-dashboard's top group, ``binContains`` their share of the firings — the converter writes ``-1``
there, which the neuronpedia client's ``Activation`` rejects (it requires a fraction in [0, 1]);
quantile bands: the band's activation range and its nominal share of firings, ``1/quantiles``) and
``dataIndex`` (the cache context). ``creatorId`` is left empty: Neuronpedia's importer assigns it.

**delphi latent cache** (EleutherAI's delphi, ``LatentCache.save_splits`` / ``LatentDataset``)::

    <module>/<start>_<end>.safetensors   "locations" [M, 3] (context, position, latent − start;
                                          uint16, or uint32 when a column needs it), "activations" [M]
                                          float16, "tokens" [contexts, T] (the cache's token ids)
    <module>/config.json                 delphi's cache config fields + "model_name" (a tokenizer path)

holding every firing of the rows read (``|a| > 1e-5``, as delphi keeps), split over the latent width
in ``delphi_splits`` files. Firings are spilled to disk during the pass (12 bytes + 2 per firing) and
each split is assembled alone, so memory stays one split. delphi counts frequencies over all
``tokens`` entries, including positions the cache excluded.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsedict.inspect.result import Inspection
from sparsedict.inspect.stream import hist_edges

NEURONPEDIA_BATCH = 128
"""Latents per Neuronpedia batch file (sae-dashboard's default ``n_features_at_a_time``)."""
DELPHI_MIN = 1e-5
"""delphi keeps activations with ``|a| > 1e-5``."""


def _round(values, digits: int = 3) -> list[float]:
    return [round(float(v), digits) for v in values]


def _jsonl_gz(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data, compresslevel=5, mtime=0))


def neuronpedia_source_id(r: Inspection, source_set: str) -> str:
    layer = r.meta.get("hookpoint_info", {}).get("layer")
    return f"{0 if layer is None else layer}-{source_set}"


def _activation_row(r: Inspection, ex: dict, texts: list[str], ids: dict[str, Any], bins: tuple) -> dict:
    inside = np.flatnonzero(ex["tokens"] >= 0)
    tokens = [texts[int(t)] for t in ex["tokens"][inside]]
    values = np.nan_to_num(ex["window"][inside], nan=0.0)
    values = _round(values)
    half = int(r.meta["settings"]["window"])
    qualifying = int(np.searchsorted(inside, half))
    best = int(np.argmax(values)) if values else 0
    key = f"{ids['layer']}/{ids['index']}/{ex['row']}/{bins[0]}"
    return {"id": hashlib.sha1(key.encode()).hexdigest()[:25], "tokens": tokens, **ids,
            "maxValue": values[best] if values else 0.0, "maxValueTokenIndex": best,
            "minValue": min(values) if values else 0.0, "values": values, "creatorId": "",
            "dataSource": None, "dataIndex": str(ex["ctx"]), "dfaValues": [], "dfaTargetIndex": None,
            "dfaMaxValue": None, "createdAt": ids["createdAt"], "lossValues": [], "logitContributions": None,
            "binMin": bins[0], "binMax": bins[1], "binContains": bins[2],
            "qualifyingTokenIndex": qualifying}  # fmt: skip


def write_neuronpedia(folder: Path, r: Inspection, texts: list[str], model_id: str, source_set: str) -> Path:
    """Write ``r`` in Neuronpedia's export layout under ``folder``; returns the source directory."""
    a = r.arrays
    source = neuronpedia_source_id(r, source_set)
    root = folder / model_id / source
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    settings = r.meta["settings"]
    dataset = r.meta.get("dataset", {}).get("name") or ""
    base = {"creatorId": "", "createdAt": now}
    (root / "model.jsonl").write_text(json.dumps({"id": model_id, "instruct": False, **base,
                                                  "displayNameShort": model_id, "displayName": model_id,
                                                  "updatedAt": now}) + "\n")  # fmt: skip
    (root / "sourceset.jsonl").write_text(json.dumps({"modelId": model_id, "name": source_set, **base,
                                                      "visibility": "PUBLIC",
                                                      "description": f"{r.meta['architecture']} · "
                                                      f"{r.meta['hookpoint']} · {r.n_latents} latents"}) + "\n")  # fmt: skip
    (root / "source.jsonl").write_text(json.dumps({"id": source, "modelId": model_id, "setName": source_set,
                                                   **base, "visibility": "PUBLIC", "dataset": dataset,
                                                   "num_prompts": None, "num_tokens_in_prompt":
                                                   r.meta.get("context_length")}) + "\n")  # fmt: skip
    edges = hist_edges()
    centres = np.sqrt(edges[:-1] * edges[1:])
    density = r.density()
    batches: dict[int, tuple[list, list]] = {}
    for j, i in enumerate(a["latents"]):
        i = int(i)
        ids = {"modelId": model_id, "layer": source, "index": str(i), "createdAt": now}
        hist = a["hist"][i]
        nz = np.flatnonzero(hist)
        feature = {"modelId": model_id, "layer": source, "index": str(i), "creatorId": "", "createdAt": now,
                   "maxActApprox": float(a["max"][i]) if a["count"][i] else 0.0, "hasVector": False, "vector": [],
                   "vectorLabel": None, "vectorDefaultSteerStrength": 10, "hookName": None,
                   "topkCosSimIndices": [int(t) for t in a["near_ids"][j]],
                   "topkCosSimValues": _round(a["near_cos"][j], 4),
                   "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
                   "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
                   "correlated_features_indices": [], "correlated_features_pearson": [],
                   "correlated_features_l1": [],
                   "neg_str": [], "neg_values": [], "pos_str": [], "pos_values": [],
                   "frac_nonzero": float(density[i]),
                   "freq_hist_data_bar_heights": [int(c) for c in hist[nz]],
                   "freq_hist_data_bar_values": _round(centres[nz], 5),
                   "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
                   "decoder_weights_dist": []}  # fmt: skip
        if "lens_top_ids" in a:
            feature.update(pos_str=[texts[int(t)] for t in a["lens_top_ids"][j]],
                           pos_values=_round(a["lens_top_values"][j]),
                           neg_str=[texts[int(t)] for t in a["lens_bottom_ids"][j]],
                           neg_values=_round(a["lens_bottom_values"][j]),
                           logits_hist_data_bar_heights=[int(c) for c in a["lens_hist_counts"][j]],
                           logits_hist_data_bar_values=_round(a["lens_hist_centres"][j]))  # fmt: skip
        top = r.examples("top", j)
        share = round(len(top) / max(1, int(a["count"][i])), 6)
        rows = [_activation_row(r, ex, texts, ids, (-1, round(float(a["max"][i]), 3), share)) for ex in top]
        q = int(settings["quantiles"])
        for band in r.bands(j, q):
            bins = (round(band[-1]["value"], 3), round(band[0]["value"], 3), round(1 / q, 3))
            rows += [_activation_row(r, ex, texts, ids, bins) for ex in band]
        feats, acts = batches.setdefault(i // NEURONPEDIA_BATCH, ([], []))
        feats.append(feature)
        acts.extend(rows)
    for b, (feats, acts) in sorted(batches.items()):
        _jsonl_gz(root / "features" / f"batch-{b}.jsonl.gz", feats)
        _jsonl_gz(root / "activations" / f"batch-{b}.jsonl.gz", acts)
    (root / "README.txt").write_text(
        "Neuronpedia export written by `sparsedict inspect`. creatorId is empty in every row: Neuronpedia's "
        "importer assigns the uploading user. Fields sparsedict does not compute are empty lists.\n"
    )
    return root


def read_jsonl_gz(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl.gz`` batch file."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class DelphiSpill:
    """Collects every firing during the pass into per-split spill files, then writes delphi's cache."""

    def __init__(self, folder: Path, module: str, n_latents: int, splits: int) -> None:
        self.folder = Path(folder) / module
        self.folder.mkdir(parents=True, exist_ok=True)
        self.bounds = torch.linspace(0, n_latents, steps=splits + 1).long()
        self.files = [((self.folder / f".spill-{s}.loc").open("wb"), (self.folder / f".spill-{s}.act").open("wb"))
                      for s in range(splits)]  # fmt: skip
        self.counts = [0] * splits

    def __call__(self, batch, rows: torch.Tensor, lat: torch.Tensor, v: torch.Tensor) -> None:
        keep = v.abs() > DELPHI_MIN
        rows, lat, v = rows[keep], lat[keep], v[keep]
        ctx = (batch.ctx[rows] + batch.ctx0).long()
        pos = batch.pos[rows].long()
        split = torch.bucketize(lat, self.bounds[1:-1], right=True)
        for s in torch.unique(split).tolist():
            m = split == s
            loc = torch.stack([ctx[m], pos[m], lat[m] - int(self.bounds[s])], 1).to(torch.int64).numpy()
            loc.astype(np.uint32).tofile(self.files[s][0])
            v[m].to(torch.float16).numpy().tofile(self.files[s][1])
            self.counts[s] += int(m.sum())

    def finish(self, tokens: np.ndarray, config: dict[str, Any]) -> Path:
        """Assemble ``<start>_<end>.safetensors`` per split (``tokens [contexts, T]``) and ``config.json``."""
        from safetensors.numpy import save_file

        for f_loc, f_act in self.files:
            f_loc.close()
            f_act.close()
        for s in range(len(self.files)):
            loc_path, act_path = self.folder / f".spill-{s}.loc", self.folder / f".spill-{s}.act"
            loc = np.fromfile(loc_path, dtype=np.uint32).reshape(-1, 3)
            act = np.fromfile(act_path, dtype=np.float16)
            small = not len(loc) or int(loc.max()) < 2**16
            start, end = int(self.bounds[s]), int(self.bounds[s + 1]) - 1
            save_file({"locations": loc.astype(np.uint16) if small else loc, "activations": act,
                       "tokens": np.ascontiguousarray(tokens)}, str(self.folder / f"{start}_{end}.safetensors"))  # fmt: skip
            loc_path.unlink()
            act_path.unlink()
        (self.folder / "config.json").write_text(json.dumps(config, indent=4))
        return self.folder

"""The static feature browser: HTML that opens from the file system (no server, no network).

``out/index.html`` lists the dictionaries; ``out/<name>/index.html`` is a sortable, searchable table of
its latents (density, firings, max and mean activation, top-activating token, top logit token), and
``out/<name>/features/<i>.html`` one page per tabulated latent: statistics, the activation histogram
(inline SVG), logit-lens tables, nearest features and the token contexts (top activations, then the
activation-quantile bands of the random sample) coloured by activation, with the value on hover.

Each page embeds its data as JSON in ``<script type="application/json" id="data">`` (``<``, ``>`` and
``&`` escaped, so token text can never close the element); the shared ``assets/browser.js`` renders it
with ``textContent`` only. Everything the server-side HTML shows is escaped with ``html.escape``.
"""

from __future__ import annotations

import html
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from sparsedict.inspect.result import Inspection
from sparsedict.inspect.stream import N_BINS, hist_edges
from sparsedict.inspect.tokens import display

ASSETS = ("browser.css", "browser.js")


def _num(v: float, digits: int = 4) -> float | None:
    """A float rounded to ``digits`` significant digits for the page data (None for NaN/inf)."""
    v = float(v)
    return float(f"{v:.{digits}g}") if math.isfinite(v) else None


def _fmt(v: float) -> str:
    v = float(v)
    if not math.isfinite(v):
        return "–"
    if v != 0 and not 1e-3 <= abs(v) < 1e6:
        return f"{v:.2e}"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _page(title: str, body: str, depth: int, data: Any = None, raw_data: str | None = None) -> str:
    """A page linking the shared assets; ``data`` (or ``raw_data``, JSON text) is embedded for browser.js."""
    up = "../" * depth
    head = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title>"
            f'<link rel="stylesheet" href="{up}assets/browser.css"></head>\n<body>\n')  # fmt: skip
    if raw_data is None and data is not None:
        raw_data = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    script = "" if raw_data is None else (f'<script type="application/json" id="data">{_escape_json(raw_data)}'
                                          f'</script>\n<script src="{up}assets/browser.js"></script>\n')  # fmt: skip
    return f"{head}{body}\n{script}</body></html>\n"


def write_assets(out: Path) -> None:
    folder = out / "assets"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ASSETS:
        (folder / name).write_text(resources.files("sparsedict.inspect").joinpath("static", name).read_text())


def histogram_svg(hist: np.ndarray, hist_neg: np.ndarray | None, width: int = 440, height: int = 160) -> str:
    """Inline SVG of a latent's log-spaced activation histogram (bins cropped to the used range)."""
    counts = [hist] + ([hist_neg] if hist_neg is not None and hist_neg.any() else [])
    used = np.flatnonzero(sum(c for c in counts))
    if not len(used):
        return '<p class="note">never fired: no histogram</p>'
    lo, hi = max(0, used[0] - 1), min(N_BINS, used[-1] + 2)
    edges = hist_edges()
    top = max(int(c[lo:hi].max()) for c in counts)
    pad_l, pad_b, pad_t = 34, 34, 8
    w, h = width - pad_l - 6, height - pad_b - pad_t
    bw = w / (hi - lo)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="activation histogram">']  # fmt: skip
    for series, cls in zip(counts, ("bar", "bar neg")):
        for b in range(lo, hi):
            c = int(series[b])
            if not c:
                continue
            bh = max(1.0, h * c / top)
            x = pad_l + (b - lo) * bw
            sign = "−" if cls == "bar neg" else ""
            label = f"{c} activations in [{sign}{_fmt(edges[b])}, {sign}{_fmt(edges[b + 1])})"
            parts.append(f'<rect class="{cls}" x="{x:.2f}" y="{pad_t + h - bh:.2f}" width="{max(1.0, bw - 1):.2f}" '
                         f'height="{bh:.2f}"><title>{html.escape(label)}</title></rect>')  # fmt: skip
    y0 = pad_t + h
    parts.append(f'<line class="axis" x1="{pad_l}" y1="{y0}" x2="{pad_l + w}" y2="{y0}"/>')
    parts.append(f'<line class="axis" x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{y0}"/>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{top}</text>')
    parts.append(f'<text x="{pad_l - 4}" y="{y0}" text-anchor="end">0</text>')
    step = max(1, (hi - lo) // 5)
    for b in range(lo, hi + 1, step):
        x = pad_l + (b - lo) * bw
        parts.append(f'<text x="{x:.1f}" y="{y0 + 14}" text-anchor="middle">{_fmt(edges[b])}</text>')
    parts.append(f'<text x="{pad_l + w / 2:.1f}" y="{height - 4}" text-anchor="middle">'
                 "activation (log scale)" + (", blue: |negative|" if len(counts) > 1 else "") + "</text>")  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _token_cell(shown: list[str], tid: int) -> str:
    return f'<span class="tokbox">{html.escape(shown[tid] if 0 <= tid < len(shown) else "?")}</span>'


def _logit_table(title: str, shown: list[str], ids: np.ndarray, vals: np.ndarray) -> str:
    rows = "".join(f"<tr><td>{_token_cell(shown, int(t))}</td><td class='num'>{_fmt(v)}</td></tr>"
                   for t, v in zip(ids, vals))  # fmt: skip
    return f'<div class="panel"><h3>{html.escape(title)}</h3><table class="grid">{rows}</table></div>'


def _escape_json(text: str) -> str:
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _examples_json(
    r: Inspection, table: str, j: int, slots: np.ndarray, half: int, used: set[int]
) -> list[str]:
    """JSON objects ``{"v", "t" (in-context token ids), "a" (activations, null: not cached), "c" (firing
    index)}`` of table slots ``slots`` of latent slot ``j``; adds the token ids to ``used``."""
    a = r.arrays
    if not len(slots):
        return []
    values = np.char.mod("%.4g", a[f"{table}_value"][j, slots])
    window = a[f"{table}_window"][j, slots]
    acts = np.where(np.isnan(window), "null", np.char.mod("%.4g", np.nan_to_num(window)))
    tokens = a[f"{table}_tokens"][j, slots]
    out = []
    for s in range(len(slots)):
        inside = tokens[s] >= 0
        ids = tokens[s][inside].tolist()
        used.update(ids)
        c = int(inside[:half].sum())
        out.append(
            f'{{"v":{values[s]},"t":[{",".join(map(str, ids))}],"a":[{",".join(acts[s][inside])}],"c":{c}}}'
        )
    return out


def feature_page(r: Inspection, j: int, shown: list[str], special: set[int], paged: set[int],
                 derived: dict[str, np.ndarray]) -> str:  # fmt: skip
    """HTML of the page of tabulated slot ``j``; ``shown`` is the display text of every token id and
    ``derived`` holds ``density`` and ``mean`` ``[n]``."""
    a, meta = r.arrays, r.meta
    i = int(a["latents"][j])
    half = int(meta["settings"]["window"])
    count, density = int(a["count"][i]), float(derived["density"][i])
    used: set[int] = set()
    top = _examples_json(r, "top", j, np.flatnonzero(a["top_row"][j] >= 0), half, used)
    band_slots = r.band_slots(j, int(meta["settings"]["quantiles"]))
    bands = []
    for b, slots in enumerate(band_slots):
        q = len(band_slots)
        lo, hi = a["sample_value"][j, slots[-1]], a["sample_value"][j, slots[0]]
        label = (f"quantile band {100 * (q - b - 1) / q:.0f}–{100 * (q - b) / q:.0f} % of firings (random "
                 f"sample): activations {_fmt(lo)} … {_fmt(hi)}")  # fmt: skip
        ex = _examples_json(r, "sample", j, slots, half, used)
        bands.append(f'{{"label":{json.dumps(label, ensure_ascii=False)},"ex":[{",".join(ex)}]}}')
    tok = json.dumps(
        {str(t): shown[t] if 0 <= t < len(shown) else "?" for t in sorted(used)}, ensure_ascii=False
    )
    data = (f'{{"kind":"feature","latent":{i},"max":{float(a["max"][i]) if count else 0.0!r},"tok":{tok},'
            f'"special":{json.dumps(sorted(t for t in used if t in special))},"top":[{",".join(top)}],'
            f'"bands":[{",".join(bands)}]}}')  # fmt: skip
    title = f"{meta['name']} · latent {i}"
    stat = [("density", f"{100 * density:.4g} %" if count else "dead"), ("firings", f"{count:,}"),
            ("tokens read", f"{r.tokens:,}"), ("max activation", _fmt(a["max"][i]) if count else "–"),
            ("mean when firing", _fmt(derived["mean"][i]) if count else "–")]  # fmt: skip
    stats = "".join(
        f'<div class="stat"><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>' for k, v in stat
    )
    panels = [f'<div class="panel hist"><h3>activation histogram ({count:,} firings)</h3>'
              f'{histogram_svg(a["hist"][i], a["hist_neg"][i] if "hist_neg" in a else None)}</div>']  # fmt: skip
    if "lens_top_ids" in a:
        panels.append(
            _logit_table("logit lens: promoted", shown, a["lens_top_ids"][j], a["lens_top_values"][j])
        )
        panels.append(_logit_table("logit lens: suppressed", shown, a["lens_bottom_ids"][j],
                                   a["lens_bottom_values"][j]))  # fmt: skip
    near = []
    for t, c in zip(a["near_ids"][j], a["near_cos"][j]):
        t = int(t)
        link = f'<a href="{t}.html">#{t}</a>' if t in paged else f"#{t}"
        near.append(f"<tr><td>{link}</td><td class='num'>{c:.3f}</td></tr>")
    panels.append(f'<div class="panel"><h3>nearest features (decoder cosine)</h3><table class="grid">'
                  f"{''.join(near)}</table></div>")  # fmt: skip
    nav = ['<a href="../index.html">← all latents</a>', '<a href="../../index.html">dictionaries</a>']
    if j > 0:
        nav.append(f'<a href="{int(a["latents"][j - 1])}.html">‹ #{int(a["latents"][j - 1])}</a>')
    if j + 1 < len(a["latents"]):
        nav.append(f'<a href="{int(a["latents"][j + 1])}.html">#{int(a["latents"][j + 1])} ›</a>')
    sub = (f"{meta['architecture']} · {meta['hookpoint']}" + (f" → {meta['target']}" if meta["target"] else "")
           + f" · {meta['n_latents']:,} latents · cache {meta['cache']}")  # fmt: skip
    body = (f'<div class="nav">{"".join(nav)}</div><h1>{html.escape(title)}</h1>'
            f'<p class="sub">{html.escape(sub)}</p><div class="stats">{stats}</div>'
            f'<div class="panels">{"".join(panels)}</div>'
            f'<p class="note">Logit lens: {html.escape(str(meta.get("lens", "")))}. Early in the network the lens '
            "is noisy. Hatched tokens are positions the cache excluded (no activation).</p>"
            f"<h2>Top activations</h2>"
            f'<div class="examples" id="top-examples"></div>'
            f"<h2>Activation quantiles (random sample of firings)</h2>"
            f'<div class="examples" id="quantile-examples"></div>'
            '<noscript><p>The contexts need JavaScript (the page is static; no network).</p></noscript>')  # fmt: skip
    return _page(title, body, 2, raw_data=data)


def index_page(r: Inspection, shown: list[str], paged: set[int], per_page: int = 100) -> str:
    """HTML of a dictionary's latent table."""
    a, meta = r.arrays, r.meta
    n = r.n_latents
    half = int(meta["settings"]["window"])
    top_token: list[str | None] = [None] * n
    logit_token: list[str | None] = [None] * n
    for j, i in enumerate(a["latents"]):
        if a["top_row"].shape[1] and a["top_row"][j, 0] >= 0:
            top_token[int(i)] = shown[int(a["top_tokens"][j, 0, half])]
        if "lens_top_ids" in a:
            logit_token[int(i)] = shown[int(a["lens_top_ids"][j, 0])]
    density, count = r.density(), a["count"]
    data = {"kind": "index", "tokens": r.tokens, "per_page": per_page, "latent": list(range(n)),
            "density": [_num(v) for v in density], "count": [int(c) for c in count],
            "max": [_num(v) if c else None for v, c in zip(a["max"], count)],
            "mean": [_num(v) if c else None for v, c in zip(r.mean_active(), count)],
            "top_token": top_token, "logit_token": logit_token,
            "page": [int(i in paged) for i in range(n)]}  # fmt: skip
    dead = int((count == 0).sum())
    sub = (f"{meta['architecture']} · {meta['hookpoint']}" + (f" → {meta['target']}" if meta["target"] else "")
           + f" · {n:,} latents ({len(paged):,} with pages) · {r.tokens:,} tokens of {meta['cache']}"
           + f" · {dead:,} never fired")  # fmt: skip
    heads = [("latent", "latent", ""), ("density", "density", "num"), ("count", "firings", "num"),
             ("max", "max act", "num"), ("mean", "mean act", "num"), ("top_token", "top-activating token", ""),
             ("logit_token", "top logit token", "")]  # fmt: skip
    th = "".join(f'<th data-key="{k}" class="{c}">{html.escape(t)}</th>' for k, t, c in heads)
    body = (f'<div class="nav"><a href="../index.html">← dictionaries</a></div>'
            f"<h1>{html.escape(meta['name'])}</h1><p class='sub'>{html.escape(sub)}</p>"
            f'<div class="panel hist"><h3>latent densities (log10 of firing fraction)</h3>'
            f"{density_svg(density)}</div>"
            '<div class="controls"><input id="search" type="search" placeholder="search: latent id or token text">'
            '<button id="prev">‹ prev</button><button id="next">next ›</button><span id="page-info"></span></div>'
            f'<table class="features"><thead><tr>{th}</tr></thead><tbody id="rows"></tbody></table>'
            "<noscript><p>The table needs JavaScript (the page is static; no network).</p></noscript>")  # fmt: skip
    return _page(meta["name"], body, 1, data)


def density_svg(density: np.ndarray, width: int = 440, height: int = 120) -> str:
    """Inline SVG histogram of log10(density) over the latents that fired."""
    alive = density[density > 0]
    if not len(alive):
        return '<p class="note">no latent fired</p>'
    logs = np.log10(alive)
    lo, hi = math.floor(logs.min()), max(math.ceil(logs.max()), math.floor(logs.min()) + 1)
    bins = 4 * (hi - lo)
    counts, _ = np.histogram(logs, bins=bins, range=(lo, hi))
    pad_l, pad_b, pad_t = 34, 26, 8
    w, h = width - pad_l - 6, height - pad_b - pad_t
    bw, top = w / bins, int(counts.max())
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="density histogram">']  # fmt: skip
    for b, c in enumerate(counts):
        if c:
            bh = max(1.0, h * c / top)
            a0, a1 = lo + b / 4, lo + (b + 1) / 4
            parts.append(f'<rect class="bar" x="{pad_l + b * bw:.2f}" y="{pad_t + h - bh:.2f}" '
                         f'width="{max(1.0, bw - 1):.2f}" height="{bh:.2f}"><title>{c} latents with log10 density in '
                         f"[{a0:.2f}, {a1:.2f})</title></rect>")  # fmt: skip
    y0 = pad_t + h
    parts.append(f'<line class="axis" x1="{pad_l}" y1="{y0}" x2="{pad_l + w}" y2="{y0}"/>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{top}</text>')
    for e in range(lo, hi + 1):
        parts.append(
            f'<text x="{pad_l + (e - lo) * 4 * bw:.1f}" y="{y0 + 14}" text-anchor="middle">{e}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def landing_page(results: dict[str, Inspection]) -> str:
    """HTML of ``out/index.html``: one row per dictionary."""
    rows = []
    for name, r in results.items():
        m = r.meta
        dead = int((r["count"] == 0).sum())
        rows.append(f"<tr><td><a href='{html.escape(name)}/index.html'>{html.escape(name)}</a></td>"
                    f"<td>{html.escape(m['architecture'])}</td><td>{html.escape(m['hookpoint'])}"
                    f"{' → ' + html.escape(m['target']) if m['target'] else ''}</td>"
                    f"<td class='num'>{m['n_latents']:,}</td><td class='num'>{r.tokens:,}</td>"
                    f"<td class='num'>{100 * dead / max(1, m['n_latents']):.1f} %</td></tr>")  # fmt: skip
    body = ("<h1>sparsedict feature browser</h1><p class='sub'>Static pages written by "
            "<code>sparsedict inspect</code>; open them from disk.</p><table class='grid'><tr><th>dictionary</th>"
            "<th>architecture</th><th>hookpoint</th><th class='num'>latents</th><th class='num'>tokens read</th>"
            f"<th class='num'>never fired</th></tr>{''.join(rows)}</table>")  # fmt: skip
    return _page("sparsedict feature browser", body, 0)


def write_browser(out: Path, results: dict[str, Inspection], texts: list[str], special: set[int]) -> Path:
    """Write the whole browser under ``out``; returns ``out/index.html``."""
    write_assets(out)
    shown = [display(t) for t in texts]
    for name, r in results.items():
        folder = out / name
        (folder / "features").mkdir(parents=True, exist_ok=True)
        paged = {int(i) for i in r["latents"]}
        (folder / "index.html").write_text(index_page(r, shown, paged), encoding="utf-8")
        derived = {"density": r.density(), "mean": r.mean_active()}
        for j, i in enumerate(r["latents"]):
            page = feature_page(r, j, shown, special, paged, derived)
            (folder / "features" / f"{int(i)}.html").write_text(page, encoding="utf-8")
    index = out / "index.html"
    index.write_text(landing_page(results), encoding="utf-8")
    return index

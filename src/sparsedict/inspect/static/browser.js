/* sparsedict feature browser: renders the data embedded in each page (<script id="data">).
   Token text is only ever inserted with textContent, never as HTML. */
"use strict";

function pageData() {
  const el = document.getElementById("data");
  return el ? JSON.parse(el.textContent) : null;
}

function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  if (a >= 1000) return Math.round(v).toLocaleString("en-US");
  return String(Number(v.toPrecision(digits === undefined ? 4 : digits)));
}

function pct(v) {
  if (v === 0) return "0";
  if (v < 1e-4) return v.toExponential(1);
  return (100 * v).toPrecision(3) + " %";
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

/* ---------------------------------------------------------------- feature page */

function tokenSpan(d, id, act, fire, scale) {
  const text = d.tok[id];
  const s = el("span", "tok", text === undefined ? "\u00bf" : text);
  if (d.special.indexOf(id) >= 0) s.classList.add("special");
  if (act === null) {
    s.classList.add("excl");
    s.title = JSON.stringify(text) + "  not cached (position excluded from the cache: BOS, attention sink or special token)";
  } else {
    const a = scale > 0 ? Math.min(1, Math.abs(act) / scale) : 0;
    if (act > 0) s.style.backgroundColor = "rgba(234, 88, 12, " + (0.08 + 0.82 * a).toFixed(3) + ")";
    else if (act < 0) s.style.backgroundColor = "rgba(37, 99, 235, " + (0.08 + 0.82 * a).toFixed(3) + ")";
    s.title = JSON.stringify(text) + "  activation " + fmt(act, 4);
    s.dataset.act = String(act);
  }
  if (fire) s.classList.add("fire");
  return s;
}

function renderExample(d, ex, scale) {
  const row = el("div", "ex");
  row.appendChild(el("span", "val", fmt(ex.v, 3)));
  const ctx = el("span", "ctx");
  for (let i = 0; i < ex.t.length; i++) ctx.appendChild(tokenSpan(d, ex.t[i], ex.a[i], i === ex.c, scale));
  row.appendChild(ctx);
  return row;
}

function renderFeature(d) {
  const scale = d.max > 0 ? d.max : Math.abs(d.max);
  const top = document.getElementById("top-examples");
  if (top) {
    if (!d.top.length) top.appendChild(el("p", "note", "This latent never fired on the tokens read."));
    for (const ex of d.top) top.appendChild(renderExample(d, ex, scale));
  }
  const q = document.getElementById("quantile-examples");
  if (q) {
    for (const band of d.bands) {
      q.appendChild(el("div", "band", band.label));
      for (const ex of band.ex) q.appendChild(renderExample(d, ex, scale));
    }
  }
}

/* ---------------------------------------------------------------- index page */

function renderIndex(d) {
  const body = document.getElementById("rows");
  const search = document.getElementById("search");
  const info = document.getElementById("page-info");
  const n = d.latent.length;
  let order = Array.from({ length: n }, (_, i) => i);
  let shown = order;
  let sortKey = null, asc = true, page = 0;
  const per = d.per_page || 100;
  const keys = Array.from(document.querySelectorAll("th[data-key]"), (th) => th.dataset.key);

  function cell(tr, text, cls) { const td = el("td", cls, text); tr.appendChild(td); return td; }

  function draw() {
    body.textContent = "";
    const pages = Math.max(1, Math.ceil(shown.length / per));
    page = Math.min(page, pages - 1);
    const maxLog = Math.log10(d.tokens);
    for (const i of shown.slice(page * per, (page + 1) * per)) {
      const tr = el("tr", d.count[i] === 0 ? "dead" : "");
      const td = el("td");
      if (d.page[i]) {
        const a = el("a", "", "#" + d.latent[i]);
        a.href = "features/" + d.latent[i] + ".html";
        td.appendChild(a);
      } else td.textContent = "#" + d.latent[i];
      tr.appendChild(td);
      const dens = cell(tr, "", "num");
      dens.appendChild(el("span", "", d.count[i] === 0 ? "dead" : pct(d.density[i]) + " "));
      if (d.count[i] > 0) {
        const bar = el("span", "dbar");
        bar.style.width = (2 + 60 * Math.max(0, 1 + Math.log10(d.density[i]) / maxLog)).toFixed(1) + "px";
        dens.appendChild(bar);
      }
      cell(tr, String(d.count[i]), "num");
      cell(tr, d.count[i] ? fmt(d.max[i]) : "–", "num");
      cell(tr, d.count[i] ? fmt(d.mean[i]) : "–", "num");
      const t1 = cell(tr, "");
      if (d.top_token[i] !== null) t1.appendChild(el("span", "tokbox", d.top_token[i]));
      const t2 = cell(tr, "");
      if (d.logit_token[i] !== null) t2.appendChild(el("span", "tokbox", d.logit_token[i]));
      body.appendChild(tr);
    }
    info.textContent = shown.length + " of " + n + " latents · page " + (page + 1) + " / " + pages;
    for (const th of document.querySelectorAll("th[data-key]")) {
      th.classList.toggle("sorted", th.dataset.key === sortKey);
      th.classList.toggle("asc", th.dataset.key === sortKey && asc);
    }
  }

  function sortBy(key, ascending) {
    if (!keys.includes(key)) key = "latent";
    if (ascending !== undefined) { sortKey = key; asc = ascending; }
    else if (key === sortKey) asc = !asc;
    else { sortKey = key; asc = key === "latent" || key === "top_token" || key === "logit_token"; }
    const v = d[key];
    order.sort((i, j) => {  // missing values last either way; ties: lower latent id first
      const a = v[i], b = v[j];
      if (a === null || b === null) {
        if (a !== b) return a === null ? 1 : -1;
      } else if (a !== b) {
        const c = a < b ? -1 : 1;
        return asc ? c : -c;
      }
      return d.latent[i] - d.latent[j];
    });
    filter();
  }

  function filter() {
    const q = search.value.trim().toLowerCase();
    if (!q) shown = order;
    else {
      const id = /^#?\d+$/.test(q) ? parseInt(q.replace("#", ""), 10) : -1;
      shown = order.filter((i) => d.latent[i] === id
        || (d.top_token[i] !== null && d.top_token[i].toLowerCase().includes(q))
        || (d.logit_token[i] !== null && d.logit_token[i].toLowerCase().includes(q)));
    }
    draw();
    remember();
  }

  /* The view lives in the address's fragment (#sort=-max&q=the&page=2: "-" sorts descending), so a
     view can be bookmarked or shared, and a page opened with one starts there. */
  function remember() {
    const p = new URLSearchParams();
    p.set("sort", (asc ? "" : "-") + sortKey);
    if (search.value.trim()) p.set("q", search.value.trim());
    if (page > 0) p.set("page", String(page + 1));
    try { history.replaceState(null, "", "#" + p.toString()); } catch (e) { /* some file:// settings refuse */ }
  }

  for (const th of document.querySelectorAll("th[data-key]")) th.addEventListener("click", () => { page = 0; sortBy(th.dataset.key); });
  search.addEventListener("input", () => { page = 0; filter(); });
  document.getElementById("prev").addEventListener("click", () => { page = Math.max(0, page - 1); draw(); remember(); });
  document.getElementById("next").addEventListener("click", () => { page += 1; draw(); remember(); });
  const start = new URLSearchParams(location.hash.replace(/^#/, ""));
  const sort = start.get("sort") || "latent";
  search.value = start.get("q") || "";
  page = Math.max(0, (parseInt(start.get("page") || "1", 10) || 1) - 1);
  sortBy(sort.replace(/^-/, ""), !sort.startsWith("-"));
}

document.addEventListener("DOMContentLoaded", () => {
  const d = pageData();
  if (!d) return;
  if (d.kind === "feature") renderFeature(d);
  else if (d.kind === "index") renderIndex(d);
});

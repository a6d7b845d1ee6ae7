"""The report page: one self-contained HTML file with its CSS, JavaScript and data inline.

The data (`arc_jax.report.build.page_data`) is embedded as JSON; the script draws every grid as
a CSS grid of `<i class="c<colour>">` cells in the ARC palette, one cell per grid cell, and does
the filtering, sorting, search and paging. Nothing is fetched: no server, no network.
"""

from __future__ import annotations

import html
import json
from typing import Any

from arc_jax.train.tensorboard import ARC_PALETTE

_PALETTE_CSS = "\n".join(
    f".c{i} {{ background: #{r:02X}{g:02X}{b:02X}; }}" for i, (r, g, b) in enumerate(ARC_PALETTE))

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 24px 24px; color: #222;
       background: #f6f6f6; }
h1 { font-size: 20px; margin: 16px 0 8px; }
h3 { font-size: 14px; margin: 12px 0 4px; }
table.metrics { border-collapse: collapse; margin: 4px 0 8px; background: #fff; }
table.metrics th, table.metrics td { padding: 2px 12px; text-align: right;
                                     border-bottom: 1px solid #e2e2e2; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
.summary { display: flex; gap: 32px; flex-wrap: wrap; align-items: flex-start; }
.note { color: #8a5a00; margin: 4px 0; }
.ids a { font-family: monospace; margin-right: 8px; cursor: pointer; color: #0b57a0; }
#controls { position: sticky; top: 0; z-index: 1; background: #f6f6f6; padding: 8px 0;
            border-bottom: 1px solid #ccc; display: flex; gap: 12px; flex-wrap: wrap;
            align-items: center; }
.task { background: #fff; border: 1px solid #ddd; border-radius: 6px; margin: 12px 0;
        padding: 8px 12px; }
.task-head { display: flex; gap: 10px; align-items: baseline; flex-wrap: wrap; }
.task-head h2 { font: 600 16px monospace; margin: 0; }
.badge { border-radius: 10px; padding: 1px 8px; font-size: 12px; color: #fff; }
.badge.solved, .badge.fixed { background: #2e8b3a; }
.badge.unsolved, .badge.broken { background: #b03a2e; }
.badge.not-scored, .badge.missing { background: #777; }
.badge.invalid-output { background: #b8860b; }
.label { font-size: 12px; color: #555; }
.row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; margin: 6px 0; }
.group { display: flex; gap: 8px; align-items: flex-start; padding: 4px 6px;
         border-left: 3px solid #ddd; }
.pair { display: flex; gap: 4px; align-items: center; }
.arrow { color: #888; }
.figure { display: flex; flex-direction: column; align-items: center; gap: 2px;
          font-size: 12px; }
.grid { display: grid; gap: 1px; background: #555; border: 1px solid #555; }
.grid i { display: block; width: var(--cell); height: var(--cell); }
.empty { width: 48px; height: 48px; border: 1px dashed #aaa; color: #999; display: flex;
         align-items: center; justify-content: center; }
.mark { font-size: 12px; padding: 0 6px; border-radius: 3px; }
.mark.right { background: #d4f5d8; color: #15631f; }
.mark.wrong { background: #fbdcd8; color: #8c1d12; }
.mark.invalid-output { background: #fbeacc; color: #7a5200; }
.mark.no-2nd-grid, .mark.no-target { background: #e8e8e8; color: #555; }
""" + _PALETTE_CSS

SCRIPT = r"""
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const RUNS = DATA.runs;
  const COMPARE = RUNS.length > 1;
  const LAST = RUNS.length - 1;
  const PAGE_SIZES = [20, 50, 100, 0];  // 0: all
  const state = {filter: "all", sort: "id", q: "", page: 0, size: 50};

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  const slug = (s) => String(s).toLowerCase().replace(/[^a-z0-9]+/g, "-");
  const METRIC_NAMES = {
    val_loss: "val loss", accuracy: "accuracy (top-1)", pass_2: "pass@2",
    correct_size: "correct size", correct_pixels: "correct pixels",
    coverage: "coverage (target among the candidates)", solved_tasks: "tasks solved",
    n_tasks: "tasks", n_scored_tasks: "tasks scored",
    n_test: "test inputs", n_candidates: "candidates", n_invalid: "candidates without a grid",
    n_fallback: "test inputs without an answer", ttft_seconds: "TTFT time",
  };

  function formatValue(key, v) {
    if (v === null || v === undefined) return "–";
    if (typeof v !== "number") return String(v);
    if (["accuracy", "pass_2", "correct_size", "correct_pixels", "coverage"].includes(key))
      return (100 * v).toFixed(1) + "%";
    if (key === "val_loss") return v.toFixed(4);
    if (key.endsWith("seconds")) return v.toFixed(1) + " s";
    return Number.isInteger(v) ? String(v) : v.toFixed(4);
  }

  // Grids: one <i> per cell, sized so that no grid is wider or taller than about 160 px.
  function drawGrid(grid, caption) {
    const fig = el("div", "figure");
    if (!grid) {
      fig.append(el("div", "empty", "–"), el("span", "label", caption));
      return fig;
    }
    const h = grid.length, w = grid[0].length;
    const size = Math.max(4, Math.min(16, Math.floor(160 / Math.max(h, w))));
    const g = el("div", "grid");
    g.style.gridTemplateColumns = "repeat(" + w + ", " + size + "px)";
    g.style.setProperty("--cell", size + "px");
    g.dataset.h = h;
    g.dataset.w = w;
    let cells = "";
    for (const row of grid) for (const c of row) cells += '<i class="c' + (c | 0) + '"></i>';
    g.innerHTML = cells;
    fig.append(g, el("span", "label", caption + " · " + h + "×" + w));
    return fig;
  }

  function summary() {
    const box = document.getElementById("summary");
    const wrap = el("div", "summary");
    const keys = ["val_loss", "accuracy", "pass_2", "correct_size", "correct_pixels",
                  "coverage", "solved_tasks", "n_tasks", "n_scored_tasks", "n_test",
                  "n_candidates", "n_invalid", "n_fallback", "ttft_seconds"];
    const table = el("table", "metrics");
    const head = table.insertRow();
    head.append(el("th", null, "metric"));
    for (const r of RUNS) head.append(el("th", null, r.label));
    if (COMPARE) head.append(el("th", null, "B − A"));
    for (const key of keys) {
      const values = RUNS.map((r) => r.overall[key]);
      if (values.every((v) => v === null || v === undefined)) continue;
      const row = table.insertRow();
      row.append(el("td", null, METRIC_NAMES[key] || key));
      for (const v of values) row.append(el("td", null, formatValue(key, v)));
      if (COMPARE) {
        const [a, b] = values;
        const delta = typeof a === "number" && typeof b === "number" ? b - a : null;
        row.append(el("td", null, delta === null ? "–"
          : (delta > 0 ? "+" : "") + formatValue(key, delta)));
      }
    }
    const left = el("div");
    left.append(el("h3", null, "Overall"), table);
    wrap.append(left);
    const info = el("table", "metrics");
    const ihead = info.insertRow();
    ihead.append(el("th", null, "run"));
    for (const r of RUNS) ihead.append(el("th", null, r.label));
    const fields = new Set();
    for (const r of RUNS) for (const k of Object.keys(r.info)) fields.add(k);
    for (const k of fields) {
      const row = info.insertRow();
      row.append(el("td", null, k));
      for (const r of RUNS) row.append(el("td", null, formatValue(k, r.info[k])));
    }
    const right = el("div");
    right.append(el("h3", null, "Runs"), info);
    wrap.append(right);
    box.append(wrap);
    for (const r of RUNS) for (const n of r.notes) box.append(el("p", "note", r.label + ": " + n));
    if (COMPARE) {
      for (const [kind, ids] of [["fixed", DATA.fixed], ["broken", DATA.broken]]) {
        const p = el("p", "ids");
        p.id = kind;
        p.append(el("strong", null, (kind === "fixed" ? "Fixed by B (solved in B, not in A)"
          : "Broken by B (solved in A, not in B)") + ": " + ids.length + " "));
        for (const id of ids) {
          const a = el("a", null, id);
          a.addEventListener("click", () => { setState({q: id, filter: "all", page: 0}); });
          p.append(a);
        }
        box.append(p);
      }
    }
  }

  function option(select, value, text) {
    const o = el("option", null, text);
    o.value = value;
    select.append(o);
  }

  function controls() {
    const box = document.getElementById("controls");
    const last = COMPARE ? " (" + RUNS[LAST].label + ")" : "";
    const filter = el("select");
    filter.id = "filter";
    option(filter, "all", "all tasks");
    option(filter, "solved", "solved" + last);
    option(filter, "unsolved", "unsolved" + last);
    option(filter, "invalid", "invalid output" + last);
    if (COMPARE) {
      option(filter, "fixed", "fixed by B");
      option(filter, "broken", "broken by B");
    }
    const sort = el("select");
    sort.id = "sort";
    option(sort, "id", "task id");
    RUNS.forEach((r, i) => {
      option(sort, "loss" + i, "val loss" + (COMPARE ? " (" + r.label + ")" : ""));
    });
    const q = el("input");
    q.id = "q";
    q.placeholder = "task id contains…";
    const size = el("select");
    size.id = "size";
    for (const n of PAGE_SIZES) option(size, String(n), n ? n + " per page" : "all on one page");
    const prev = el("button", null, "‹ prev");
    const next = el("button", null, "next ›");
    const count = el("span", "label");
    count.id = "count";
    box.append(el("span", "label", "show"), filter, el("span", "label", "sort by"), sort, q,
               size, prev, next, count);
    filter.addEventListener("change", () => setState({filter: filter.value, page: 0}));
    sort.addEventListener("change", () => setState({sort: sort.value, page: 0}));
    q.addEventListener("input", () => setState({q: q.value, page: 0}));
    size.addEventListener("change", () => setState({size: Number(size.value), page: 0}));
    prev.addEventListener("click", () => setState({page: Math.max(0, state.page - 1)}));
    next.addEventListener("click", () => setState({page: state.page + 1}));
  }

  function matches(task) {
    const run = task.runs[LAST];
    if (state.q && !task.id.includes(state.q)) return false;
    switch (state.filter) {
      case "solved": return !!run && run.status === "solved";
      case "unsolved": return !!run && run.status === "unsolved";
      case "invalid": return !!run && run.invalid;
      case "fixed": case "broken": return task.change === state.filter;
      default: return true;
    }
  }

  function sorted(tasks) {
    const out = tasks.slice();
    if (state.sort.startsWith("loss")) {
      const i = Number(state.sort.slice(4));
      const loss = (t) => (t.runs[i] && t.runs[i].val_loss !== null ? t.runs[i].val_loss
                                                                      : Infinity);
      out.sort((a, b) => loss(a) - loss(b) || (a.id < b.id ? -1 : 1));
    }
    return out;  // the data comes sorted by task id
  }

  function runGroup(run, label, test) {
    const group = el("div", "group");
    if (label) group.append(el("span", "label", label));
    if (!run) {
      group.append(el("span", "badge missing", "not in this run"));
      return group;
    }
    if (!test) {
      group.append(el("span", "label", "no predictions for this test input"));
      return group;
    }
    test.attempts.forEach((a, k) => {
      const fig = drawGrid(a.grid, "attempt " + (k + 1));
      const mark = el("span", "mark " + slug(a.mark), a.mark);
      if (a.note) mark.title = a.note;
      fig.append(mark);
      group.append(fig);
    });
    return group;
  }

  function card(task) {
    const box = el("section", "task");
    box.id = "task-" + task.id;
    box.dataset.task = task.id;
    const last = task.runs[LAST];
    box.dataset.status = last ? last.status : "missing";
    if (task.change) box.dataset.change = task.change;
    const head = el("div", "task-head");
    head.append(el("h2", null, task.id));
    task.runs.forEach((run, i) => {
      if (COMPARE) head.append(el("span", "label", RUNS[i].label));
      if (!run) {
        head.append(el("span", "badge missing", "not in this run"));
        return;
      }
      head.append(el("span", "badge status " + slug(run.status), run.status));
      if (run.tests.length > 1) head.append(el("span", "label", run.tests_solved + " test inputs"));
      if (run.invalid) head.append(el("span", "badge invalid-output", "invalid output"));
      head.append(el("span", "label", "val loss " + formatValue("val_loss", run.val_loss)));
    });
    if (task.change) head.append(el("span", "badge " + task.change, task.change + " by B"));
    box.append(head);
    if (task.note) box.append(el("p", "note", task.note));
    if (task.train) {
      const row = el("div", "row");
      task.train.forEach((pair, k) => {
        const p = el("div", "pair");
        p.append(drawGrid(pair[0], "train " + (k + 1) + " in"), el("span", "arrow", "→"),
                 drawGrid(pair[1], "out"));
        row.append(p);
      });
      box.append(el("h3", null, "Train pairs"), row);
    }
    task.inputs.forEach((input, q) => {
      box.append(el("h3", null, task.inputs.length > 1 ? "Test input " + (q + 1) : "Test"));
      const row = el("div", "row");
      if (task.train) row.append(drawGrid(input, "test input"));
      row.append(drawGrid(task.targets[q], "target"));
      task.runs.forEach((run, i) => {
        row.append(runGroup(run, COMPARE ? RUNS[i].label : "", run && run.tests[q]));
      });
      box.append(row);
    });
    return box;
  }

  function render() {
    const shown = sorted(DATA.tasks.filter(matches));
    const size = state.size || shown.length || 1;
    const pages = Math.max(1, Math.ceil(shown.length / size));
    state.page = Math.min(state.page, pages - 1);
    const start = state.page * size;
    const page = shown.slice(start, start + size);
    const main = document.getElementById("tasks");
    main.replaceChildren(...page.map(card));
    if (!page.length) main.append(el("p", "note", "No task matches."));
    document.getElementById("count").textContent = shown.length
      ? "tasks " + (start + 1) + "–" + (start + page.length) + " of " + shown.length
        + (shown.length < DATA.tasks.length ? " (" + DATA.tasks.length + " in all)" : "")
      : "0 of " + DATA.tasks.length + " tasks";
    document.getElementById("filter").value = state.filter;
    document.getElementById("sort").value = state.sort;
    document.getElementById("q").value = state.q;
    document.getElementById("size").value = String(state.size);
  }

  // The state lives in the URL fragment (#filter=solved&sort=loss0), so a view can be linked.
  function setState(change) {
    Object.assign(state, change);
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(state)) params.set(k, String(v));
    history.replaceState(null, "", "#" + params.toString());
    render();
  }

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    for (const k of Object.keys(state)) {
      if (!params.has(k)) continue;
      const v = params.get(k);
      state[k] = typeof state[k] === "number" ? Number(v) || 0 : v;
    }
  }

  readHash();
  summary();
  controls();
  render();
})();
"""


def _json_for_script(data: Any) -> str:
    """JSON safe inside a <script> element: no `<`, `>` or `&` can close it or open a comment."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(data: dict[str, Any], title: str) -> str:
    """The complete HTML page for `data` (see `arc_jax.report.build.page_data`)."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<noscript><p class="note">This report draws its grids with JavaScript.</p></noscript>
<section id="summary"></section>
<div id="controls"></div>
<main id="tasks"></main>
<script type="application/json" id="report-data">{_json_for_script(data)}</script>
<script>{SCRIPT}</script>
</body>
</html>
"""

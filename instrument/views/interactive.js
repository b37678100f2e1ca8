/* seq-instrument's interactive view: draws the JSON held by `root`'s .si-data script. No network, no libraries.
   Heatmaps are canvases (fast for 50 x 200 tokens); every value is also on hover, in the bar chart and in the
   CSV/JSON export. Keys: arrows move over the heatmap, Enter opens the column, "/" searches the examples. */
function seqInstrumentView(root) {
  "use strict";
  if (!root || root.dataset.ready) return;
  root.dataset.ready = "1";
  const started = performance.now();
  const data = JSON.parse(root.querySelector(".si-data").textContent);
  const COL = data.colours;
  const state = { example: 0, level: "tokens", source: null, column: null, cursor: [0, 0], step: 0, headLayer: 0 };

  function el(tag, cls, text, parent) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }
  const fmt = (v) => (v === null || v === undefined ? "NaN" : String(v));
  const quote = (s) => "\u201c" + s + "\u201d";
  function colour(v, scale) {
    if (v === null || !(scale > 0)) return null;
    const s = Math.min(Math.abs(v) / scale, 1), end = v >= 0 ? COL.positive : COL.negative;
    return "rgb(" + [0, 1, 2].map((i) => Math.round(COL.zero[i] + (end[i] - COL.zero[i]) * s)).join(",") + ")";
  }
  function largest(get, nr, nc) {
    let top = 0;
    for (let r = 0; r < nr; r++) for (let c = 0; c < nc; c++) { const v = get(r, c); if (v !== null && Math.abs(v) > top) top = Math.abs(v); }
    return top;
  }

  // -- layout -------------------------------------------------------------------------------------------------
  const header = data.header;
  el("h3", "si-title", header.title || "Attributions", root);
  const meta = el("div", "si-meta", null, root);
  [["model", header.model], ["method", header.method], ["attributed function", header.attributed_fn],
   ["arguments", header.arguments], ["step scores", header.step_scores], ["version", header.version]].forEach(([k, v]) => {
    if (v === null || v === undefined) return;
    const d = el("div", null, null, meta); el("b", null, k + ": ", d); d.appendChild(document.createTextNode(v)); d.title = v;
  });
  const body = el("div", "si-body", null, root);
  const list = el("aside", "si-list", null, body);
  const main = el("div", "si-main", null, body);
  const controls = el("div", "si-controls", null, main);
  const legend = el("div", "si-legend", null, main);
  const text = el("div", "si-text", null, main);
  const scroll = el("div", "si-scroll", null, main);
  const canvas = el("canvas", "si-heatmap", null, scroll);
  canvas.tabIndex = 0;
  canvas.setAttribute("role", "img");
  const readout = el("div", "si-note si-readout", null, main);
  readout.setAttribute("aria-live", "polite");
  const bars = el("section", "si-bars", null, main);
  const layers = el("section", "si-layers", null, main);
  const heads = el("section", "si-heads-panel", null, main);
  const exportBox = el("details", "si-export", null, main);
  el("summary", null, "Values (CSV / JSON export)", exportBox);
  const tip = el("div", "si-tip", null, root);

  // -- examples list with search ------------------------------------------------------------------------------
  const examples = data.examples;
  const haystack = examples.map((e) => (e.title + "\n" + e.input + "\n" + e.generated).toLowerCase());
  let items = [];
  if (examples.length > 1) {
    const search = el("input", "si-search", null, list);
    search.type = "search"; search.placeholder = "Search " + examples.length + " examples"; search.setAttribute("aria-label", "Search examples");
    const count = el("div", "si-note si-count", null, list);
    const ol = el("ol", null, null, list);
    items = examples.map((e, i) => {
      const li = el("li", null, null, ol), b = el("button", null, e.title + ": " + e.input, li);
      b.type = "button"; b.title = e.input + " \u2192 " + e.generated; b.dataset.index = i;
      b.addEventListener("click", () => openExample(i));
      b.addEventListener("keydown", (ev) => moveInList(ev, li));
      return li;
    });
    const filter = () => {
      const q = search.value.trim().toLowerCase();
      let shown = 0;
      items.forEach((li, i) => { const hit = !q || haystack[i].includes(q); li.classList.toggle("si-hidden", !hit); shown += hit; });
      count.textContent = shown + " of " + examples.length + " examples";
    };
    search.addEventListener("input", filter);
    search.addEventListener("keydown", (ev) => {
      const first = items.find((li) => !li.classList.contains("si-hidden"));
      if (first && (ev.key === "Enter" || ev.key === "ArrowDown")) { ev.preventDefault(); first.firstChild.focus(); if (ev.key === "Enter") first.firstChild.click(); }
    });
    root.addEventListener("keydown", (ev) => { if (ev.key === "/" && ev.target.tagName !== "INPUT") { ev.preventDefault(); search.focus(); } });
    filter();
  } else list.classList.add("si-hidden");
  function moveInList(ev, li) {
    if (ev.key !== "ArrowDown" && ev.key !== "ArrowUp") return;
    ev.preventDefault();
    let next = ev.key === "ArrowDown" ? li.nextElementSibling : li.previousElementSibling;
    while (next && next.classList.contains("si-hidden")) next = ev.key === "ArrowDown" ? next.nextElementSibling : next.previousElementSibling;
    if (next) next.firstChild.focus();
  }

  // -- controls -------------------------------------------------------------------------------------------------
  function labelled(name, node) { const l = el("label", null, name + " ", controls); l.appendChild(node); return node; }
  const levelSelect = labelled("aggregation", el("select", "si-level"));
  const layerSelect = labelled("show", el("select", "si-layer"));
  const csvButton = el("button", "si-export-csv", "Export CSV", controls), jsonButton = el("button", "si-export-json", "Export JSON", controls);
  csvButton.type = jsonButton.type = "button";
  levelSelect.addEventListener("change", () => { state.level = levelSelect.value; state.source = null; render(); });
  layerSelect.addEventListener("change", () => { state.source = layerSelect.value === "" ? null : JSON.parse(layerSelect.value); drawMain(); });
  csvButton.addEventListener("click", () => exportValues("csv"));
  jsonButton.addEventListener("click", () => exportValues("json"));

  // -- the current view -----------------------------------------------------------------------------------------
  const view = () => { const e = examples[state.example]; return e.views[state.level] || e.views.tokens; };
  function sides(V) {
    const nSource = V.rows.filter((r) => r[2] === "source").length;
    return (r) => (r < nSource ? ["source", r] : ["target", r - nSource]);
  }
  function meanOfHeads(stack, layer) {
    const cache = (stack._means = stack._means || {});
    if (!cache[layer]) {
      const heads = stack[layer];
      cache[layer] = heads[0].map((row, r) => row.map((_, c) => {
        let sum = 0, n = 0;
        heads.forEach((h) => { const v = h[r][c]; if (v !== null) { sum += v; n++; } });
        return n ? sum / n : null;
      }));
    }
    return cache[layer];
  }
  function mainGetter(V) {
    const s = state.source;
    if (!s) return (r, c) => V.values[r][c];
    const side = sides(V);
    return (r, c) => {
      const [name, row] = side(r);
      if (V.layers) { const st = V.layers[name]; return st && st[s.layer] ? st[s.layer][row][c] : null; }
      const st = V.heads[name];
      if (!st || !st[s.layer]) return null;
      return s.head === undefined ? meanOfHeads(st, s.layer)[row][c] : st[s.layer][s.head][row][c];
    };
  }
  function sourceName() {
    const s = state.source;
    if (!s) return examples[state.example].layout === "heads" ? "mean over layers and heads" : (examples[state.example].layout === "layers" ? "aggregated over layers" : "scores");
    return "layer " + s.layer + (s.head === undefined ? (view().heads ? " (mean over heads)" : "") : ", head " + s.head);
  }

  function setLegend(scale) {
    legend.textContent = "";
    el("span", null, "\u2212" + fmt(+scale.toPrecision(3)), legend);
    const bar = el("div", "si-gradient", null, legend);
    bar.style.background = "linear-gradient(to right,rgb(" + COL.negative + "),rgb(" + COL.zero + "),rgb(" + COL.positive + "))";
    bar.setAttribute("role", "img"); bar.setAttribute("aria-label", "colour scale from blue (negative) through white (0) to red (positive)");
    el("span", null, "+" + fmt(+scale.toPrecision(3)), legend);
    el("span", "si-note", "blue negative \u00b7 white 0 \u00b7 red positive; colours saturate at \u00b1" + fmt(+scale.toPrecision(3)) +
      " (largest magnitude shown). Normalisation: " + header.normalisation + ".", legend);
  }

  // -- heatmap on a canvas --------------------------------------------------------------------------------------
  const FONT = "11px ui-monospace,Menlo,Consolas,monospace";
  const short = (s) => (s.length > 18 ? s.slice(0, 17) + "\u2026" : s);
  function draw(cv, spec) {
    // spec: rows, cols (labels), get(r, c), scale, cw, ch, labels (bool), steps ([name, values]), cursor, column
    const ctx = cv.getContext("2d");
    ctx.font = FONT;
    const nr = spec.rows.length, nc = spec.cols.length, cw = spec.cw, ch = spec.ch, steps = spec.steps || [];
    const x0 = spec.labels ? Math.ceil(Math.max(20, ...spec.rows.map((l) => ctx.measureText(short(l)).width), ...steps.map(([n]) => ctx.measureText(n).width))) + 8 : 0;
    const y0 = spec.labels ? Math.ceil(Math.max(20, ...spec.cols.map((l) => ctx.measureText(short(l)).width))) + 8 : 0;
    const band = 22;
    cv.width = x0 + nc * cw + 1; cv.height = y0 + nr * ch + steps.length * band + (steps.length ? 4 : 0) + 1;
    Object.assign(cv.dataset, { x0, y0, cw, ch, rows: nr, cols: nc });
    cv._spec = spec;
    ctx.font = FONT; ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, cv.width, cv.height);
    for (let r = 0; r < nr; r++) for (let c = 0; c < nc; c++) {
      const fill = colour(spec.get(r, c), spec.scale);
      if (fill) { ctx.fillStyle = fill; ctx.fillRect(x0 + c * cw, y0 + r * ch, cw, ch); }
    }
    if (cw >= 6 && ch >= 6) { ctx.strokeStyle = "#eee"; ctx.lineWidth = 1; ctx.strokeRect(x0 + 0.5, y0 + 0.5, nc * cw, nr * ch); }
    if (spec.labels) {
      ctx.fillStyle = "#1f2328"; ctx.textBaseline = "middle"; ctx.textAlign = "right";
      spec.rows.forEach((l, r) => ctx.fillText(short(l), x0 - 4, y0 + r * ch + ch / 2));
      ctx.save(); ctx.textAlign = "left";
      spec.cols.forEach((l, c) => { ctx.save(); ctx.translate(x0 + c * cw + cw / 2, y0 - 4); ctx.rotate(-Math.PI / 2); ctx.fillText(short(l), 0, 0); ctx.restore(); });
      ctx.restore();
      if (spec.splitAt) { ctx.strokeStyle = "#555"; ctx.beginPath(); ctx.moveTo(x0, y0 + spec.splitAt * ch + 0.5); ctx.lineTo(x0 + nc * cw, y0 + spec.splitAt * ch + 0.5); ctx.stroke(); }
    }
    steps.forEach(([name, values], k) => {  // step scores: a row of small bars per step function
      const top = y0 + nr * ch + 4 + k * band, most = Math.max(1e-30, ...values.map((v) => (v === null ? 0 : Math.abs(v))));
      ctx.fillStyle = "#1f2328"; ctx.textAlign = "right"; ctx.font = "italic " + FONT; ctx.fillText(name, x0 - 4, top + band / 2); ctx.font = FONT;
      values.forEach((v, c) => {
        if (v === null) return;
        const h = Math.max(1, Math.abs(v) / most * (band - 4));
        ctx.fillStyle = v >= 0 ? "#57606a" : "#bc4c00";
        ctx.fillRect(x0 + c * cw + 1, top + band - 2 - h, Math.max(1, cw - 2), h);
      });
    });
    if (spec.column !== null && spec.column !== undefined) { ctx.strokeStyle = "#0969da"; ctx.lineWidth = 2; ctx.strokeRect(x0 + spec.column * cw + 1, y0 + 1, cw - 2, nr * ch - 2); }
    if (spec.cursor) { ctx.strokeStyle = "#000"; ctx.lineWidth = 2; ctx.strokeRect(x0 + spec.cursor[1] * cw + 1, y0 + spec.cursor[0] * ch + 1, cw - 2, ch - 2); }
  }
  function cellAt(cv, ev) {
    const box = cv.getBoundingClientRect(), d = cv.dataset;
    const x = (ev.clientX - box.left) * (cv.width / box.width) - d.x0, y = (ev.clientY - box.top) * (cv.height / box.height) - d.y0;
    const c = Math.floor(x / d.cw), r = Math.floor(y / d.ch);
    if (c < 0 || c >= +d.cols || y < 0) return null;
    if (r < +d.rows) return { r, c };
    const k = Math.floor((y - d.rows * d.ch - 4) / 22);
    return (cv._spec.steps || [])[k] ? { step: k, c } : null;
  }
  function showTip(lines, value, x, y) {
    tip.textContent = "";
    const first = el("div", null, null, tip);
    first.appendChild(document.createTextNode(lines[0] + " "));
    el("b", "si-tip-value", value, first);
    lines.slice(1).forEach((l) => el("div", null, l, tip));
    tip.style.display = "block";
    const box = root.getBoundingClientRect();
    tip.style.left = Math.min(x - box.left + 14, Math.max(0, root.clientWidth - tip.offsetWidth - 4)) + "px";
    tip.style.top = y - box.top + 16 + "px";
    readout.textContent = lines[0] + " " + value + " \u2014 " + lines.slice(1).join("; ");
  }
  function interactive(cv) {
    cv.addEventListener("mousemove", (ev) => { const at = cellAt(cv, ev); if (at) cv._spec.hover(at, ev.clientX, ev.clientY); else tip.style.display = "none"; });
    cv.addEventListener("mouseleave", () => { tip.style.display = "none"; });
    cv.addEventListener("click", (ev) => { const at = cellAt(cv, ev); if (at && cv._spec.click) cv._spec.click(at); });
  }
  interactive(canvas);

  function stepLines(V, c) { return Object.entries(V.steps).map(([n, v]) => n + ": " + fmt(v[c])); }
  function cellLines(V, r, c, where) {
    const row = V.rows[r], col = V.cols[c];
    return ["score" + (where ? " (" + where + ")" : ""),
      "attributed: " + quote(row[0]) + " (id " + row[1] + ", " + row[2] + " position " + sides(V)(r)[1] + ")",
      "generated: " + quote(col[0]) + " (id " + col[1] + ", step " + c + ", position " + (V.start + c) + ")", ...stepLines(V, c)];
  }

  function drawMain() {
    const V = view(), get = mainGetter(V), scale = largest(get, V.rows.length, V.cols.length);
    const cw = Math.max(14, Math.min(28, Math.floor(900 / Math.max(1, V.cols.length)))), nSource = V.rows.filter((r) => r[2] === "source").length;
    draw(canvas, {
      rows: V.rows.map((r) => r[0]), cols: V.cols.map((c) => c[0]), get, scale, cw, ch: 16, labels: true,
      steps: Object.entries(V.steps), splitAt: nSource && nSource < V.rows.length ? nSource : 0, cursor: document.activeElement === canvas ? state.cursor : null, column: state.column,
      hover: (at, x, y) => {
        if (at.step !== undefined) { const [n, v] = Object.entries(V.steps)[at.step]; showTip(["step score " + n + " at " + quote(V.cols[at.c][0]) + " (step " + at.c + "):"], fmt(v[at.c]), x, y); }
        else showTip(cellLines(V, at.r, at.c, sourceName()), fmt(get(at.r, at.c)), x, y);
      },
      click: (at) => openColumn(at.c),
    });
    canvas.setAttribute("aria-label", "heatmap of " + V.rows.length + " attributed tokens by " + V.cols.length + " generated tokens (" + sourceName() + "); arrow keys move, Enter opens a column");
    setLegend(scale);
    root.dataset.shown = JSON.stringify({ example: state.example, level: state.level, source: state.source });
  }
  canvas.addEventListener("focus", () => drawMain());
  canvas.addEventListener("blur", () => drawMain());
  canvas.addEventListener("keydown", (ev) => {
    const V = view(), moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    if (moves[ev.key]) {
      ev.preventDefault();
      const [dr, dc] = moves[ev.key];
      state.cursor = [Math.max(0, Math.min(V.rows.length - 1, state.cursor[0] + dr)), Math.max(0, Math.min(V.cols.length - 1, state.cursor[1] + dc))];
      drawMain();
      const d = canvas.dataset, box = canvas.getBoundingClientRect();
      const [r, c] = state.cursor;
      showTip(cellLines(V, r, c, sourceName()), fmt(mainGetter(V)(r, c)), box.left + +d.x0 + c * d.cw, box.top + +d.y0 + (r + 1) * d.ch);
    } else if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); openColumn(state.cursor[1]); }
  });

  // -- generated tokens, bar chart of one column --------------------------------------------------------------
  function drawText() {
    const V = view(), e = examples[state.example];
    text.textContent = "";
    const input = el("div", null, null, text); el("b", null, "Input: ", input); input.appendChild(document.createTextNode(e.input));
    const gen = el("div", null, null, text); el("b", null, "Generated (click a token): ", gen);
    V.cols.forEach((col, c) => {
      const b = el("button", "si-gen", col[0], gen);
      b.type = "button"; b.dataset.step = c; b.title = "id " + col[1] + "; " + stepLines(V, c).join("; ");
      b.setAttribute("aria-pressed", String(state.column === c));
      b.addEventListener("click", () => openColumn(c));
    });
  }
  function openColumn(c) {
    const V = view(), get = mainGetter(V);
    state.column = c; state.step = c;
    text.querySelectorAll(".si-gen").forEach((b) => b.setAttribute("aria-pressed", String(+b.dataset.step === c)));
    bars.textContent = "";
    el("h4", null, "Attributions of " + quote(V.cols[c][0]) + " (id " + V.cols[c][1] + ", step " + c + "), " + sourceName(), bars);
    if (Object.keys(V.steps).length) el("div", "si-note", stepLines(V, c).join("; "), bars);
    const values = V.rows.map((_, r) => get(r, c)), scale = values.reduce((m, v) => (v === null ? m : Math.max(m, Math.abs(v))), 1e-30);
    const chart = el("div", "si-chart", null, bars);
    chart.setAttribute("role", "list");
    V.rows.forEach((row, r) => {
      const v = values[r];
      if (v === null) return;
      const line = el("div", "si-bar-row", null, chart);
      line.setAttribute("role", "listitem");
      el("span", null, row[0], line).title = row[2] + " token, id " + row[1];
      const track = el("div", "si-track", null, line), fill = el("div", "si-fill", null, track);
      const width = (Math.abs(v) / scale) * 50;
      fill.style.width = width + "%"; fill.style.left = (v >= 0 ? 50 : 50 - width) + "%";
      fill.style.background = "rgb(" + (v >= 0 ? COL.positive : COL.negative) + ")";
      el("span", "si-bar-value", fmt(v), line);
    });
    drawMain(); drawLayers();
  }

  // -- layers x tokens per generated token; grid of heads ------------------------------------------------------
  function drawLayers() {
    const V = view();
    layers.textContent = "";
    if (!V.layers || !V.cols.length) return;
    el("h4", null, "Layers \u00d7 tokens for one generated token", layers);
    const row = el("div", "si-controls", null, layers);
    const l = el("label", null, "generated token ", row), slider = el("input", "si-step", null, l);
    slider.type = "range"; slider.min = 0; slider.max = V.cols.length - 1; slider.value = state.step;
    el("span", "si-step-label", quote(V.cols[state.step][0]) + " (step " + state.step + ")", row);
    slider.addEventListener("input", () => { state.step = +slider.value; drawLayers(); layers.querySelector(".si-step").focus(); });
    const side = sides(V);
    ["source", "target"].forEach((name) => {
      const stack = V.layers[name];
      if (!stack) return;
      const rowIndex = V.rows.map((_, r) => r).filter((r) => side(r)[0] === name);
      const scale = stack._scale !== undefined ? stack._scale : (stack._scale = stack.flat(2).reduce((m, v) => (v === null ? m : Math.max(m, Math.abs(v))), 0));
      el("div", "si-note", name + " layers (rows) \u00d7 " + name + " tokens; colours saturate at \u00b1" + fmt(+scale.toPrecision(3)), layers);
      const cv = el("canvas", "si-layer-map si-layer-map-" + name, null, el("div", "si-scroll", null, layers));
      interactive(cv);
      draw(cv, {
        rows: stack.map((_, k) => "layer " + k), cols: rowIndex.map((r) => V.rows[r][0]), get: (k, t) => stack[k][t][state.step], scale,
        cw: 18, ch: 16, labels: true,
        hover: (at, x, y) => showTip(["layer " + at.r + ", " + name + " token " + quote(V.rows[rowIndex[at.c]][0]) + " (id " + V.rows[rowIndex[at.c]][1] + ") for " + quote(V.cols[state.step][0]) + " (step " + state.step + "):", ...stepLines(V, state.step)], fmt(stack[at.r][at.c][state.step]), x, y),
        click: (at) => { state.source = { layer: at.r }; syncSelect(); drawMain(); },
      });
    });
  }
  function drawHeads() {
    const V = view();
    heads.textContent = "";
    if (!V.heads) return;
    const stacks = ["source", "target"].filter((n) => V.heads[n]);
    const nLayers = V.heads[stacks[0]].length, nHeads = V.heads[stacks[0]][0].length;
    el("h4", null, "Attention heads of one layer (click a head to show it above)", heads);
    const row = el("div", "si-controls", null, heads), select = el("select", "si-head-layer", null, el("label", null, "layer ", row));
    for (let k = 0; k < nLayers; k++) { const o = el("option", null, "layer " + k, select); o.value = k; }
    select.value = state.headLayer;
    select.addEventListener("change", () => { state.headLayer = +select.value; drawHeads(); heads.querySelector(".si-head-layer").focus(); });
    const grid = el("div", "si-heads", null, heads), side = sides(V);
    const cell = Math.max(2, Math.min(8, Math.floor(220 / Math.max(V.rows.length, V.cols.length))));
    for (let h = 0; h < nHeads; h++) {
      const fig = el("figure", null, null, grid), cv = el("canvas", "si-head", null, fig);
      el("figcaption", null, "head " + h, fig);
      fig.tabIndex = 0;
      fig.setAttribute("role", "button");
      fig.setAttribute("aria-label", "layer " + state.headLayer + ", head " + h + ": show it in the main heatmap");
      fig.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); cv._spec.click(); } });
      const get = (r, c) => { const [n, rr] = side(r); const st = V.heads[n]; return st ? st[state.headLayer][h][rr][c] : null; };
      interactive(cv);
      draw(cv, {
        rows: V.rows.map((r) => r[0]), cols: V.cols.map((c) => c[0]), get, scale: largest(get, V.rows.length, V.cols.length), cw: cell, ch: cell, labels: false,
        hover: (at, x, y) => showTip(cellLines(V, at.r, at.c, "layer " + state.headLayer + ", head " + h), fmt(get(at.r, at.c)), x, y),
        click: () => { state.source = { layer: state.headLayer, head: h }; syncSelect(); drawMain(); },
      });
    }
  }
  function syncSelect() {
    const value = state.source ? JSON.stringify(state.source) : "";
    if (![...layerSelect.options].some((o) => o.value === value)) { const o = el("option", null, sourceName(), layerSelect); o.value = value; }
    layerSelect.value = value;
  }

  // -- export ---------------------------------------------------------------------------------------------------
  function exportValues(kind) {
    const V = view(), get = mainGetter(V), e = examples[state.example];
    const matrix = V.rows.map((_, r) => V.cols.map((_, c) => get(r, c)));
    let content;
    if (kind === "json") {
      content = JSON.stringify({ example: e.title, input: e.input, generated: e.generated, aggregation: state.level, shown: sourceName(),
        generated_tokens: V.cols, attributed_tokens: V.rows, scores: matrix, step_scores: V.steps, header }, null, 1);
    } else {
      const cell = (s) => (/[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s);
      const lines = [["attributed", "id", "side", ...V.cols.map((c) => c[0])].map(cell).join(",")];
      V.rows.forEach((row, r) => lines.push([cell(row[0]), row[1], row[2], ...matrix[r].map((v) => (v === null ? "" : v))].join(",")));
      Object.entries(V.steps).forEach(([n, v]) => lines.push([cell(n), "", "step score", ...v.map((x) => (x === null ? "" : x))].join(",")));
      content = lines.join("\n") + "\n";
    }
    let area = exportBox.querySelector("textarea");
    if (!area) { area = el("textarea", "si-export-text", null, exportBox); area.readOnly = true; area.setAttribute("aria-label", "exported values"); }
    area.value = content;
    let link = exportBox.querySelector("a");
    if (!link) link = el("a", "si-download", null, exportBox);
    if (link.href) URL.revokeObjectURL(link.href);
    link.href = URL.createObjectURL(new Blob([content], { type: kind === "json" ? "application/json" : "text/csv" }));
    link.download = "attributions-" + state.example + "." + kind;
    link.textContent = "Download " + link.download;
    exportBox.open = true;
  }

  // -- example ---------------------------------------------------------------------------------------------------
  function render() {
    const e = examples[state.example], V = view();
    state.source = null;
    levelSelect.textContent = "";
    Object.keys(e.views).forEach((k) => { const o = el("option", null, k, levelSelect); o.value = k; });
    levelSelect.value = e.views[state.level] ? state.level : "tokens";
    levelSelect.parentNode.classList.toggle("si-hidden", Object.keys(e.views).length < 2);
    layerSelect.textContent = "";
    const stack = V.layers || V.heads;
    layerSelect.parentNode.classList.toggle("si-hidden", !stack);
    if (stack) {
      const o = el("option", null, sourceName(), layerSelect); o.value = "";
      const first = stack.source || stack.target;
      for (let k = 0; k < first.length; k++) { const opt = el("option", null, "layer " + k + (V.heads ? " (mean over heads)" : ""), layerSelect); opt.value = JSON.stringify({ layer: k }); }
    }
    state.column = null; state.cursor = [0, 0]; state.step = 0; state.headLayer = 0;
    bars.textContent = ""; tip.style.display = "none";
    drawText(); drawMain(); drawLayers(); drawHeads();
    items.forEach((li, i) => li.firstChild.setAttribute("aria-current", String(i === state.example)));
  }
  function openExample(i) { state.example = i; render(); }
  render();
  root.dataset.renderMs = String(Math.round(performance.now() - started));
}

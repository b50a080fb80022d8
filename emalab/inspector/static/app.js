// emalab inspector page: plain JS, SVG drawn by hand, no external assets.
// Every model-generated or user-supplied string goes in through textContent, never innerHTML.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const state = { meta: null, last: null, busy: false };

function $(id) { return document.getElementById(id); }

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

// On a shared machine the server may require a token; it arrives once in the page URL (?token=...)
// and is kept for this tab only, then sent with every API call.
const TOKEN = (() => {
  const fromUrl = new URLSearchParams(location.search).get("token");
  if (fromUrl) {
    sessionStorage.setItem("emalab-token", fromUrl);
    history.replaceState(null, "", location.pathname);
  }
  return sessionStorage.getItem("emalab-token");
})();

async function api(path, options = {}) {
  if (TOKEN) options.headers = { ...(options.headers || {}), "X-Emalab-Token": TOKEN };
  const res = await fetch(path, options);
  let data = null;
  try { data = await res.json(); } catch (e) { data = { error: `HTTP ${res.status}` }; }
  if (!res.ok) throw new Error(data && data.error ? data.error : `HTTP ${res.status}`);
  return data;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// ---------- colours ----------------------------------------------------------------------------
// Diverging blue-white-red (ColorBrewer RdBu end points), symmetric around zero.
function colour(v, m) {
  if (v === null || v === undefined || !isFinite(v)) return "#d0d0d0";
  const t = Math.max(-1, Math.min(1, m > 0 ? v / m : 0));
  const end = t < 0 ? [33, 102, 172] : [178, 24, 43];
  const mid = [247, 247, 247];
  const a = Math.abs(t);
  const c = mid.map((x, i) => Math.round(x + (end[i] - x) * a));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function maxAbs(...matrices) {
  let m = 0;
  for (const mat of matrices) for (const row of mat) for (const v of row) if (v !== null && isFinite(v)) m = Math.max(m, Math.abs(v));
  return m;
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined) return "n/a";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2);
  return v.toFixed(digits);
}

// ---------- heatmap ----------------------------------------------------------------------------
function heatmap(matrix, layers, columns, scale, id, unitsLabel) {
  const cw = 46, ch = 16, left = 34, top = 96, legendH = 34;
  const width = left + columns.length * cw + 8, height = top + layers.length * ch + legendH;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, id, role: "img",
    "aria-label": `heatmap of ${layers.length} layers by ${columns.length} directions` });
  columns.forEach((name, c) => {
    const x = left + c * cw + cw / 2, y = top - 6;
    root.append(svg("text", { x, y, transform: `rotate(-55 ${x} ${y})`, class: "col-label" }, name));
  });
  layers.forEach((layer, j) => {
    const y = top + j * ch;
    root.append(svg("text", { x: left - 4, y: y + ch - 3, "text-anchor": "end" }, String(layer)));
    columns.forEach((name, c) => {
      const v = matrix[j][c];
      const cell = svg("rect", { x: left + c * cw, y, width: cw - 1, height: ch - 1, fill: colour(v, scale), class: "cell",
        "data-layer": layer, "data-column": name, "data-value": v === null ? "" : String(v) });
      cell.append(svg("title", {}, `layer ${layer} · ${name}: ${fmt(v)} ${unitsLabel}`));
      root.append(cell);
    });
  });
  // legend: -m … 0 … +m
  const ly = top + layers.length * ch + 10, lw = Math.min(200, columns.length * cw), steps = 20;
  for (let i = 0; i < steps; i++) {
    const v = -scale + (2 * scale * (i + 0.5)) / steps;
    root.append(svg("rect", { x: left + (i * lw) / steps, y: ly, width: lw / steps + 0.5, height: 8, fill: colour(v, scale) }));
  }
  root.append(svg("text", { x: left, y: ly + 20 }, fmt(-scale, 2)));
  root.append(svg("text", { x: left + lw / 2, y: ly + 20, "text-anchor": "middle" }, `0 (${unitsLabel})`));
  root.append(svg("text", { x: left + lw, y: ly + 20, "text-anchor": "end" }, fmt(scale, 2)));
  return root;
}

// ---------- line plots -------------------------------------------------------------------------
function linePlot(name, c, views, key, layers, steer) {
  const w = 230, h = 130, l = 48, r = 6, t = 18, b = 18;
  const series = Object.entries(views).map(([vname, v]) => [vname, v[key].map((row) => row[c])]);
  const vals = series.flatMap(([, s]) => s).filter((v) => v !== null && isFinite(v));
  let lo = Math.min(0, ...vals), hi = Math.max(0, ...vals);
  if (hi - lo < 1e-9) { lo -= 1; hi += 1; }
  const X = (j) => l + (layers.length > 1 ? (j * (w - l - r)) / (layers.length - 1) : 0);
  const Y = (v) => t + ((hi - v) * (h - t - b)) / (hi - lo);
  const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, class: "line-plot", "data-column": name });
  root.append(svg("text", { x: l, y: 12, class: "title" }, name));
  root.append(svg("line", { x1: l, x2: w - r, y1: Y(0), y2: Y(0), class: "axis" }));
  root.append(svg("line", { x1: l, x2: l, y1: t, y2: h - b, class: "axis" }));
  root.append(svg("text", { x: l - 3, y: Y(hi) + 8, "text-anchor": "end" }, fmt(hi, 2)));
  root.append(svg("text", { x: l - 3, y: Y(lo), "text-anchor": "end" }, fmt(lo, 2)));
  root.append(svg("text", { x: l, y: h - 4 }, `L${layers[0]}`));
  root.append(svg("text", { x: w - r, y: h - 4, "text-anchor": "end" }, `L${layers[layers.length - 1]}`));
  if (steer) {  // where the vector was added
    const j = layers.indexOf(steer.layer);
    if (j >= 0) root.append(svg("line", { x1: X(j), x2: X(j), y1: t, y2: h - b, class: "marker" }));
  }
  for (const [vname, s] of series) {
    let d = "", pen = "M";
    s.forEach((v, j) => {
      if (v === null || !isFinite(v)) { pen = "M"; return; }
      d += `${pen}${X(j).toFixed(1)},${Y(v).toFixed(1)} `;
      pen = "L";
    });
    root.append(svg("path", { d, class: `line-${vname}`, "data-view": vname }));
  }
  return root;
}

// ---------- logit lens -------------------------------------------------------------------------
function showToken(tok) {
  return tok.replace(/ /g, "␣").replace(/\n/g, "⏎").replace(/\t/g, "⇥") || "∅";
}

function lensTable(view, k) {
  const head = el("tr", {}, [el("th", { text: "layer" }), ...Array.from({ length: k }, (_, i) => el("th", { text: `#${i + 1}` }))]);
  const rows = view.layers.map((layer, j) => el("tr", { "data-layer": layer }, [
    el("td", { text: String(layer) }),
    ...view.lens_tokens[j].map((tok, i) => {
      const p = Math.exp(view.lens_logprobs[j][i]);
      const cell = el("td", { title: `${JSON.stringify(tok)}  p=${p.toFixed(4)}` }, [
        el("code", { text: showToken(tok) }), el("span", { class: "p", text: (100 * p).toFixed(0) + "%" }),
      ]);
      return cell;
    }),
  ]));
  return el("table", { class: "lens" }, [el("thead", {}, [head]), el("tbody", {}, rows)]);
}

// ---------- rendering --------------------------------------------------------------------------
function unitsKey() { return $("units").value; }
function unitsLabel(key) { return key === "cosine" ? "cos" : "proj"; }

function render(result) {
  const key = unitsKey();
  const views = result.views;
  const names = Object.keys(views);
  const scale = maxAbs(...names.map((n) => views[n][key])) || 1;
  const container = $("views");
  container.replaceChildren();
  for (const name of names) {
    const v = views[name];
    const label = el("span", { class: `answer-label label-${v.label}`, title: v.label_reason, text: v.label });
    const box = el("div", { class: "view " + name, id: `view-${name}`, "data-view": name }, [
      el("h2", { text: name === "base" ? (state.meta.adapter.present ? "base (adapter disabled)" : "model") : "adapted" }),
      el("div", { class: "small", text:
        `${v.n_prompt_tokens} prompt tokens · ${v.seconds.toFixed(2)} s (trace ${v.timing.trace.toFixed(2)} s, ` +
        `${v.timing.answer_tokens} answer tokens ${v.timing.generate.toFixed(2)} s) · state ${v.state.slice(0, 12)}…` +
        (v.interventions.length ? ` · interventions: ${v.interventions.join(", ")}` : "") }),
      el("div", { class: "answer-box" }, [
        el("span", {}, ["answer ", label]),
        el("pre", { class: "answer", id: `answer-${name}`, text: v.answer }),
      ]),
      el("div", { class: "heatmap", id: `heatmap-${name}` }, [heatmap(v[key], v.layers, result.columns, scale, `heatmap-svg-${name}`, unitsLabel(key))]),
      el("details", {}, [el("summary", { text: `Logit lens: top-${state.meta.limits.k} next tokens per layer` }), lensTable(v, state.meta.limits.k)]),
    ]);
    container.append(box);
  }
  const diffPanel = $("diff-panel");
  if (result.diff) {
    const d = result.diff[key];
    $("diff").replaceChildren(heatmap(d, result.layers, result.columns, maxAbs(d) || 1, "heatmap-svg-diff", "Δ" + unitsLabel(key)));
    diffPanel.hidden = false;
  } else {
    diffPanel.hidden = true;
  }
  const lines = $("lines");
  lines.replaceChildren();
  result.columns.forEach((name, c) => lines.append(linePlot(name, c, views, key, result.layers, result.request.steer)));
  const parts = names.map((n) => `${n} ${views[n].seconds.toFixed(2)} s`);
  const legend = el("span", {}, names.map((n) => el("span", {}, [el("span", { class: `legend-key ${n}` }), n])));
  $("timing").replaceChildren(
    el("span", { id: "latency", "data-seconds": String(result.seconds), text: `computed in ${result.seconds.toFixed(2)} s (${parts.join(", ")}; ${result.cpu_seconds.toFixed(1)} CPU s)` }),
    legend);
  $("results").hidden = false;
}

// ---------- meta, prompt picker ----------------------------------------------------------------
function renderMeta(meta) {
  const m = $("meta");
  const ad = meta.adapter.present ? `adapter ${meta.adapter.path} (${(meta.adapter.id || "").slice(0, 12)})` : "no adapter";
  m.replaceChildren(
    el("span", {}, [el("b", { text: meta.model }), ` · ${meta.dtype} on ${meta.device} · ${meta.n_layers} layers · d_model ${meta.d_model} · ${ad}`]),
    el("span", { class: "src", text: `concept vectors: ${meta.vectors.concepts_source}` }),
    el("span", { class: "src", text: `refusal direction: ${meta.vectors.refusal_source}` }),
  );
  const dom = $("domain");
  for (const d of [...meta.domains, ...meta.extra_sets]) dom.append(el("option", { value: d, text: d }));
  const sc = $("steer-concept");
  for (const c of meta.steer_concepts) sc.append(el("option", { value: c, text: c }));
  const layer = $("steer-layer");
  layer.max = String(meta.n_layers - 1);
  layer.value = String(Math.floor(meta.n_layers / 3));
  $("steer-coeff").max = String(meta.limits.max_coeff);
  $("steer-coeff").min = String(-meta.limits.max_coeff);
}

async function loadPrompts() {
  const domain = $("domain").value;
  const pick = $("suite-prompt");
  pick.replaceChildren(el("option", { value: "", text: "prompt…" }));
  pick.disabled = true;
  if (!domain) return;
  try {
    const data = await api(`/api/prompts?domain=${encodeURIComponent(domain)}`);
    data.prompts.forEach((p, i) => {
      const short = p.text.length > 110 ? p.text.slice(0, 107) + "…" : p.text;
      pick.append(el("option", { value: String(i), text: short, title: p.text }));
    });
    pick.disabled = false;
    state.prompts = data.prompts;
  } catch (e) { showError(e.message); }
}

// ---------- inspect ----------------------------------------------------------------------------
function requestBody() {
  const body = { prompt: $("prompt").value, ablate: $("ablate").checked, steer: null };
  if ($("steer-on").checked) {
    body.steer = { concept: $("steer-concept").value, layer: Number($("steer-layer").value), coeff: Number($("steer-coeff").value) };
    if (!Number.isInteger(body.steer.layer)) body.steer.layer = $("steer-layer").value;  // let the server explain
  }
  return body;
}

async function inspect() {
  if (state.busy) return;
  state.busy = true;
  showError("");
  $("run").disabled = true;
  $("results").setAttribute("aria-busy", "true");
  const progress = $("progress");
  progress.hidden = false;
  const t0 = performance.now();
  const tick = setInterval(() => { $("elapsed").textContent = `${((performance.now() - t0) / 1000).toFixed(1)} s`; }, 100);
  const poll = setInterval(async () => {
    try {
      const s = await api("/api/status");
      if (s.busy) $("phase").textContent = `${s.phase} (${s.step + 1}/${s.total})`;
    } catch (e) { /* the inspect call reports errors */ }
  }, 300);
  $("phase").textContent = "sending";
  try {
    const result = await api("/api/inspect", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(requestBody()),
    });
    state.last = result;
    render(result);
  } catch (e) {
    showError(e.message);
  } finally {
    clearInterval(tick);
    clearInterval(poll);
    progress.hidden = true;
    $("run").disabled = false;
    $("results").removeAttribute("aria-busy");
    state.busy = false;
  }
}

async function main() {
  try {
    state.meta = await api("/api/meta");
    renderMeta(state.meta);
  } catch (e) {
    showError(`cannot reach the inspector server: ${e.message}`);
    return;
  }
  $("domain").addEventListener("change", loadPrompts);
  $("suite-prompt").addEventListener("change", () => {
    const i = $("suite-prompt").value;
    if (i !== "" && state.prompts) $("prompt").value = state.prompts[Number(i)].text;
  });
  $("run").addEventListener("click", inspect);
  $("prompt").addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) inspect(); });
  $("units").addEventListener("change", () => { if (state.last) render(state.last); });
  document.body.dataset.ready = "true";
}

main();

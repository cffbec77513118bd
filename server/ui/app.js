// cloudfunc's dashboard: a system overview, a page per function and per chain (chains.js), drawn with Chart.js
// from the server's own API and refreshed every few seconds. No build step, no framework.
"use strict";

const POLL_MS = Number(new URLSearchParams(location.search).get("poll_ms")) || 2000;
const TOKEN_KEY = "cloudfunc.token";
const HEALTH_SAMPLES = 180;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY),
  charts: {},
  timer: null,
  route: null,
  health: [], // samples of /api/system/health, newest last, for the gauges' charts
  last: {}, // the latest data each page drew, for tests and for debugging
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const res = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${state.token}`, ...(options.headers || {}) },
  });
  if (res.status === 401) throw new Unauthorized("the token was refused");
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error?.message || body.message || `HTTP ${res.status}`);
  return body;
}

// ---- formatting ----
const fmtMs = (ms) => (ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(ms < 10 ? 2 : 1)} ms`);
const fmtBytes = (b) => {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return `${b.toFixed(i ? 1 : 0)} ${units[i]}`;
};
const fmtPct = (x) => `${(100 * x).toFixed(1)} %`;
const fmtTime = (ms, withDate) => {
  const d = new Date(ms);
  const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return withDate ? `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${hm}` : hm;
};

// ---- charts ----
const COLORS = ["#2f5fd0", "#c4320a", "#12805c", "#b54708", "#6941c6", "#667085"];

function chartCard(id, title) {
  return el("div", { class: "chart" }, el("h3", {}, title), el("div", { class: "canvas" }, el("canvas", { id: `chart-${id}` })));
}

// Creates the chart the first time, then only swaps its data: updates do not flicker.
function draw(id, type, labels, datasets, options = {}) {
  const data = {
    labels,
    datasets: datasets.map((d, i) => ({
      borderColor: COLORS[i % COLORS.length],
      backgroundColor: COLORS[i % COLORS.length] + (type === "bar" ? "cc" : "33"),
      pointRadius: 0,
      borderWidth: 1.5,
      tension: 0.2,
      ...d,
    })),
  };
  const existing = state.charts[id];
  if (existing && document.body.contains(existing.canvas)) {
    existing.data = data;
    existing.update("none");
    return existing;
  }
  const canvas = $(`chart-${id}`);
  if (!canvas || typeof Chart === "undefined") return null;
  state.charts[id] = new Chart(canvas, {
    type,
    data,
    options: {
      animation: false,
      maintainAspectRatio: false,
      interaction: { mode: "index", intersect: false },
      plugins: { legend: { labels: { boxWidth: 10 } } },
      scales: {
        x: { stacked: !!options.stacked, ticks: { maxTicksLimit: 8 } },
        y: { stacked: !!options.stacked, beginAtZero: true, ...(options.y || {}) },
        ...(options.y2 ? { y2: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false }, ...options.y2 } } : {}),
      },
    },
  });
  return state.charts[id];
}

function seriesCharts(prefix) {
  return el("div", { class: "charts" },
    chartCard(`${prefix}-calls`, "Invocations per step (succeeded / errors)"),
    chartCard(`${prefix}-latency`, "Duration percentiles (ms)"),
    chartCard(`${prefix}-starts`, "Cold and warm starts"),
    chartCard(`${prefix}-errors`, "Error rate"),
    chartCard(`${prefix}-resources`, "CPU time (ms) and peak memory (MiB)"),
  );
}

function drawSeries(prefix, m) {
  const s = m.series;
  const long = s.t.length > 1 && s.t[s.t.length - 1] - s.t[0] > 86400000;
  const labels = s.t.map((t) => fmtTime(t, long));
  const ok = s.invocations.map((n, i) => n - s.errors[i]);
  draw(`${prefix}-calls`, "bar", labels, [
    { label: "succeeded", data: ok, backgroundColor: "#12805ccc", borderColor: "#12805c" },
    { label: "errors", data: s.errors, backgroundColor: "#c4320acc", borderColor: "#c4320a" },
  ], { stacked: true });
  draw(`${prefix}-latency`, "line", labels, [
    { label: "p50", data: s.duration_p50_ms },
    { label: "p95", data: s.duration_p95_ms },
    { label: "p99", data: s.duration_p99_ms },
  ]);
  draw(`${prefix}-starts`, "bar", labels, [
    { label: "warm", data: s.warm, backgroundColor: "#2f5fd0cc" },
    { label: "cold / pre-warmed", data: s.cold, backgroundColor: "#b54708cc" },
  ], { stacked: true });
  draw(`${prefix}-errors`, "line", labels, [
    { label: "error rate %", data: s.error_rate.map((x) => 100 * x), fill: true },
  ], { y: { suggestedMax: 5 } });
  draw(`${prefix}-resources`, "line", labels, [
    { label: "CPU avg ms", data: s.cpu_avg_ms, yAxisID: "y" },
    { label: "memory max MiB", data: s.memory_max_bytes.map((b) => b / 1048576), yAxisID: "y2" },
  ], { y2: {} });
}

function tile(label, value, id) {
  return el("div", { class: "tile" }, el("div", { class: "label" }, label), el("div", { class: "value", id: id || "" }, value));
}

/** Nodes sharing the store: how many are alive, each listed on hover. */
function nodesTile(cluster) {
  const alive = cluster.nodes.filter((n) => n.alive).length;
  const t = tile("Nodes alive", `${alive} of ${cluster.nodes.length}`, "tile-nodes");
  t.title = cluster.nodes
    .map((n) => `${n.id}${n.id === cluster.node ? " (this one)" : ""}: ${n.alive ? "alive" : "silent"}, ${n.address}`)
    .join("\n");
  return t;
}

function summaryTiles(m) {
  const d = m.duration_ms;
  return [
    tile("Invocations", m.invocations, "tile-invocations"),
    tile("Error rate", fmtPct(m.error_rate), "tile-error-rate"),
    tile("p50 / p95", `${fmtMs(d.p50)} / ${fmtMs(d.p95)}`),
    tile("p99", fmtMs(d.p99)),
    tile("Cold / warm", `${m.cold_starts} / ${m.warm_starts}`),
    tile("Peak memory", fmtBytes(m.peak_memory_bytes.max)),
  ];
}

// ---- anomalies ----
const SERIES_LABELS = {
  invocations: "invocations", error_rate: "error rate", duration_p95: "duration p95",
  cold_ratio: "cold-start ratio", peak_memory: "peak memory", calls: "all calls", queue_depth: "queue depth",
};
// Which chart shows each series, and which of its datasets the marker sits on.
const SERIES_CHART = {
  invocations: ["calls", 0], error_rate: ["errors", 0], duration_p95: ["latency", 1],
  cold_ratio: ["starts", 1], peak_memory: ["resources", 1], calls: ["calls", 0],
};

function fmtValue(series, v) {
  if (series === "error_rate" || series === "cold_ratio") return fmtPct(v);
  if (series === "duration_p95") return fmtMs(v);
  if (series === "peak_memory") return fmtBytes(v);
  return String(Math.round(v * 100) / 100);
}

function anomalyRows(events, withFunction) {
  return [
    el("tr", {}, [...(withFunction ? ["Function"] : []), "Series", "Started", "Ended", "Peak score", "Value at peak"].map((h) => el("th", {}, h))),
    ...events.map((e) => {
      const peak = e.points.find((p) => p.minute === e.peak_at) || e.points[e.points.length - 1] || {};
      return el("tr", { class: "anomaly", "data-event": e.id },
        ...(withFunction ? [el("td", {}, e.function_id
          ? el("a", { href: `#/functions/${encodeURIComponent(e.function)}` }, e.function)
          : el("span", { class: "muted" }, "system"))] : []),
        el("td", {}, SERIES_LABELS[e.series] || e.series),
        el("td", {}, new Date(e.started).toLocaleString()),
        el("td", {}, e.ended == null ? el("span", { class: "badge inactive" }, "ongoing") : new Date(e.ended).toLocaleString()),
        el("td", { class: "num" }, e.peak_score.toFixed(2)),
        el("td", { class: "num" }, peak.value == null ? "" : fmtValue(e.series, peak.value)),
      );
    }),
  ];
}

// Marks each event's start on the chart of its series: a red triangle on the step that
// holds it (the chart's data are per step, the event's minute falls in one).
function markAnomalies(prefix, m, events) {
  const t = m.series.t;
  const step = m.step_ms;
  for (const [series, [chart, dataset]] of Object.entries(SERIES_CHART)) {
    const c = state.charts[`${prefix}-${chart}`];
    if (!c) continue;
    const marks = t.map(() => null);
    for (const e of events.filter((e) => e.series === series)) {
      const i = t.findIndex((start) => e.started >= start && e.started < start + step);
      const base = c.data.datasets[dataset]?.data || [];
      if (i >= 0) marks[i] = Number(base[i]) || 0;
    }
    c.data.datasets = c.data.datasets.filter((d) => d.label !== "anomaly");
    if (marks.some((x) => x !== null)) {
      c.data.datasets.push({
        label: "anomaly", type: "line", data: marks, showLine: false, stack: "anomaly",
        pointRadius: 7, pointStyle: "triangle", borderColor: "#c4320a", backgroundColor: "#c4320a",
      });
    }
    c.update("none");
  }
}

// ---- pages ----
function rangeQuery() {
  return `range=${encodeURIComponent($("range").value)}`;
}

async function overview(first) {
  const page = $("page");
  if (first) {
    page.replaceChildren(
      el("h1", {}, "System overview"),
      el("div", { class: "tiles", id: "summary" }),
      seriesCharts("sys"),
      el("div", { class: "charts" },
        chartCard("sys-queue", "Queue depth and sandboxes (live samples)"),
        chartCard("sys-host", "Host CPU busy % and server memory (MiB)"),
      ),
      el("h2", {}, "Alerts"),
      el("table", { id: "alerts" }),
      el("h2", {}, "Anomalies"),
      el("p", { id: "anomaly-summary", class: "muted" }),
      el("table", { id: "anomalies" }),
      el("h2", {}, "Functions"),
      el("table", { id: "functions" }),
      el("h2", {}, "Chains"),
      el("table", { id: "chains" }),
    );
  }
  const [m, health, list, anomalies, alerts, chains] = await Promise.all([
    api(`/api/system/metrics?${rangeQuery()}`),
    fetch("/api/system/health").then((r) => r.json()),
    api("/api/functions"),
    api(`/api/system/anomalies?${rangeQuery()}`),
    api("/api/alerts/rules"),
    api("/api/chains"),
  ]);
  state.last = { metrics: m, health, functions: list.functions, anomalies, alerts: alerts.rules, chains: chains.chains };
  state.health.push(health);
  if (state.health.length > HEALTH_SAMPLES) state.health.shift();

  const pool = health.pool || {};
  $("summary").replaceChildren(
    ...summaryTiles(m),
    tile("Queue depth", health.queue_depth, "tile-queue"),
    ...(health.cluster?.nodes ? [nodesTile(health.cluster)] : []),
    tile("Warm sandboxes", `${pool.warm ?? 0} (${pool.idle ?? 0} idle)`, "tile-warm"),
    tile("Pre-warmed", pool.prewarmed ?? 0),
    tile("Host CPU", health.host.cpu_busy_percent == null ? "…" : `${health.host.cpu_busy_percent.toFixed(0)} %`),
    tile("Host memory free", fmtBytes(health.host.memory_available_bytes)),
    tile("Server memory", fmtBytes(health.process.resident_memory_bytes)),
  );
  drawSeries("sys", m);
  const labels = state.health.map((h) => fmtTime(h.time));
  draw("sys-queue", "line", labels, [
    { label: "queue depth", data: state.health.map((h) => h.queue_depth) },
    { label: "warm sandboxes", data: state.health.map((h) => h.pool?.warm ?? 0) },
    { label: "busy", data: state.health.map((h) => h.pool?.busy ?? 0) },
    { label: "pre-warmed", data: state.health.map((h) => h.pool?.prewarmed ?? 0) },
  ]);
  draw("sys-host", "line", labels, [
    { label: "host CPU %", data: state.health.map((h) => h.host.cpu_busy_percent ?? 0), yAxisID: "y" },
    { label: "server MiB", data: state.health.map((h) => h.process.resident_memory_bytes / 1048576), yAxisID: "y2" },
  ], { y: { suggestedMax: 100 }, y2: {} });

  const names = Object.fromEntries(list.functions.map((f) => [f.id, f.name]));
  renderIf($("alerts"), alerts.rules, () => (alerts.rules.length ? [
    el("tr", {}, ["Rule", "Condition", "Severity", "State", "Firing on"].map((h) => el("th", {}, h))),
    ...alerts.rules.map((r) => el("tr", { class: "alert-rule", "data-rule": r.id },
      el("td", {}, r.name),
      el("td", {}, `${r.metric}${r.error_kind ? `[${r.error_kind}]` : ""} ${r.op === "above" ? ">" : "<"} ${r.threshold} for ${r.for_s}s${r.function ? ` on ${r.function}` : ""}`),
      el("td", {}, r.severity),
      el("td", {}, el("span", { class: `badge alert-${r.state}` }, r.silenced ? `${r.state} (silenced)` : r.state)),
      el("td", {}, (r.firing || []).map((id) => names[id] || (id ? id : "system")).join(", ")),
    )),
  ] : [el("tr", {}, el("td", { class: "muted" }, "No alert rules (POST /api/alerts/rules, or cloudfunc alerts create)."))]));

  const events = anomalies.events;
  $("anomaly-summary").textContent = events.length
    ? `${events.length} in this range, ${anomalies.open} ongoing (score threshold ${anomalies.threshold})`
    : "No anomaly in this range.";
  renderIf($("anomalies"), events, () => (events.length ? anomalyRows(events, true) : []));
  markAnomalies("sys", m, events.filter((e) => !e.function_id));

  renderIf($("functions"), list.functions, () => [
    el("tr", {}, ["Name", "Version", "Status", "Updated"].map((h) => el("th", {}, h))),
    ...list.functions.map((f) => el("tr", {},
      el("td", {}, el("a", { href: `#/functions/${encodeURIComponent(f.name)}` }, f.name)),
      el("td", { class: "num" }, f.version),
      el("td", {}, el("span", { class: `badge ${f.status}` }, f.status)),
      el("td", {}, new Date(f.updated_at).toLocaleString()),
    )),
  ]);
  renderIf($("chains"), chains.chains, () => chainRows(chains.chains));
}

// Rebuilds `node`'s children only when `data` has changed, so that a poll never swaps out
// a link or button under the user's pointer.
function renderIf(node, data, build) {
  const key = JSON.stringify(data);
  if (node.dataset.key === key) return;
  node.dataset.key = key;
  node.replaceChildren(...build());
}

async function showLogs(row, taskId) {
  const next = row.nextElementSibling;
  if (next && next.classList.contains("logs-row")) { next.remove(); return; }
  const t = await api(`/api/tasks/${encodeURIComponent(taskId)}/logs`);
  const text = t.logs || "(no output)";
  row.after(el("tr", { class: "logs-row" }, el("td", { colspan: "8" },
    el("pre", { class: "logs" }, text + (t.logs_truncated ? "\n… (truncated)" : "")))));
}

async function functionPage(name, first) {
  const page = $("page");
  const key = encodeURIComponent(name);
  if (first) {
    page.replaceChildren(
      el("p", {}, el("a", { href: "#/" }, "← Overview")),
      el("h1", {}, name, " ", el("span", { id: "fn-status", class: "badge" }, "")),
      el("p", {}, el("span", { id: "fn-info", class: "muted" }), " ",
        el("button", { id: "fn-toggle", type: "button", onclick: () => toggle(name) }, "…")),
      el("div", { class: "tiles", id: "summary" }),
      seriesCharts("fn"),
      el("h2", {}, "Anomalies"),
      el("p", { id: "fn-anomaly-status", class: "muted" }),
      el("table", { id: "fn-anomalies" }),
      el("h2", {}, "Recent invocations"),
      el("table", { id: "invocations" }),
      el("h2", {}, "Versions"),
      el("table", { id: "versions" }),
    );
  }
  const [f, m, tasks, anomalies] = await Promise.all([
    api(`/api/functions/${key}`),
    api(`/api/functions/${key}/metrics?${rangeQuery()}`),
    api(`/api/functions/${key}/tasks?limit=50`),
    api(`/api/functions/${key}/anomalies?${rangeQuery()}`),
  ]);
  state.last = { function: f, metrics: m, tasks: tasks.tasks, anomalies };
  const status = $("fn-status");
  status.textContent = f.status;
  status.className = `badge ${f.status}`;
  const s = f.settings || {};
  $("fn-info").textContent = `version ${f.version} · ${s.runtime || ""} · ${s.memory_mb || "?"} MiB · ${s.isolation || "container"} · timeout ${s.timeout_ms || "?"} ms`;
  $("fn-toggle").textContent = f.active ? "Deactivate" : "Activate";
  $("summary").replaceChildren(...summaryTiles(m));
  drawSeries("fn", m);
  const events = anomalies.events;
  $("fn-anomaly-status").textContent = anomalies.status === "watching"
    ? (events.length ? `${events.length} in this range, ${anomalies.open} ongoing.` : "Watched; no anomaly in this range.")
    : anomalies.message;
  renderIf($("fn-anomalies"), events, () => (events.length ? anomalyRows(events, false) : []));
  markAnomalies("fn", m, events);

  // Keep rows whose logs are open: only add rows for tasks not shown yet, and refresh states.
  const table = $("invocations");
  if (first || !table.firstChild) {
    table.replaceChildren(el("tr", {}, ["Task", "Started", "Status", "Duration", "Start", "Memory", "Version", ""].map((h) => el("th", {}, h))));
  }
  const shown = new Map([...table.querySelectorAll("tr[data-task]")].map((r) => [r.dataset.task, r]));
  const header = table.firstChild;
  let anchor = header;
  for (const t of tasks.tasks) {
    const u = t.usage || {};
    const cells = () => [
      el("td", {}, el("code", {}, t.task_id)),
      el("td", {}, new Date(t.created_at).toLocaleTimeString()),
      el("td", { class: `status-${t.status}` }, t.status, t.error ? el("div", { class: "muted" }, `${t.error.kind}: ${t.error.message}`.slice(0, 160)) : null),
      el("td", { class: "num" }, u.duration_ms == null ? "" : fmtMs(u.duration_ms)),
      el("td", {}, u.start || (u.cold ? "cold" : "")),
      el("td", { class: "num" }, u.peak_memory_bytes ? fmtBytes(u.peak_memory_bytes) : ""),
      el("td", { class: "num" }, t.version),
      el("td", {}, el("button", { type: "button", onclick: (e) => showLogs(e.target.closest("tr"), t.task_id) }, "logs")),
    ];
    let row = shown.get(t.task_id);
    if (!row) {
      row = el("tr", { "data-task": t.task_id, class: "invocation" });
      anchor.after(row);
    }
    renderIf(row, t, cells);
    anchor = row.nextElementSibling?.classList.contains("logs-row") ? row.nextElementSibling : row;
  }

  renderIf($("versions"), [f.version, f.versions], () => [
    el("tr", {}, ["Version", "Runtime", "Memory", "Timeout", "Isolation", "Deployed"].map((h) => el("th", {}, h))),
    ...[...(f.versions || [])].reverse().map((v) => el("tr", {},
      el("td", { class: "num" }, v.version === f.version ? `${v.version} (current)` : v.version),
      el("td", {}, v.runtime),
      el("td", { class: "num" }, `${v.memory_mb} MiB`),
      el("td", { class: "num" }, `${v.timeout_ms} ms`),
      el("td", {}, v.isolation),
      el("td", {}, new Date(v.created_at).toLocaleString()),
    )),
  ]);
}

async function toggle(name) {
  const f = state.last.function;
  await api(`/api/functions/${encodeURIComponent(name)}/${f.active ? "deactivate" : "activate"}`, { method: "PUT" });
  await refresh(false);
}

// ---- routing and the refresh loop ----
function currentRoute() {
  const m = location.hash.match(/^#\/(functions|chains)\/([^/]+)$/);
  if (!m) return { page: "overview" };
  return { page: m[1] === "chains" ? "chain" : "function", name: decodeURIComponent(m[2]) };
}

async function refresh(first) {
  const route = state.route;
  try {
    if (route.page === "function") await functionPage(route.name, first);
    else if (route.page === "chain") await chainPage(route.name, first);
    else await overview(first);
    $("problem").hidden = true;
    $("live").classList.remove("stale");
    $("live").textContent = `live · ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    if (e instanceof Unauthorized) return signOut("The token was refused; sign in again.");
    $("problem").textContent = e.message;
    $("problem").hidden = false;
    $("live").classList.add("stale");
  }
}

function start() {
  clearInterval(state.timer);
  for (const c of Object.values(state.charts)) c.destroy();
  state.charts = {};
  state.route = currentRoute();
  $("login").hidden = true;
  $("nav").hidden = false;
  $("page").hidden = false;
  if (typeof Chart === "undefined") {
    $("problem").textContent = "Chart.js is not installed on the server (run the README's set-up command); charts are off.";
    $("problem").hidden = false;
  }
  refresh(true);
  state.timer = setInterval(() => refresh(false), POLL_MS);
}

function signOut(message) {
  clearInterval(state.timer);
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(TOKEN_KEY);
  $("nav").hidden = true;
  $("page").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  state.token = $("token").value.trim();
  try {
    await api("/api/functions");
    sessionStorage.setItem(TOKEN_KEY, state.token);
    start();
  } catch (err) {
    signOut(err instanceof Unauthorized ? "That token was refused." : err.message);
  }
});
$("logout").addEventListener("click", () => signOut());
$("range").addEventListener("change", () => start());
window.addEventListener("hashchange", () => state.token && start());

// Tests and curious users can read what the page shows.
window.cloudfunc = {
  state,
  anomalyMarks: (id) => (state.charts[id]?.data.datasets.find((d) => d.label === "anomaly")?.data || []).filter((x) => x !== null).length,
  chartTotal: (id, dataset) => (state.charts[id]?.data.datasets[dataset ?? 0].data || []).reduce((a, b) => a + (Number(b) || 0), 0),
};

if (state.token) start();
else signOut();

// cloudfunc's dashboard, chains: the overview's list of chains, and a page per chain with its
// definition and its newest runs, each with its steps (path, function, status, duration,
// task). Uses app.js's helpers (el, api, renderIf, fmtMs, state); loaded before it.
"use strict";

function chainRows(chains) {
  if (!chains.length) {
    return [el("tr", {}, el("td", { class: "muted" }, "No chains (POST /api/chains, or cloudfunc chain deploy)."))];
  }
  return [
    el("tr", {}, ["Chain", "Steps", "Updated"].map((h) => el("th", {}, h))),
    ...chains.map((c) => el("tr", { class: "chain" },
      el("td", {}, el("a", { href: `#/chains/${encodeURIComponent(c.name)}` }, c.name)),
      el("td", { class: "num" }, (c.definition.steps || []).length),
      el("td", {}, new Date(c.updated_at).toLocaleString()),
    )),
  ];
}

function runRows(runs) {
  const rows = [el("tr", {}, ["Run", "Started", "Mode", "Status", "Duration", "Output or error"].map((h) => el("th", {}, h)))];
  for (const r of runs) {
    const outcome = r.error
      ? `${r.error.kind} at ${r.error.step}: ${r.error.message}`
      : JSON.stringify(r.output ?? null);
    rows.push(el("tr", { class: "chain-run", "data-run": r.run_id },
      el("td", {}, el("code", {}, r.run_id)),
      el("td", {}, new Date(r.created_at).toLocaleTimeString()),
      el("td", {}, r.mode),
      el("td", { class: `status-${r.status}` }, r.status),
      el("td", { class: "num" }, r.duration_ms == null ? "" : fmtMs(r.duration_ms)),
      el("td", { class: "muted" }, outcome.slice(0, 160)),
    ));
    // A map can have thousands of steps: the first ones, and how many more.
    const SHOWN = 50;
    for (const s of r.steps.slice(0, SHOWN)) {
      const ms = s.usage?.duration_ms;
      rows.push(el("tr", { class: "chain-step", "data-run": r.run_id },
        el("td", {}, el("code", {}, s.path)),
        el("td", {}, s.function),
        el("td", {}, s.task_id ? el("code", {}, s.task_id) : ""),
        el("td", { class: `status-${s.status}` }, s.status),
        el("td", { class: "num" }, ms == null ? "" : fmtMs(ms)),
        el("td", { class: "muted" }, (s.error ? `${s.error.kind}: ${s.error.message}` : JSON.stringify(s.output ?? null)).slice(0, 160)),
      ));
    }
    if (r.steps.length > SHOWN) {
      rows.push(el("tr", { class: "chain-step" }, el("td", { colspan: "6", class: "muted" },
        `… ${r.steps.length - SHOWN} more steps (GET /api/chains/runs/${r.run_id})`)));
    }
  }
  return rows;
}

async function chainPage(name, first) {
  const key = encodeURIComponent(name);
  if (first) {
    $("page").replaceChildren(
      el("p", {}, el("a", { href: "#/" }, "← Overview")),
      el("h1", {}, "Chain ", name),
      el("h2", {}, "Definition"),
      el("pre", { id: "chain-definition", class: "logs" }),
      el("h2", {}, "Recent runs"),
      el("table", { id: "chain-runs" }),
    );
  }
  const [chain, runs] = await Promise.all([
    api(`/api/chains/${key}`),
    api(`/api/chains/${key}/runs?limit=20`),
  ]);
  state.last = { chain, runs: runs.runs };
  $("chain-definition").textContent = JSON.stringify(chain.definition, null, 2);
  renderIf($("chain-runs"), runs.runs, () => (runs.runs.length ? runRows(runs.runs)
    : [el("tr", {}, el("td", { class: "muted" }, "No runs yet."))]));
}

// Sweeps: the jobs `tunesmith sweep` queued, grouped by their metadata.sweep. Each trial
// shows its settings (metadata.sweep_params), status and best validation loss so far (from
// its metrics events), best first, with a link to the job's page and its curves. Under the
// table, every trial's validation curve in one chart and each hyperparameter's importance,
// from the sweep's optuna study (GET /v1/sweeps/{name}).

import { api } from "./api.js";
import { lineChart } from "./chart.js";
import { RUNNING, card, h, pollJobs, statusBadge } from "./util.js";

const FAST_MS = 3000;
const SLOW_MS = 15000;

export async function sweepsPage(main, _params, page) {
  const box = h("div", { id: "sweeps" });
  const note = h("span", { class: "muted small", id: "sweeps-refresh" });
  main.append(h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Sweeps"), note)), box);
  const best = new Map(); // job id -> best validation loss; kept once the job has ended
  const studies = new Map(); // sweep name -> GET /v1/sweeps/{name}, or null where the server cannot read it
  pollJobs(main, page, note, {
    fastMs: FAST_MS, slowMs: SLOW_MS, running: "a trial", noun: "trial",
    load: async () => {
      const jobs = (await api("/v1/fine_tuning/jobs?limit=100")).data.filter((j) => j.metadata && j.metadata.sweep);
      for (const job of jobs) {
        if (!best.has(job.id) || RUNNING.includes(job.status)) best.set(job.id, await bestLoss(job.id));
      }
      for (const name of new Set(jobs.map((j) => j.metadata.sweep))) {
        const live = jobs.some((j) => j.metadata.sweep === name && RUNNING.includes(j.status));
        if (!studies.has(name) || live) studies.set(name, await api(`/v1/sweeps/${encodeURIComponent(name)}`).catch(() => null));
      }
      return jobs;
    },
    draw: (jobs) => draw(box, jobs, best, studies),
  });
}

async function bestLoss(jobId) {
  const events = (await api(`/v1/fine_tuning/jobs/${jobId}/events?limit=1000`)).data;
  const losses = events.filter((e) => e.type === "metrics" && e.data && e.data.valid_loss != null)
    .map((e) => e.data.valid_loss);
  return losses.length ? Math.min(...losses) : null;
}

function draw(box, jobs, best, studies) {
  if (!jobs.length) {
    box.replaceChildren(card(null, h("p", { class: "empty" },
      "No sweeps yet. Run ", h("code", {}, "tunesmith sweep -c sweep.yaml"),
      " against this server's database; each trial shows up here as a job.")));
    return;
  }
  const byName = new Map();
  for (const job of jobs) {
    if (!byName.has(job.metadata.sweep)) byName.set(job.metadata.sweep, []);
    byName.get(job.metadata.sweep).push(job);
  }
  box.replaceChildren(...[...byName].map(([name, trials]) => sweepCard(name, trials, best, studies.get(name))));
}

function sweepCard(name, trials, best, study) {
  const params = trials.map((j) => parseParams(j.metadata.sweep_params));
  const keys = [...new Set(params.flatMap((p) => Object.keys(p)))].sort();
  const rows = trials.map((job, i) => ({ job, params: params[i], loss: best.get(job.id) }))
    .sort((a, b) => (a.loss ?? Infinity) - (b.loss ?? Infinity));
  const winner = rows.find((r) => r.job.status === "succeeded" && r.loss != null);
  const table = h("table", { class: "table", id: `sweep-${name}` },
    h("thead", {}, h("tr", {}, ["Trial", "Status", "Best validation loss", ...keys, "Job"].map((c) => h("th", {}, c)))),
    h("tbody", {}, ...rows.map((r) => h("tr", { "data-trial": r.job.metadata.sweep_trial, class: r === winner ? "best" : null },
      h("td", { class: "num" }, r.job.metadata.sweep_trial),
      h("td", {}, statusBadge(r.job.status)),
      h("td", { class: "num" }, r.loss == null ? "–" : r.loss.toFixed(4)),
      ...keys.map((k) => h("td", { class: "num mono" }, formatParam(r.params[k]))),
      h("td", { class: "nowrap" }, h("a", { href: `/jobs/${r.job.id}`, "data-link": true, class: "mono" }, r.job.id))))));
  const done = trials.filter((j) => !RUNNING.includes(j.status)).length;
  return card(`${name} · ${done}/${trials.length} ended`, h("div", { class: "table-wrap" }, table),
    winner ? h("p", { class: "small" }, "Best so far: trial ", winner.job.metadata.sweep_trial, ", ",
      h("span", { class: "mono" }, winner.job.fine_tuned_model || winner.job.id)) : null,
    study ? studyView(name, study) : h("p", { class: "small muted" },
      "The curves and importances need the server to read the sweep's study (optuna installed)."));
}

// Every trial's intermediate values (the validation loss at each reported step) in one chart,
// then each hyperparameter's importance (optuna's fANOVA) as bars.
function studyView(name, study) {
  const chart = h("div", { class: "chart-box", id: `sweep-chart-${name}` });
  const series = study.trials.map((t, i) => ({
    name: `trial ${t.number}${t.state === "pruned" ? " (pruned)" : ""}`,
    color: `hsl(${(i * 137.5) % 360} 65% 45%)`,
    points: Object.entries(t.curve).map(([step, v]) => [Number(step), v]),
  }));
  lineChart(chart, { series, yLabel: study.objective === "valid_loss" ? "validation loss" : study.objective,
    empty: "No trial has reported a validation loss yet." });
  const entries = Object.entries(study.importance || {});
  const importance = entries.length
    ? h("div", { class: "importance", id: `sweep-importance-${name}` }, h("h3", {}, "Importance"),
      ...entries.map(([param, v]) => {
        const bar = h("div", { class: "bar" });
        bar.style.width = `${Math.round(100 * v)}%`; // CSSOM: allowed by the page's CSP
        return h("div", { class: "importance-row", "data-param": param },
          h("span", { class: "mono" }, param), h("div", { class: "track" }, bar),
          h("span", { class: "num" }, v.toFixed(2)));
      }))
    : h("p", { class: "small muted", id: `sweep-importance-${name}` },
      "Importances appear once two trials have finished with different settings.");
  return h("div", {}, chart, importance);
}

function parseParams(text) {
  try {
    return JSON.parse(text || "{}");
  } catch {
    return {};
  }
}

function formatParam(v) {
  if (v === undefined || v === null) return "–";
  return typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(3) : String(v);
}

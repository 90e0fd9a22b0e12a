// Sweeps: the jobs `tunesmith sweep` queued, grouped by their metadata.sweep. Each trial
// shows its settings (metadata.sweep_params), status and best validation loss so far (from
// its metrics events), best first, with a link to the job's page and its curves.

import { api } from "./api.js";
import { RUNNING, card, h, pollJobs, statusBadge } from "./util.js";

const FAST_MS = 3000;
const SLOW_MS = 15000;

export async function sweepsPage(main, _params, page) {
  const box = h("div", { id: "sweeps" });
  const note = h("span", { class: "muted small", id: "sweeps-refresh" });
  main.append(h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Sweeps"), note)), box);
  const best = new Map(); // job id -> best validation loss; kept once the job has ended
  pollJobs(main, page, note, {
    fastMs: FAST_MS, slowMs: SLOW_MS, running: "a trial", noun: "trial",
    load: async () => {
      const jobs = (await api("/v1/fine_tuning/jobs?limit=100")).data.filter((j) => j.metadata && j.metadata.sweep);
      for (const job of jobs) {
        if (!best.has(job.id) || RUNNING.includes(job.status)) best.set(job.id, await bestLoss(job.id));
      }
      return jobs;
    },
    draw: (jobs) => draw(box, jobs, best),
  });
}

async function bestLoss(jobId) {
  const events = (await api(`/v1/fine_tuning/jobs/${jobId}/events?limit=1000`)).data;
  const losses = events.filter((e) => e.type === "metrics" && e.data && e.data.valid_loss != null)
    .map((e) => e.data.valid_loss);
  return losses.length ? Math.min(...losses) : null;
}

function draw(box, jobs, best) {
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
  box.replaceChildren(...[...byName].map(([name, trials]) => sweepCard(name, trials, best)));
}

function sweepCard(name, trials, best) {
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
      h("span", { class: "mono" }, winner.job.fine_tuned_model || winner.job.id)) : null);
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

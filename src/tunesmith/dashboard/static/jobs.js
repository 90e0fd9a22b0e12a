// Jobs: every fine-tuning job, newest first; refreshed every 2 s while any job is unfinished.

import { api } from "./api.js";
import { ACTIVE, formatDuration, formatNumber, formatTime, h, jobDuration, pollJobs, statusBadge } from "./util.js";

const FAST_MS = 2000;
const SLOW_MS = 15000; // jobs submitted elsewhere (the openai client) still show up

export async function jobsPage(main, _params, page) {
  const body = h("tbody");
  const note = h("span", { class: "muted small", id: "jobs-refresh" });
  const table = h("table", { class: "table", id: "jobs-table" },
    h("thead", {}, h("tr", {},
      ["Job", "Status", "Base model", "Suffix", "Fine-tuned model", "Created", "Trained tokens", "Duration"]
        .map((c) => h("th", {}, c)))),
    body);
  const tableBox = h("div", { class: "table-wrap" }, table);
  main.append(
    h("div", { class: "page-head" },
      h("div", {}, h("h1", {}, "Fine-tuning jobs"), note),
      h("a", { href: "/jobs/new", "data-link": true, class: "button primary" }, "New job")),
    h("section", { class: "card flush" }, tableBox));

  pollJobs(main, page, note, {
    fastMs: FAST_MS, slowMs: SLOW_MS, running: "a job", noun: "job",
    load: async () => (await api("/v1/fine_tuning/jobs?limit=100")).data,
    draw: (jobs) => drawRows(body, jobs),
  });
}

function drawRows(body, jobs) {
  if (!jobs.length) {
    body.replaceChildren(h("tr", {}, h("td", { colspan: 8, class: "empty" },
      "No jobs yet. ", h("a", { href: "/jobs/new", "data-link": true }, "Start one"),
      " — upload a JSONL file and pick a base model.")));
    return;
  }
  body.replaceChildren(...jobs.map((job) => h("tr", { "data-job": job.id },
    h("td", { class: "nowrap" }, h("a", { href: `/jobs/${job.id}`, "data-link": true, class: "mono" }, job.id)),
    h("td", {}, statusBadge(job.status)),
    h("td", { class: "mono", title: job.model }, shortModel(job.model)),
    h("td", {}, job.user_provided_suffix || h("span", { class: "muted" }, "–")),
    h("td", { class: "mono wrap" }, job.fine_tuned_model || h("span", { class: "muted" }, ACTIVE.includes(job.status) ? "…" : "–")),
    h("td", { class: "nowrap" }, formatTime(job.created_at)),
    h("td", { class: "num" }, formatNumber(job.trained_tokens)),
    h("td", { class: "num nowrap" }, formatDuration(jobDuration(job))),
  )));
}

/** A model given as a server path shows its last folder (the full path is the tooltip). */
export function shortModel(model) {
  return model.includes("/") ? `…/${model.split("/").filter(Boolean).pop()}` : model;
}

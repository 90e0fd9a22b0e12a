// Job page: status, live loss/accuracy curves from the job's metrics events, checkpoints,
// result files (metrics CSV, evaluation report), events; polls while the job is unfinished.

import { api, downloadFile, listAll } from "./api.js";
import { lineChart } from "./chart.js";
import {
  ACTIVE, card, errorBox, formatDuration, formatNumber, formatTime, h, jobDuration, statusBadge, toast,
} from "./util.js";

const POLL_MS = 1500;
const COLORS = { train: "#4f46e5", valid: "#f59e0b", accuracy: "#10b981" };

export async function jobPage(main, [jobId], page) {
  let job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`);
  let events = []; // all of them, newest first as the API lists them (metrics events draw the curves)
  const seen = new Set();
  let checkpoints = [];
  let resultFiles = null;

  const head = h("div", { class: "page-head" });
  const facts = h("dl", { class: "facts", id: "job-facts" });
  const errorSlot = h("div");
  const lossChart = h("div", { class: "chart-box", id: "loss-chart" });
  const accChart = h("div", { class: "chart-box", id: "accuracy-chart" });
  const progress = h("div", { class: "progress", id: "job-progress" });
  const ckptBody = h("tbody");
  const results = h("div", { id: "result-files" });
  const evalBox = h("div", { id: "evaluation" });
  const eventList = h("ol", { class: "events", id: "events" });

  main.append(head, errorSlot,
    h("div", { class: "two-col wide-left" },
      card("Training curves", progress, lossChart, accChart),
      card("Details", facts)),
    h("div", { class: "two-col" },
      card("Checkpoints", h("div", { class: "table-wrap" }, h("table", { class: "table", id: "checkpoints" },
        h("thead", {}, h("tr", {}, ["Step", "Model", "Train loss", "Valid loss", "Valid accuracy"].map((c) => h("th", {}, c)))),
        ckptBody))),
      card("Results", results, evalBox)),
    card("Events", eventList));

  async function cancel() {
    if (!confirm(`Cancel ${job.id}? A running trainer stops within seconds; its last checkpoint is kept.`)) return;
    try {
      job = await api(`/v1/fine_tuning/jobs/${job.id}/cancel`, { method: "POST" });
      toast(`Cancelled ${job.id}`);
      draw();
    } catch (err) {
      toast(err.message, "error");
    }
  }

  function draw() {
    const active = ACTIVE.includes(job.status);
    head.replaceChildren(
      h("div", {},
        h("h1", {}, "Job ", h("span", { class: "mono" }, job.id), " ", statusBadge(job.status)),
        job.fine_tuned_model
          ? h("p", { class: "model-name" }, "Model ", h("code", { id: "fine-tuned-model" }, job.fine_tuned_model), " ",
            h("a", { href: `/playground?a=${encodeURIComponent(baseName(job))}&b=${encodeURIComponent(job.fine_tuned_model)}`
              + (job.validation_file ? `&file=${job.validation_file}` : ""), "data-link": true, class: "button small" },
            "Try it in the playground"))
          : h("p", { class: "muted" }, active ? "The model gets its name when training succeeds." : "No model was produced.")),
      active ? h("button", { type: "button", class: "danger", id: "cancel-job", onclick: cancel }, "Cancel job") : "");
    errorSlot.replaceChildren(job.error ? h("div", { class: "callout callout-error", id: "job-error" },
      h("strong", {}, `${job.error.code}: `), job.error.message) : "");
    const hp = job.hyperparameters || {};
    const method = job.method || { type: "supervised" };
    const beta = method.type === "dpo" ? ((method.dpo || {}).hyperparameters || {}).beta : undefined;
    const rows = [
      ["Base model", h("span", { class: "mono wrap" }, job.model)],
      ["Suffix", job.user_provided_suffix || "–"],
      ["Created", formatTime(job.created_at)],
      ["Finished", formatTime(job.finished_at)],
      ["Duration", formatDuration(jobDuration(job))],
      ["Estimated finish", job.estimated_finish ? formatTime(job.estimated_finish) : "–"],
      ["Trained tokens", formatNumber(job.trained_tokens)],
      ["Method", method.type === "dpo" ? `dpo (beta ${beta ?? "auto"})` : method.type],
      ["Epochs", String(hp.n_epochs ?? "auto")],
      ["Batch size", String(hp.batch_size ?? "auto")],
      ["LR multiplier", String(hp.learning_rate_multiplier ?? "auto")],
      ["Seed", String(job.seed)],
      ["Training file", h("span", { class: "mono" }, job.training_file)],
      ["Validation file", job.validation_file ? h("span", { class: "mono" }, job.validation_file) : "–"],
    ];
    facts.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    drawCurves();
    drawEvents();
    drawCheckpoints();
  }

  function metricRows() {
    return events.filter((e) => e.type === "metrics" && e.data && e.data.step !== undefined)
      .map((e) => e.data).sort((a, b) => a.step - b.step);
  }

  function drawCurves() {
    const rows = metricRows();
    const pick = (key) => rows.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]);
    const last = rows[rows.length - 1];
    if (last && last.total_steps) {
      const pct = Math.min(100, (100 * last.step) / last.total_steps);
      const bar = h("div", { class: "bar" });
      bar.style.width = `${pct}%`;
      progress.replaceChildren(h("div", { class: "track" }, bar),
        h("span", { class: "small muted" }, `step ${last.step} of ${last.total_steps}`,
          last.tokens_per_s ? ` · ${formatNumber(Math.round(last.tokens_per_s))} tokens/s` : ""));
    } else progress.replaceChildren();
    const waiting = ACTIVE.includes(job.status) ? "Waiting for the first training step…" : "This job logged no training steps.";
    lineChart(lossChart, {
      yLabel: "loss",
      empty: waiting,
      series: [
        { name: "training loss", color: COLORS.train, points: pick("train_loss") },
        { name: "validation loss", color: COLORS.valid, points: pick("valid_loss") },
      ],
    });
    const acc = pick("valid_mean_token_accuracy");
    const rewardAcc = pick("reward_accuracy"); // dpo jobs: share of pairs whose chosen answer wins
    const reward = pick("reward_mean"); // reinforcement jobs: the grader's mean reward per step
    if (reward.length) {
      lineChart(accChart, { yLabel: "reward", series: [
        { name: "training reward (mean)", color: COLORS.accuracy, points: reward },
        { name: "held-out reward", color: COLORS.valid, points: pick("valid_reward") },
        { name: "zero-variance groups", color: COLORS.train, points: pick("zero_variance_groups") },
      ] });
    } else if (acc.length) {
      lineChart(accChart, { yLabel: "token accuracy", yDomain: [0, 1], series: [{ name: "validation token accuracy", color: COLORS.accuracy, points: acc }] });
    } else if (rewardAcc.length) {
      lineChart(accChart, { yLabel: "reward accuracy", yDomain: [0, 1], series: [
        { name: "training reward accuracy", color: COLORS.accuracy, points: rewardAcc },
        { name: "validation reward accuracy", color: COLORS.valid, points: pick("valid_reward_accuracy") },
      ] });
    } else accChart.replaceChildren();
  }

  function drawEvents() {
    eventList.replaceChildren(...events.slice(0, 300).map((e) => h("li", { class: `event level-${e.level}` },
      h("time", {}, formatTime(e.created_at)), h("span", { class: "level" }, e.level), h("span", {}, e.message))));
    if (!events.length) eventList.replaceChildren(h("li", { class: "muted" }, "No events yet."));
  }

  function drawCheckpoints() {
    if (!checkpoints.length) {
      ckptBody.replaceChildren(h("tr", {}, h("td", { colspan: 5, class: "empty" },
        ACTIVE.includes(job.status) ? "Checkpoints appear once per epoch." : "No checkpoints.")));
      return;
    }
    const num = (v, digits = 4) => (typeof v === "number" ? v.toFixed(digits) : "–");
    ckptBody.replaceChildren(...checkpoints.map((c) => h("tr", { "data-step": c.step_number },
      h("td", { class: "num" }, c.step_number),
      h("td", { class: "mono wrap small" }, c.fine_tuned_model_checkpoint),
      h("td", { class: "num" }, num(c.metrics.train_loss)),
      h("td", { class: "num" }, num(c.metrics.valid_loss)),
      h("td", { class: "num" }, num(c.metrics.valid_mean_token_accuracy, 3)))));
  }

  async function drawResults() {
    if (!job.result_files.length) {
      results.replaceChildren(h("p", { class: "muted" }, ACTIVE.includes(job.status)
        ? "The metrics CSV (and, with a validation file, an evaluation report) appear when the job succeeds."
        : "No result files."));
      return;
    }
    if (resultFiles) return; // result files never change once written
    resultFiles = await Promise.all(job.result_files.map((id) => api(`/v1/files/${id}`)));
    results.replaceChildren(h("ul", { class: "downloads" }, resultFiles.map((f) => h("li", {},
      h("a", { href: "#", class: "download", "data-file": f.filename, onclick: (ev) => {
        ev.preventDefault();
        downloadFile(f.id, f.filename).catch((err) => toast(err.message, "error"));
      } }, f.filename), h("span", { class: "muted small mono" }, ` ${f.id}`)))));
    const evalFile = resultFiles.find((f) => f.filename === "evaluation.json");
    if (evalFile) {
      const res = await api(`/v1/files/${evalFile.id}/content`, { raw: true });
      evalBox.replaceChildren(evaluationTable(await res.json()));
    }
  }

  async function refresh() {
    // Decide on polling from this fetch, not from `job`: a cancel() meanwhile may have set
    // `job` to cancelled before this refresh read the events that the cancel added.
    const fetched = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`);
    job = fetched;
    // Events come newest first: read pages until one we already have, put the new ones on top.
    const fresh = [];
    let after = null;
    for (;;) {
      const q = `limit=200${after ? `&after=${after}` : ""}`;
      const pageData = await api(`/v1/fine_tuning/jobs/${job.id}/events?${q}`);
      let known = false;
      for (const e of pageData.data) {
        if (seen.has(e.id)) known = true;
        else {
          seen.add(e.id);
          fresh.push(e);
        }
      }
      if (known || !pageData.has_more) break;
      after = pageData.last_id;
    }
    events = fresh.concat(events);
    checkpoints = await listAll(`/v1/fine_tuning/jobs/${job.id}/checkpoints`, 100);
    if (!page.alive) return false;
    draw();
    await drawResults();
    return ACTIVE.includes(fetched.status) ? POLL_MS : false;
  }

  draw();
  page.every(POLL_MS, async () => {
    try {
      return await refresh();
    } catch (err) {
      errorSlot.replaceChildren(errorBox(err));
      return POLL_MS * 4;
    }
  });
}

function baseName(job) {
  // The served base model's id is the registry name, or the folder name of a path.
  return job.model.includes("/") ? job.model.split("/").filter(Boolean).pop() : job.model;
}

function evaluationTable(ev) {
  const main = ev.main_metric;
  const metrics = Object.keys(ev.tuned.scores || {});
  const fmt = (name, v) => (typeof v !== "number" ? "–"
    : ["loss", "perplexity"].includes(name) ? v.toFixed(3) : `${(100 * v).toFixed(1)}%`);
  const rows = metrics.map((m) => h("tr", { class: m === main ? "main-metric" : "" },
    h("td", {}, m.replaceAll("_", " ")), h("td", { class: "num" }, fmt(m, ev.base.scores[m])),
    h("td", { class: "num" }, fmt(m, ev.tuned.scores[m]))));
  if (typeof ev.base.loss === "number") {
    rows.push(h("tr", {}, h("td", {}, "reference loss"), h("td", { class: "num" }, ev.base.loss.toFixed(3)),
      h("td", { class: "num" }, typeof ev.tuned.loss === "number" ? ev.tuned.loss.toFixed(3) : "–")));
  }
  return h("div", { class: "evaluation" },
    h("h3", {}, `Evaluation on ${ev.n_examples} validation example(s)`),
    h("table", { class: "table", id: "evaluation-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "metric"), h("th", {}, "base"), h("th", {}, "tuned"))),
      h("tbody", {}, rows)));
}

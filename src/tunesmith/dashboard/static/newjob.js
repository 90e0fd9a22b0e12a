// New job: upload the files, read the validator's report (GET /v1/files/{id}/validation),
// pick the model (a base, or a fine-tuned model to continue), the method and its
// hyperparameters, submit (POST /v1/fine_tuning/jobs).

import { api } from "./api.js";
import { navigate } from "./nav.js";
import { card, formatBytes, formatDuration, formatNumber, h, toast } from "./util.js";

const SHOWN_PROBLEMS = 200;
const DEFAULT_LR = { supervised: "1e-3", dpo: "1e-4" }; // tunesmith's LoRA and DPO defaults
const PAIRS_FORMAT = "preference"; // the validator's format name for preference pairs

export async function newJobPage(main, _params, page) {
  const state = { training: null, validation: null, report: null, models: [], files: [] };
  try {
    state.models = (await api("/v1/models")).data;
    state.files = (await api("/v1/files?purpose=fine-tune&limit=100")).data;
  } catch (err) {
    toast(err.message, "error");
  }
  const bases = state.models.filter((m) => !m.parent).map((m) => m.id);
  const tuned = state.models.filter((m) => m.parent).map((m) => m.id);

  const modelInput = h("input", { id: "model", list: "base-models", value: bases[0] || "smollm2-135m-instruct",
    placeholder: "registry name, a model folder on the server, or ft:… to continue", autocomplete: "off" });
  const method = h("select", { id: "method" },
    h("option", { value: "supervised" }, "Supervised (LoRA)"),
    h("option", { value: "dpo" }, "Preference (DPO)"));
  const beta = h("input", { id: "beta", type: "number", min: 0.001, max: 10, step: "any", placeholder: "auto (0.1)" });
  const lrHint = h("small", { id: "lr-hint" });
  const hp = {
    n_epochs: h("input", { id: "n_epochs", type: "number", min: 1, max: 50, step: 1, placeholder: "auto" }),
    batch_size: h("input", { id: "batch_size", type: "number", min: 1, max: 256, step: 1, placeholder: "auto" }),
    learning_rate_multiplier: h("input", { id: "learning_rate_multiplier", type: "number", min: 0.01, max: 100,
      step: "any", placeholder: "auto" }),
  };
  const suffix = h("input", { id: "suffix", maxlength: 64, pattern: "[A-Za-z0-9_.\\-]*", placeholder: "e.g. support" });
  const seed = h("input", { id: "seed", type: "number", min: 0, placeholder: "random" });
  const submit = h("button", { type: "submit", class: "primary", id: "submit-job", disabled: true }, "Start fine-tuning");
  const submitNote = h("p", { class: "muted small", id: "submit-note" }, "Upload a training file first.");
  const trainingReport = h("div", { id: "training-report", class: "report" });
  const validationReport = h("div", { id: "validation-report", class: "report" });

  const fileSlot = (kind, report, label, hint) => {
    const input = h("input", { type: "file", id: `${kind}-file`, accept: ".jsonl,.json,application/jsonl" });
    const pick = h("select", { id: `${kind}-pick`, class: "pick" },
      h("option", { value: "" }, "…or choose an uploaded file"),
      state.files.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id}, ${formatBytes(f.bytes)})`)));
    const chosen = h("div", { class: "chosen", id: `${kind}-chosen` });
    input.addEventListener("change", async () => {
      if (!input.files.length) return;
      const form = new FormData();
      form.append("purpose", "fine-tune");
      form.append("file", input.files[0]);
      chosen.replaceChildren(h("span", { class: "spinner" }), " uploading ", input.files[0].name, " …");
      try {
        state[kind] = await api("/v1/files", { method: "POST", form });
      } catch (err) {
        chosen.replaceChildren(h("span", { class: "error-text" }, `Upload failed: ${err.message}`));
        return;
      }
      showChosen(chosen, state[kind]);
      refresh();
    });
    pick.addEventListener("change", async () => {
      state[kind] = state.files.find((f) => f.id === pick.value) || null;
      if (state[kind]) showChosen(chosen, state[kind]);
      else chosen.replaceChildren();
      refresh();
    });
    return card(label, h("p", { class: "muted small" }, hint),
      h("div", { class: "file-row" }, h("label", { class: "file-button" }, "Choose file…", input), state.files.length ? pick : null),
      chosen, report);
  };

  const form = h("form", { id: "job-form", class: "card" },
    h("h2", {}, "Model and hyperparameters"),
    h("datalist", { id: "base-models" }, bases.map((b) => h("option", { value: b })),
      tuned.map((t) => h("option", { value: t, label: "fine-tuned: continue it" }))),
    h("div", { class: "form-grid" },
      h("label", { class: "span-2" }, "Model", modelInput,
        h("small", {}, "A base model: a registry name (smollm2-135m-instruct) or a model folder on the server. "
          + "Or a fine-tuned model (ft:…, a job's or a checkpoint's) to continue training it.")),
      h("label", {}, "Method", method, h("small", {}, "Preference (DPO) trains on prompt/chosen/rejected pairs.")),
      h("label", { id: "beta-field", hidden: true }, "Beta", beta, h("small", {}, "DPO: higher stays closer to the reference.")),
      h("label", {}, "Suffix", suffix, h("small", {}, "Goes into the model name ft:base:suffix:id")),
      h("label", {}, "Epochs", hp.n_epochs),
      h("label", {}, "Batch size", hp.batch_size),
      h("label", {}, "Learning-rate multiplier", hp.learning_rate_multiplier, lrHint),
      h("label", {}, "Seed", seed)),
    h("p", { class: "muted small" }, "Empty fields mean \"auto\": the worker picks them from the data, as hosted fine-tuning does."),
    h("div", { class: "actions" }, submitNote, submit));

  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "New fine-tuning job")),
    h("div", { class: "two-col" },
      fileSlot("training", trainingReport, "Training file",
        "JSONL in chat ({\"messages\": [...]}), prompt/completion or alpaca format, or preference pairs "
        + "(prompt/chosen/rejected) for DPO; at least 10 examples."),
      fileSlot("validation", validationReport, "Validation file (optional)",
        "Held-out examples: validation loss during training, and an evaluation of base vs tuned at the end.")),
    form);

  // -- method

  const betaField = form.querySelector("#beta-field");
  let methodTouched = false; // once the user picks a method, the file's format no longer picks it
  function showMethod() {
    betaField.hidden = method.value !== "dpo";
    lrHint.textContent = `× the ${method.value === "dpo" ? "DPO" : "LoRA"} default ${DEFAULT_LR[method.value]}`;
  }
  method.addEventListener("change", () => {
    methodTouched = true;
    showMethod();
  });
  showMethod();

  // -- reports

  let generation = 0; // a slower, older report never overwrites a newer one
  async function refresh() {
    const mine = ++generation;
    const model = modelInput.value.trim();
    state.report = null;
    updateSubmit();
    if (state.validation) {
      api(`/v1/files/${state.validation.id}/validation`)
        .then((r) => mine === generation && drawReport(validationReport, r, null))
        .catch((err) => drawError(validationReport, err));
    } else validationReport.replaceChildren();
    if (!state.training) {
      trainingReport.replaceChildren();
      return;
    }
    trainingReport.replaceChildren(h("p", { class: "muted" }, h("span", { class: "spinner" }),
      model ? ` checking through ${model}'s chat template (token counts, time estimate) …` : " checking …"));
    let report;
    let note = null;
    try {
      const q = new URLSearchParams();
      if (model) q.set("model", model);
      if (model && state.validation) q.set("validation_file", state.validation.id);
      report = await api(`/v1/files/${state.training.id}/validation?${q}`);
    } catch (err) {
      // The model may be unknown to the server: still show what the upload check found.
      note = err;
      report = await api(`/v1/files/${state.training.id}/validation`).catch(() => null);
    }
    if (mine !== generation || !page.alive) return;
    if (!report) return drawError(trainingReport, note);
    state.report = report;
    if (!methodTouched && report.format) { // pairs train with DPO, anything else supervised
      method.value = report.format === PAIRS_FORMAT ? "dpo" : "supervised";
      showMethod();
    }
    drawReport(trainingReport, report, note);
    updateSubmit();
  }

  function updateSubmit() {
    const ok = state.training && state.report && state.report.ok;
    submit.disabled = !ok;
    submitNote.textContent = !state.training ? "Upload a training file first."
      : !state.report ? "Checking the file…"
        : ok ? `${formatNumber(state.report.examples)} training ${state.report.format === PAIRS_FORMAT
          ? "preference pairs" : "examples"} ready.`
          : "Fix the errors listed above, then upload the file again.";
  }

  let debounce = null;
  modelInput.addEventListener("input", () => {
    clearTimeout(debounce);
    debounce = setTimeout(refresh, 700);
  });
  hp.n_epochs.addEventListener("input", () => state.report && drawReport(trainingReport, state.report, null));

  function drawReport(box, report, note) {
    box.replaceChildren(...reportNodes(report, note, hp.n_epochs.value ? Number(hp.n_epochs.value) : null));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const hyper = {};
    for (const [k, input] of Object.entries(hp)) if (input.value) hyper[k] = Number(input.value);
    const type = method.value;
    if (type === "dpo" && beta.value) hyper.beta = Number(beta.value);
    const body = { model: modelInput.value.trim(), training_file: state.training.id,
      method: { type, [type]: { hyperparameters: hyper } } };
    if (state.validation) body.validation_file = state.validation.id;
    if (suffix.value.trim()) body.suffix = suffix.value.trim();
    if (seed.value) body.seed = Number(seed.value);
    submit.disabled = true;
    try {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", body });
      toast(`Created ${job.id}`);
      navigate(`/jobs/${job.id}`);
    } catch (err) {
      submit.disabled = false;
      toast(err.message, "error");
      submitNote.replaceChildren(h("span", { class: "error-text", id: "submit-error" }, err.message));
    }
  });
}

function showChosen(box, file) {
  box.replaceChildren(h("span", { class: "file-chip" }, file.filename),
    h("span", { class: "muted small mono" }, ` ${file.id} · ${formatBytes(file.bytes)}`));
}

function drawError(box, err) {
  box.replaceChildren(h("div", { class: "callout callout-error" }, err.message));
}

function reportNodes(r, note, epochsOverride) {
  const nodes = [];
  if (note) {
    nodes.push(h("div", { class: "callout callout-warn" },
      "Only the upload check is shown: ", note.message));
  }
  nodes.push(h("div", { class: `verdict ${r.ok ? "ok" : "bad"}`, id: r.ok ? null : "report-invalid" },
    r.ok ? "✓ Valid" : `✗ ${r.errors.length} error${r.errors.length === 1 ? "" : "s"}`,
    h("span", { class: "muted" }, ` · ${formatNumber(r.examples)} usable example(s)`,
      r.format ? ` · ${r.format}` : "", r.warnings.length ? ` · ${r.warnings.length} warning(s)` : "")));
  if (r.errors.length) nodes.push(problemTable(r.errors, "errors"));
  if (r.warnings.length) {
    nodes.push(h("details", { class: "warnings", open: r.warnings.length <= 5 },
      h("summary", {}, `${r.warnings.length} warning(s)`), problemTable(r.warnings, "warnings")));
  }
  if (r.audit) {
    // The content audit's one line (near duplicates, conflicting answers, leakage).
    const found = r.warnings.some((w) => ["near_duplicate", "conflicting_answer", "leakage"].includes(w.code));
    nodes.push(h("div", { class: `callout ${found ? "callout-warn" : ""}`, id: "report-audit" }, r.audit));
  }
  if (r.stats) nodes.push(statsGrid(r.stats));
  if (r.estimate) nodes.push(estimateBox(r.estimate, r.stats, epochsOverride));
  return nodes;
}

function problemTable(problems, kind) {
  const rows = problems.slice(0, SHOWN_PROBLEMS).map((p) => h("tr", { "data-line": p.line, "data-code": p.code },
    h("td", { class: "num" }, p.line ? p.line : "file"),
    h("td", { class: "mono" }, p.code),
    h("td", { class: "mono small" }, p.field || ""),
    h("td", {}, p.message)));
  const more = problems.length > SHOWN_PROBLEMS
    ? h("p", { class: "muted small" }, `… and ${problems.length - SHOWN_PROBLEMS} more`) : null;
  return h("div", { class: "table-wrap" },
    h("table", { class: `table problems ${kind}`, id: `${kind}-table` },
      h("thead", {}, h("tr", {}, h("th", {}, "Line"), h("th", {}, "Code"), h("th", {}, "Field"), h("th", {}, "Problem"))),
      h("tbody", {}, rows)), more);
}

function statsGrid(s) {
  const tpe = s.tokens_per_example;
  const trained = s.trained_tokens_per_example;
  const labels = s.labels ? Object.keys(s.labels).length : null;
  const items = [
    ["Examples", formatNumber(s.examples)],
    ["Tokens per example", tpe ? `${tpe.p50} median (${tpe.min}–${tpe.max})` : "–"],
    ["Trained tokens per example", trained ? `${trained.p50} median (${trained.min}–${trained.max})` : "–"],
    ["Tokens per epoch", formatNumber(s.tokens_per_epoch)],
    ["Trained tokens per epoch", formatNumber(s.trained_tokens_per_epoch)],
    ["Longer than max length", `${formatNumber(s.truncated_examples)} (max ${formatNumber(s.max_seq_len)} tokens)`],
  ];
  if (labels) items.push(["Answers look like labels", `${labels} distinct`]);
  return h("dl", { class: "facts", id: "report-stats" }, items.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function estimateBox(e, s, epochsOverride) {
  const epochs = epochsOverride || e.epochs;
  const tokens = s.tokens_per_epoch * epochs;
  const time = e.train_tokens_per_s > 0 ? tokens / e.train_tokens_per_s : null;
  return h("div", { class: "estimate", id: "report-estimate" },
    h("div", { class: "big" }, formatDuration(time)),
    h("div", {},
      h("strong", {}, `${epochs} epoch(s)${epochsOverride ? "" : " (auto)"}`),
      ` · ${formatNumber(tokens)} tokens · measured ${formatNumber(e.train_tokens_per_s)} tokens/s here`,
      e.speed_precision ? ` (${e.speed_precision})` : "",
      e.speed_measured_busy ? h("span", { class: "muted" }, " · measured while the machine was busy") : ""));
}

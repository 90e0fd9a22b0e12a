// Playground: one prompt, two models, both answers streamed side by side
// (two concurrent POST /v1/chat/completions with stream=true). A prompt can come from a
// row of an uploaded file, whose reference answer is then shown under the two answers.

import { api, streamChat } from "./api.js";
import { card, h, parseJsonl, rowToPrompt, toast } from "./util.js";

const MAX_ROWS = 500;

export async function playgroundPage(main, _params, page) {
  const query = new URLSearchParams(location.search);
  const models = (await api("/v1/models")).data;
  const files = (await api("/v1/files?purpose=fine-tune&limit=100")).data;
  const ids = models.map((m) => m.id);
  const base = models.find((m) => !m.parent)?.id;
  const newestAdapter = [...models].filter((m) => m.parent).sort((a, b) => b.created - a.created)[0]?.id;
  const pickModel = (id, wanted, fallback) => {
    const select = h("select", { id }, models.map((m) => h("option", { value: m.id },
      m.parent ? `${m.id}  (adapter)` : `${m.id}  (base)`)));
    select.value = ids.includes(wanted) ? wanted : fallback || ids[0];
    return select;
  };
  const sides = [
    makeSide("a", pickModel("model-a", query.get("a"), base)),
    makeSide("b", pickModel("model-b", query.get("b"), newestAdapter || base)),
  ];

  const system = h("textarea", { id: "system", rows: 2, placeholder: "System message (optional)" });
  const prompt = h("textarea", { id: "prompt", rows: 4, placeholder: "Ask something…" });
  const temperature = h("input", { id: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const maxTokens = h("input", { id: "max_tokens", type: "number", min: 1, max: 4096, step: 1, value: 128 });
  const run = h("button", { type: "submit", class: "primary", id: "run" }, "Run both");
  const stop = h("button", { type: "button", id: "stop", disabled: true }, "Stop");
  const reference = h("div", { id: "reference", class: "reference", hidden: true });

  // -- prompt from a file row
  const fileSelect = h("select", { id: "row-file" }, h("option", { value: "" }, "Pick a file…"),
    files.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id})`)));
  const rowSelect = h("select", { id: "row", disabled: true }, h("option", { value: "" }, "…then a row"));
  let rows = [];
  fileSelect.addEventListener("change", async () => {
    rowSelect.replaceChildren(h("option", { value: "" }, "…then a row"));
    rowSelect.disabled = true;
    if (!fileSelect.value) return;
    try {
      const res = await api(`/v1/files/${fileSelect.value}/content`, { raw: true });
      rows = parseJsonl(await res.text()).slice(0, MAX_ROWS)
        .map((r) => ({ line: r.line, ...rowToPrompt(r.value) })).filter((r) => r.messages && r.messages.length);
    } catch (err) {
      toast(err.message, "error");
      return;
    }
    rows.forEach((r, i) => {
      const user = [...r.messages].reverse().find((m) => m.role === "user");
      const text = (user ? user.content : "").replace(/\s+/g, " ");
      rowSelect.append(h("option", { value: i }, `line ${r.line}: ${text.slice(0, 80)}`));
    });
    rowSelect.disabled = !rows.length;
  });
  rowSelect.addEventListener("change", () => {
    const r = rows[Number(rowSelect.value)];
    if (!r || rowSelect.value === "") return;
    const sys = r.messages.find((m) => m.role === "system");
    system.value = sys ? sys.content : "";
    const rest = r.messages.filter((m) => m.role !== "system");
    prompt.value = rest.length ? rest[rest.length - 1].content : "";
    prompt.dataset.history = JSON.stringify(rest.slice(0, -1)); // earlier turns of a multi-turn row
    reference.hidden = r.reference === null;
    reference.replaceChildren(h("strong", {}, `Reference answer (line ${r.line}): `), r.reference ?? "");
  });
  if (files.some((f) => f.id === query.get("file"))) { // from a job page: its validation file
    fileSelect.value = query.get("file");
    fileSelect.dispatchEvent(new Event("change"));
  }
  prompt.addEventListener("input", () => {
    delete prompt.dataset.history;
    reference.hidden = true;
  });

  const form = h("form", { class: "card", id: "playground-form" },
    h("div", { class: "row-pick" }, h("span", { class: "muted small" }, "Prompt from a file:"), fileSelect, rowSelect),
    system, prompt,
    h("div", { class: "actions" },
      h("label", { class: "inline" }, "Temperature", temperature),
      h("label", { class: "inline" }, "Max tokens", maxTokens),
      h("span", { class: "spacer" }), stop, run));

  main.append(h("div", { class: "page-head" }, h("h1", {}, "Playground"),
    h("p", { class: "muted" }, "Same prompt, two models, answers streamed side by side.")),
  form, reference, h("div", { class: "two-col" }, sides.map((s) => s.node)));

  let controller = null;
  stop.addEventListener("click", () => controller && controller.abort());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!prompt.value.trim()) return toast("Type a prompt first", "error");
    const messages = [];
    if (system.value.trim()) messages.push({ role: "system", content: system.value.trim() });
    if (prompt.dataset.history) messages.push(...JSON.parse(prompt.dataset.history));
    messages.push({ role: "user", content: prompt.value });
    const params = { temperature: Number(temperature.value), max_tokens: Number(maxTokens.value) };
    controller = new AbortController();
    run.disabled = true;
    stop.disabled = false;
    await Promise.all(sides.map((s) => s.run(messages, params, controller.signal)));
    run.disabled = false;
    stop.disabled = true;
  });
  page.onLeave(() => controller && controller.abort());
}

function makeSide(key, select) {
  const output = h("div", { class: "answer", id: `answer-${key}` });
  const stats = h("div", { class: "muted small", id: `stats-${key}` });
  const node = card(null, h("div", { class: "side-head" }, h("span", { class: "side-key" }, key.toUpperCase()), select),
    output, stats);
  async function run(messages, params, signal) {
    output.replaceChildren();
    delete output.dataset.done;
    output.classList.add("streaming");
    output.classList.remove("error-text");
    stats.textContent = "waiting for the first token…";
    const t0 = performance.now();
    let first = null;
    let pieces = 0;
    try {
      const res = await streamChat(select.value, messages, params, (piece) => {
        first = first ?? performance.now();
        pieces += 1;
        output.append(piece);
        stats.textContent = `${pieces} chunks…`;
      }, signal);
      const secs = (performance.now() - t0) / 1000;
      const tokens = res.usage ? res.usage.completion_tokens : pieces;
      stats.textContent = `${tokens} tokens in ${secs.toFixed(1)} s`
        + (first ? ` · first token after ${((first - t0) / 1000).toFixed(2)} s` : "")
        + ` · finish: ${res.finishReason || "?"}`;
      output.dataset.done = "true";
    } catch (err) {
      if (err.name === "AbortError") stats.textContent = "stopped";
      else {
        output.classList.add("error-text");
        output.append(err.message);
        stats.textContent = "failed";
      }
    } finally {
      output.classList.remove("streaming");
    }
  }
  return { node, run };
}

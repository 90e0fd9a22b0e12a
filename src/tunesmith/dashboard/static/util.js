// DOM building and formatting shared by the pages. Text always goes in as text nodes
// (never innerHTML), so file contents and model answers cannot inject markup.

/** h("a", {href: "/x", class: "y", onclick: fn}, "text", child, ...) */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (v === true) node.setAttribute(k, "");
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export const ACTIVE = ["validating_files", "queued", "running", "paused"];
export const RUNNING = ["validating_files", "queued", "running"];

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}`, "data-status": status }, status.replace("_", " "));
}

export function formatTime(unix) {
  if (!unix) return "–";
  const d = new Date(unix * 1000);
  const today = new Date();
  const sameDay = d.toDateString() === today.toDateString();
  const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  return sameDay ? time : `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${time}`;
}

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 90) return `${seconds} s`;
  if (seconds < 5400) return `${Math.floor(seconds / 60)} min ${seconds % 60 ? `${seconds % 60} s` : ""}`.trim();
  return `${(seconds / 3600).toFixed(1)} h`;
}

export function jobDuration(job) {
  const end = job.finished_at || (ACTIVE.includes(job.status) ? Date.now() / 1000 : null);
  return end ? end - job.created_at : null;
}

export function formatNumber(n) {
  return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US");
}

export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

export function toast(message, kind = "info") {
  const box = document.getElementById("toast");
  const item = h("div", { class: `toast toast-${kind}` }, message);
  box.append(item);
  setTimeout(() => item.remove(), kind === "error" ? 8000 : 4000);
}

/** A message box for a failed request, placed where the page's content would be. */
export function errorBox(err) {
  return h("div", { class: "callout callout-error" }, h("strong", {}, "Request failed: "), err.message || String(err));
}

/** Refresh a list of jobs: every `fastMs` while one of them runs, every `slowMs` otherwise
 * (jobs submitted elsewhere still show up). `load` fetches the jobs and `draw` shows them; a
 * failed fetch shows one error box at the end of `main` until the next fetch succeeds, and
 * `note` says how often the list refreshes (`running`: "a job", "a trial"). */
export function pollJobs(main, page, note, { fastMs, slowMs, load, draw, running, noun }) {
  let failed = null;
  page.every(fastMs, async () => {
    let jobs;
    try {
      jobs = await load();
    } catch (err) {
      failed?.remove();
      failed = errorBox(err);
      main.append(failed);
      return slowMs;
    }
    failed?.remove();
    failed = null;
    draw(jobs);
    const busy = jobs.some((j) => RUNNING.includes(j.status));
    note.textContent = busy ? `refreshing every ${fastMs / 1000} s while ${running} runs` : `${jobs.length} ${noun}(s)`;
    return busy ? fastMs : slowMs;
  });
}

export function card(title, ...children) {
  return h("section", { class: "card" }, title ? h("h2", {}, title) : null, ...children);
}

/** Read a JSONL text into [{line, value}] (lines that do not parse are skipped). */
export function parseJsonl(text) {
  const rows = [];
  text.split("\n").forEach((line, i) => {
    if (!line.trim()) return;
    try {
      rows.push({ line: i + 1, value: JSON.parse(line) });
    } catch (_) { /* the validator reports it; the playground just skips it */ }
  });
  return rows;
}

/** The conversation of a training row as chat messages plus its reference answer. */
export function rowToPrompt(value) {
  if (Array.isArray(value.messages)) {
    const msgs = value.messages.map((m) => ({ role: m.role, content: typeof m.content === "string" ? m.content : "" }));
    const last = msgs.length && msgs[msgs.length - 1].role === "assistant" ? msgs.pop() : null;
    return { messages: msgs, reference: last ? last.content : null };
  }
  if (typeof value.prompt === "string") return { messages: [{ role: "user", content: value.prompt }], reference: value.completion ?? null };
  if (typeof value.instruction === "string") {
    const user = value.input ? `${value.instruction}\n\n${value.input}` : value.instruction;
    return { messages: [{ role: "user", content: user }], reference: value.output ?? null };
  }
  return null;
}

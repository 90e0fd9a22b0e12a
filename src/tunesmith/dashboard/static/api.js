// Every call the dashboard makes goes through here: the public API, with the API key the
// user typed (kept in sessionStorage, so it lasts for this tab only).

const KEY_STORAGE = "tunesmith.apiKey";

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let pendingKey = null; // one prompt however many requests get a 401 at once
// Esc cannot close the key prompt: the page can do nothing without the key.
document.getElementById("key-dialog").addEventListener("cancel", (event) => event.preventDefault());

export function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  document.getElementById("forget-key").hidden = true;
}

function askForKey(rejected) {
  if (pendingKey) return pendingKey;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  const error = document.getElementById("key-error");
  error.hidden = !rejected;
  error.textContent = rejected ? "The server did not accept that key; try again." : "";
  input.value = "";
  pendingKey = new Promise((resolve) => {
    const form = document.getElementById("key-form");
    const onSubmit = (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      form.removeEventListener("submit", onSubmit);
      sessionStorage.setItem(KEY_STORAGE, key);
      document.getElementById("forget-key").hidden = false;
      dialog.close();
      pendingKey = null;
      resolve();
    };
    form.addEventListener("submit", onSubmit);
  });
  dialog.showModal();
  input.focus();
  return pendingKey;
}

/** fetch() against the API: JSON in and out, OpenAI-shaped errors thrown as ApiError.
 *  A 401 asks for the key and sends the request again. `raw: true` returns the Response. */
export async function api(path, { method = "GET", body, form, raw = false, signal } = {}) {
  let rejected = false;
  for (;;) {
    const headers = {};
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = `Bearer ${key}`;
    let payload;
    if (form) payload = form;
    else if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    const res = await fetch(path, { method, headers, body: payload, signal });
    if (res.status === 401) {
      if (key) sessionStorage.removeItem(KEY_STORAGE);
      await askForKey(rejected || Boolean(key));
      rejected = true;
      continue;
    }
    if (!res.ok) {
      let message = `${res.status} ${res.statusText}`;
      let code = null;
      try {
        const err = (await res.json()).error || {};
        message = err.message || message;
        code = err.code || null;
      } catch (_) { /* not JSON: keep the status line */ }
      throw new ApiError(res.status, message, code);
    }
    return raw ? res : res.json();
  }
}

export function hasKey() {
  return Boolean(sessionStorage.getItem(KEY_STORAGE));
}

/** Every item of a paged list endpoint (newest first), following `after` while has_more. */
export async function listAll(path, limit = 100, most = 10000) {
  const items = [];
  let after = null;
  const sep = path.includes("?") ? "&" : "?";
  for (;;) {
    const page = await api(`${path}${sep}limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    items.push(...page.data);
    if (!page.has_more || !page.data.length || items.length >= most) return items;
    after = page.last_id;
  }
}

/** A file's content as a download, through fetch (a plain link could not send the key). */
export async function downloadFile(fileId, filename) {
  const res = await api(`/v1/files/${encodeURIComponent(fileId)}/content`, { raw: true });
  const url = URL.createObjectURL(await res.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/** POST /v1/chat/completions with stream=true; calls onText(piece) per delta.
 *  Returns {text, finishReason, usage}. Abort with `signal`. */
export async function streamChat(model, messages, params, onText, signal) {
  const res = await api("/v1/chat/completions", {
    method: "POST",
    raw: true,
    signal,
    body: { model, messages, stream: true, stream_options: { include_usage: true }, ...params },
  });
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const out = { text: "", finishReason: null, usage: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return out;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message, chunk.error.code);
        if (chunk.usage) out.usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            out.text += piece;
            onText(piece);
          }
          if (choice.finish_reason) out.finishReason = choice.finish_reason;
        }
      }
    }
  }
  return out;
}

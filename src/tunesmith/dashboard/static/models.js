// Models: what the server serves (GET /v1/models): the base model and its adapters, with
// add (POST /v1/adapters) and remove (DELETE /v1/adapters/{name}) for adapters.

import { api } from "./api.js";
import { card, formatTime, h, toast } from "./util.js";

export async function modelsPage(main, _params, page) {
  const body = h("tbody");
  const name = h("input", { id: "adapter-name", required: true, placeholder: "support", pattern: "[^\\s]+" });
  const path = h("input", { id: "adapter-path", required: true, placeholder: "/srv/runs/support (a run or adapter folder on the server)" });
  const add = h("button", { type: "submit", class: "primary", id: "add-adapter" }, "Add adapter");
  const form = h("form", { class: "card", id: "adapter-form" },
    h("h2", {}, "Add an adapter"),
    h("p", { class: "muted small" }, "Load a LoRA adapter from a folder on the server (a tunesmith train run or a peft adapter) and serve it under a name. "
      + "Fine-tuned models from jobs are added by themselves when their job succeeds."),
    h("div", { class: "form-grid" }, h("label", {}, "Name", name), h("label", { class: "span-2" }, "Path on the server", path)),
    h("div", { class: "actions" }, add));

  main.append(h("div", { class: "page-head" }, h("h1", {}, "Models")),
    card(null, h("div", { class: "table-wrap" }, h("table", { class: "table", id: "models-table" },
      h("thead", {}, h("tr", {}, ["Model", "Kind", "Loaded", ""].map((c) => h("th", {}, c)))), body))),
    form);

  async function load() {
    const models = (await api("/v1/models")).data;
    if (!page.alive) return;
    body.replaceChildren(...models.map((m) => h("tr", { "data-model": m.id },
      h("td", { class: "mono wrap" }, m.id),
      h("td", {}, m.parent ? h("span", {}, "adapter on ", h("span", { class: "mono" }, m.parent)) : h("span", { class: "badge status-base" }, "base model")),
      h("td", { class: "nowrap" }, formatTime(m.created)),
      h("td", {}, h("div", { class: "actions-cell" },
        h("a", { href: `/playground?b=${encodeURIComponent(m.id)}`, "data-link": true, class: "button small" }, "Playground"),
        m.parent ? h("button", { type: "button", class: "small danger", "data-remove": m.id, onclick: () => remove(m.id) }, "Remove") : null)))));
  }

  async function remove(id) {
    if (!confirm(`Stop serving ${id}? Requests already running finish first; its files stay on disk.`)) return;
    try {
      await api(`/v1/adapters/${encodeURIComponent(id)}`, { method: "DELETE" });
      toast(`Removed ${id}`);
    } catch (err) {
      toast(err.message, "error");
    }
    await load();
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    add.disabled = true;
    try {
      const model = await api("/v1/adapters", { method: "POST", body: { name: name.value.trim(), path: path.value.trim() } });
      toast(`Serving ${model.id}`);
      name.value = "";
      path.value = "";
    } catch (err) {
      toast(err.message, "error");
    } finally {
      add.disabled = false;
    }
    await load();
  });
  await load();
}

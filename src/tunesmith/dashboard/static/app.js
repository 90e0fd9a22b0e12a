// The dashboard's entry point: a tiny router over history.pushState. Each page is a
// function (main, params, page) that draws into `main`; `page.every(ms, fn)` polls until
// the user leaves the page, `page.alive` says whether the page is still shown, `page.onLeave(fn)` cleans up.

import { forgetKey, hasKey } from "./api.js";
import { jobsPage } from "./jobs.js";
import { jobPage } from "./job.js";
import { modelsPage } from "./models.js";
import { newJobPage } from "./newjob.js";
import { playgroundPage } from "./playground.js";
import { sweepsPage } from "./sweeps.js";
import { navigate, setRenderer } from "./nav.js";
import { errorBox } from "./util.js";

const ROUTES = [
  [/^\/$/, "jobs", jobsPage, "Jobs"],
  [/^\/jobs\/new$/, "new", newJobPage, "New job"],
  [/^\/jobs\/([A-Za-z0-9_.-]+)$/, "jobs", jobPage, "Job"],
  [/^\/sweeps$/, "sweeps", sweepsPage, "Sweeps"],
  [/^\/playground$/, "playground", playgroundPage, "Playground"],
  [/^\/models$/, "models", modelsPage, "Models"],
];

let current = null;

class Page {
  constructor() {
    this.alive = true;
    this.timers = [];
    this.hooks = [];
  }

  /** Run fn when the user leaves the page (e.g. abort a stream). */
  onLeave(fn) {
    this.hooks.push(fn);
  }

  /** Run fn now and every `ms` until the page is left; fn returning false stops it,
   *  returning a number sets the next delay (ms). */
  every(ms, fn) {
    const tick = async () => {
      if (!this.alive) return;
      let next = ms;
      try {
        const result = await fn();
        if (result === false) return;
        if (typeof result === "number") next = result;
      } catch (err) {
        console.warn("refresh failed", err);
      }
      if (this.alive) this.timers.push(setTimeout(tick, next));
    };
    tick();
  }

  leave() {
    this.alive = false;
    this.timers.forEach(clearTimeout);
    this.hooks.forEach((fn) => fn());
  }
}

async function render() {
  if (current) current.leave();
  const path = location.pathname.replace(/\/+$/, "") || "/";
  const main = document.getElementById("main");
  const route = ROUTES.find(([re]) => re.test(path));
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", route && a.dataset.nav === route[1]));
  main.replaceChildren();
  current = new Page();
  if (!route) {
    main.append(errorBox(new Error(`no dashboard page at ${path}`)));
    return;
  }
  const [re, , draw, title] = route;
  document.title = `${title} · tunesmith`;
  try {
    await draw(main, path.match(re).slice(1), current);
  } catch (err) {
    if (current.alive) main.append(errorBox(err));
  }
}

document.addEventListener("click", (event) => {
  const a = event.target.closest("a[data-link]");
  if (!a || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", render);
setRenderer(render);
document.getElementById("forget-key").addEventListener("click", () => {
  forgetKey();
  render();
});
document.getElementById("forget-key").hidden = !hasKey();
render();

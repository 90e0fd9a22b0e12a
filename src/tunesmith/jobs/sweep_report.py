"""A sweep's HTML report: every trial's validation curve, the table of trials, each
hyperparameter's importance, the best trial and the command that reproduces it. One
self-contained file, written beside sweep.json.

    python -c "import json; from tunesmith.jobs.sweep_report import render_sweep_html; \
print(render_sweep_html(json.load(open('sweeps/NAME/sweep.json'))))" > report.html
"""

from __future__ import annotations

import html
import json
import time
from typing import Any

from tunesmith.evaluate.report import REPORT_CSS, bar_chart, line_chart


def render_sweep_html(results: dict[str, Any]) -> str:
    e = lambda v: html.escape(str(v), quote=True)  # noqa: E731
    parts = [f"<h1>sweep {e(results['name'])}</h1><p class=sub>{e(results['sampler'])} sampler &middot; objective "
             f"{e(results['objective'])} ({e(results['direction'])}) &middot; {len(results['trials'])} trials "
             f"&middot; {time.strftime('%Y-%m-%d %H:%M')}</p>"]
    best = results.get("best")
    if best:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
        parts.append(f"<p class=verdict>best: trial {best['number']}, {e(results['objective'])} "
                     f"{_fmt(best['value'])} ({e(params)})</p><p>model {e(best.get('fine_tuned_model'))}; "
                     f"reproduce: <code>{e(best.get('command', '-'))}</code></p>")
    curves = {f"trial {t['number']} ({t['state']})": [(float(k), v) for k, v in t["curve"].items()]
              for t in results["trials"] if t["curve"]}
    if curves:
        parts.append("<h2>Validation loss by step</h2>" + line_chart(curves, "step", "validation loss"))
    names = sorted({k for t in results["trials"] for k in t["params"]})
    head = ["trial", "state", results["objective"], *names, "job", "model"]
    rows = []
    for t in results["trials"]:
        cells = [t["number"], t["state"], _fmt(t["value"]), *[_fmt(t["params"].get(k)) for k in names],
                 t["job_id"] or "-", t["fine_tuned_model"] or "-"]
        win = " class=win" if best and t["number"] == best["number"] else ""
        rows.append(f"<tr{win}>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    parts.append("<h2>Trials</h2><div class=scroll><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head)
                 + "</tr>" + "".join(rows) + "</table></div>")
    if results.get("importance"):
        parts.append("<h2>Hyperparameter importance</h2><p class=sub>optuna's fANOVA over the completed trials: "
                     "the share of the objective's variance each parameter explains</p>"
                     + bar_chart(list(results["importance"].items()), "importance"))
    payload = json.dumps(results, default=str).replace("</", "<\\/")
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>tunesmith sweep</title>"
            f"<style>{REPORT_CSS}</style></head><body>{''.join(parts)}"
            f'<script type="application/json" id="tunesmith-data">{payload}</script></body></html>\n')


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)

"""One self-contained HTML report for a training run, an evaluation or a comparison.

No CDN, no JavaScript library: the charts are inline SVG drawn here, and the data behind
them is embedded as JSON (`<script type="application/json" id="tunesmith-data">`), so the
file opens offline and a script can read the numbers back.

What it looks for in the folder given (each part optional, at least one needed):
- `metrics.jsonl` (+ `run.json`): a training run -> loss curves;
- `metrics.json` + `predictions.jsonl`, or `eval/`: an evaluation -> metric table,
  confusion matrix, worst examples;
- `compare.json` (+ one folder per strategy), or `compare/`: a comparison table;
- `audit.json` (`tunesmith audit --report RUN`): the data audit's counts and worst findings.

    tunesmith report runs/first
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from tunesmith.errors import UsageError
from tunesmith.evaluate.evaluation import EvalResult, format_score, load_eval
from tunesmith.runs import (
    AUDIT_FILE,
    COMPARE_DIR,
    COMPARE_FILE,
    EVAL_DIR,
    EVAL_METRICS_FILE,
    PREDICTIONS_FILE,
    REPORT_FILE,
    RUN_FILE,
    TRAIN_METRICS_FILE,
    read_run_json,
)

WORST_SHOWN = 20
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd")


# ----------------------------------------------------------------------------- gathering


def gather(folder: Path) -> dict[str, Any]:
    """Everything a report can show from a folder, as plain JSON-able data."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"'{folder}' is not a folder; give a training run, eval or compare folder")
    data: dict[str, Any] = {"folder": str(folder)}
    metrics_jsonl = folder / TRAIN_METRICS_FILE
    if metrics_jsonl.is_file():
        data["training"] = _read_jsonl(metrics_jsonl)
    if (folder / RUN_FILE).is_file():
        data["run"] = read_run_json(folder)
    for cand in (folder, folder / EVAL_DIR):
        if (cand / EVAL_METRICS_FILE).is_file() and (cand / PREDICTIONS_FILE).is_file():
            data["eval"] = _eval_data(load_eval(cand))
            break
    for cand in (folder, folder / COMPARE_DIR):
        if (cand / COMPARE_FILE).is_file():
            data["comparison"] = json.loads((cand / COMPARE_FILE).read_text())
            if "eval" not in data:
                # Show the details of the adapter if there is one, else of the best strategy.
                rows = data["comparison"]["strategies"]
                main = data["comparison"]["main_metric"]
                pick = next((r for r in rows if r["name"] == "fine-tuned"), None)
                pick = pick or max(rows, key=lambda r: r["scores"][main])
                sub = cand / pick["folder"]
                if (sub / EVAL_METRICS_FILE).is_file():
                    data["eval"] = _eval_data(load_eval(sub))
                    data["eval"]["strategy"] = pick["name"]
            break
    if (folder / AUDIT_FILE).is_file():
        data["audit"] = json.loads((folder / AUDIT_FILE).read_text())
    if len(data) == 1:
        raise UsageError(
            f"'{folder}' holds nothing to report: no {TRAIN_METRICS_FILE} (training run), "
            f"{EVAL_METRICS_FILE} + {PREDICTIONS_FILE} (eval), {COMPARE_FILE} (compare) or {AUDIT_FILE} (audit)"
        )
    return data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run
    return rows


def worst_examples(predictions: Sequence[dict[str, Any]], n: int = WORST_SHOWN) -> list[dict[str, Any]]:
    """Wrong first, then lowest score, then highest loss on the reference answer."""
    def key(row: dict[str, Any]) -> tuple:
        loss = row.get("loss")
        return (bool(row.get("correct")), row.get("score") or 0.0, -(loss if loss is not None else 0.0))

    return sorted(predictions, key=key)[:n]


def _eval_data(result: EvalResult) -> dict[str, Any]:
    return {"metrics": result.metrics, "worst": worst_examples(result.predictions)}


# ----------------------------------------------------------------------------- writing


def build_report(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write the report for `folder` (to folder/report.html by default); return its path."""
    folder = Path(folder)
    data = gather(folder)
    path = Path(out) if out is not None else folder / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(data), encoding="utf-8")
    return path


def render_html(data: dict[str, Any]) -> str:
    parts = [f"<h1>tunesmith report</h1><p class=sub>{_e(data['folder'])} &middot; {time.strftime('%Y-%m-%d %H:%M')}</p>"]
    if "audit" in data:
        parts.append(_audit_section(data["audit"]))
    if "training" in data:
        parts.append(_training_section(data["training"], data.get("run")))
    if "eval" in data:
        parts.append(_metrics_section(data["eval"]))
    if "comparison" in data:
        parts.append(_comparison_section(data["comparison"]))
    if "eval" in data and data["eval"]["metrics"].get("confusion"):
        parts.append(_confusion_section(data["eval"]["metrics"]["confusion"]))
    if "eval" in data:
        parts.append(_worst_section(data["eval"]["worst"]))
    payload = json.dumps(data, ensure_ascii=False, default=str).replace("</", "<\\/")
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>tunesmith report</title>"
        f"<style>{REPORT_CSS}</style></head><body>{''.join(parts)}"
        f'<script type="application/json" id="tunesmith-data">{payload}</script></body></html>\n'
    )


REPORT_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{margin-bottom:0}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-top:4px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.win td{background:#eef7ee;font-weight:600}.ok{color:#2a7d2a}.bad{color:#b02a2a}
.verdict{font-size:16px;font-weight:600;margin:12px 0}svg text{font:11px system-ui,sans-serif}
pre{white-space:pre-wrap;margin:0;max-width:420px}.scroll{overflow-x:auto}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _training_section(rows: list[dict[str, Any]], run: dict[str, Any] | None) -> str:
    series = {}
    for key, label in (("train_loss", "train loss"), ("valid_loss", "validation loss")):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
        if pts:
            series[label] = pts
    out = ["<h2>Training</h2>"]
    if series:
        out.append(line_chart(series, x_label="step", y_label="loss"))
    else:
        out.append("<p>metrics.jsonl holds no loss values yet.</p>")
    rewards = {}  # a reinforcement run: the grader's rewards (docs/rft.md)
    for key, label in (("reward_mean", "training reward"), ("valid_reward", "held-out reward"),
                       ("zero_variance_groups", "zero-variance groups")):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
        if pts:
            rewards[label] = pts
    if rewards:
        out.append(line_chart(rewards, x_label="step", y_label="reward"))
    last = rows[-1] if rows else {}
    facts = {k: last[k] for k in ("step", "epoch", "train_loss", "valid_loss", "token_accuracy", "reward_mean",
                                  "valid_reward", "tokens_per_s", "elapsed") if k in last}
    if isinstance(run, dict):
        cfg = run.get("config", run)
        if isinstance(cfg, dict):
            facts.update({f"config.{k}": v for k, v in cfg.items() if isinstance(v, (str, int, float, bool))})
    if facts:
        out.append(_table(["", "value"], [[k, _fmt(v)] for k, v in facts.items()]))
    return "".join(out)


AUDIT_SHOWN = 5


def _audit_section(audit: dict[str, Any]) -> str:
    """The data audit: one row per check with its count, then its first findings."""
    files = ", ".join(f"{role} {_e(f['path'])} ({f['examples']:,} examples)" for role, f in audit["files"].items())
    verdict = ("<span class=ok>no leakage</span>" if audit["ok"]
               else f"<span class=bad>{audit['counts'].get('leakage', 0)} training rows leak evaluation rows</span>")
    out = [f"<h2 id=audit>Data audit</h2><p>{files}</p><p class=verdict>{verdict}</p>"]
    out.append(_table(["check", "findings"], [[c.replace("_", " "), n] for c, n in audit["counts"].items()]))
    by_check: dict[str, list[dict[str, Any]]] = {}
    for f in audit["findings"]:
        by_check.setdefault(f["check"], []).append(f)
    rows = []
    for check, found in by_check.items():
        for f in sorted(found, key=lambda f: -(f.get("confidence") or f.get("similarity") or 0))[:AUDIT_SHOWN]:
            where = f"{f['file']}:{f['line']}" + (f" / {f['other_file']}:{f['other_line']}" if f.get("other_line") else "")
            rows.append([check.replace("_", " "), where, f["message"]])
    if rows:
        out.append(f"<p>First {AUDIT_SHOWN} findings of each check (all of them in audit.json):</p>")
        out.append(_table(["check", "where", "finding"], rows))
    return "".join(out)


def _metrics_section(ev: dict[str, Any]) -> str:
    m = ev["metrics"]
    who = _e(m.get("model", "")) + (f" + {_e(m['adapter'])}" if m.get("adapter") else "")
    if ev.get("strategy"):
        who += f" ({_e(ev['strategy'])})"
    rows = [[name, format_score(name, v)] for name, v in m.get("scores", {}).items()]
    rows += [
        ["loss (reference answers)", format_score("loss", m.get("loss"))],
        ["perplexity", format_score("perplexity", m.get("perplexity"))],
        ["latency per example (batched)", f"{1000 * m.get('latency_s_per_example', 0):.0f} ms"],
        ["prompt tokens per example", f"{m.get('prompt_tokens_per_example', 0):.1f}"],
        ["completion tokens per example", f"{m.get('completion_tokens_per_example', 0):.1f}"],
        ["examples", str(m.get("n_examples", ""))],
    ]
    out = f"<h2>Metrics</h2><p>{who} on {_e(m.get('data', ''))}, metric <b>{_e(m.get('metric'))}</b></p>"
    out += _table(["metric", "value"], rows, raw=False)
    if m.get("invalid_labels"):
        out += "<p>Outputs outside the label set: " + ", ".join(
            f"<code>{_e(k) if k else '(empty)'}</code> &times;{v}" for k, v in list(m["invalid_labels"].items())[:10]
        ) + "</p>"
    return out


def _comparison_section(c: dict[str, Any]) -> str:
    metric = c["main_metric"]
    best = max(s["scores"][metric] for s in c["strategies"])
    head = ["strategy", metric, "prompt tokens/request", "latency/request",
            f"cost of 1M requests (${c['price_per_million']:g}/1M tokens)"]
    body = []
    for s in c["strategies"]:
        cls = " class=win" if s["scores"][metric] == best else ""
        body.append(
            f"<tr{cls}><td>{_e(s['name'])}</td><td class=num>{format_score(metric, s['scores'][metric])}</td>"
            f"<td class=num>{s['prompt_tokens_per_request']:.0f}</td>"
            f"<td class=num>{1000 * s['latency_s_per_request']:.0f} ms</td>"
            f"<td class=num>${s['cost_per_million_requests']:,.2f}</td></tr>"
        )
    table = "<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>" + "".join(body) + "</table>"
    bars = bar_chart([(s["name"], s["scores"][metric]) for s in c["strategies"]], metric)
    return (
        f"<h2>Comparison</h2><p>{c['n_examples']} test examples from {_e(c['test'])}, "
        f"{c['shots']} shots from {_e(c['train'])}.</p>{table}{bars}<p class=verdict>{_e(c['verdict'])}</p>"
    )


def _worst_section(worst: list[dict[str, Any]]) -> str:
    rows = []
    for r in worst:
        mark = "<span class=ok>yes</span>" if r.get("correct") else "<span class=bad>no</span>"
        loss = f"{r['loss']:.3f}" if isinstance(r.get("loss"), (int, float)) else "-"
        rows.append(
            f"<tr><td>{_e(r.get('line', ''))}</td><td><pre>{_e(r.get('input', ''))}</pre></td>"
            f"<td><pre>{_e(r.get('reference', ''))}</pre></td><td><pre>{_e(r.get('prediction', ''))}</pre></td>"
            f"<td>{mark}</td><td class=num>{loss}</td></tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("line", "input", "reference", "prediction", "correct", "loss"))
    return f"<h2>The {len(worst)} worst examples</h2><table><tr>{head}</tr>{''.join(rows)}</table>"


def _confusion_section(conf: dict[str, Any]) -> str:
    return "<h2>Confusion matrix</h2><p>Rows: reference label; columns: prediction " \
        "(the last column counts outputs outside the label set). Hover a cell for its counts.</p>" \
        f"<div class=scroll>{heatmap(conf['labels'], conf['columns'], conf['matrix'])}</div>"


def _table(head: list[str], rows: list[list[Any]], raw: bool = False) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + f"</tr>{cells}</table>"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------- charts


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def line_chart(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str,
               width: int = 720, height: int = 300) -> str:
    """Lines with axes, ticks and a legend, as an inline SVG."""
    left, right, top, bottom = 56, 150, 16, 40
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.05 if max(ys) > 0 else 1.0
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    out = [f'<svg class=chart width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in _ticks(x0, x1):
        out.append(f'<text x="{px(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{t:g}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{_e(x_label)}</text>')
    out.append(f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})" text-anchor="middle">{_e(y_label)}</text>')
    for k, (name, pts) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline class="series" data-name="{_e(name)}" fill="none" stroke="{color}" stroke-width="1.8" points="{path}"/>')
        if len(pts) <= 40:
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"><title>{_e(name)} step {x:g}: {y:.4f}</title></circle>' for x, y in pts]
        ly = top + 14 + 18 * k
        out.append(f'<line x1="{left + pw + 12}" x2="{left + pw + 32}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{left + pw + 38}" y="{ly}">{_e(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def bar_chart(bars: list[tuple[str, float]], metric: str, width: int = 520) -> str:
    """Horizontal bars of a 0-1 metric, one per strategy."""
    left, bar_h, gap = 150, 22, 8
    height = len(bars) * (bar_h + gap) + 10
    pw = width - left - 60
    hi = max([1.0] + [v for _, v in bars])
    out = [f'<svg class=bars width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    for i, (name, v) in enumerate(bars):
        y = 5 + i * (bar_h + gap)
        w = max(0.0, v) / hi * pw
        out.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{_e(name)}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{COLORS[i % len(COLORS)]}"><title>{_e(name)}: {v:.4f}</title></rect>')
        out.append(f'<text x="{left + w + 6:.1f}" y="{y + 15}">{format_score(metric, v)}</text>')
    out.append("</svg>")
    return "".join(out)


def heatmap(rows: list[str], cols: list[str], matrix: list[list[int]], cell: int = 0) -> str:
    """A confusion matrix: row-normalised shading, counts in the tooltips."""
    n_r, n_c = len(rows), len(cols)
    cell = cell or (22 if n_c <= 20 else 12 if n_c <= 50 else 9)
    char_w = 0.62 * max(7, min(11, cell - 2))
    left = 10 + char_w * max((len(x) for x in rows), default=4)
    # Column names are written at 60 degrees: they need height and stick out to the right.
    col_len = char_w * max((len(x) for x in cols), default=4)
    top = 10 + 0.87 * col_len
    width, height = int(left + n_c * cell + 0.5 * col_len + 10), int(top + n_r * cell + 10)
    fs = max(7, min(11, cell - 2))
    out = [f'<svg class=heatmap width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    out.append(f'<rect x="{left}" y="{top}" width="{n_c * cell}" height="{n_r * cell}" fill="#fafafa" stroke="#ccc"/>')
    for i, name in enumerate(rows):
        out.append(f'<text x="{left - 4}" y="{top + i * cell + cell - 2}" text-anchor="end" font-size="{fs}" style="font-size:{fs}px">{_e(name)}</text>')
    for j, name in enumerate(cols):
        x = left + j * cell + cell - 2
        out.append(f'<text x="{x}" y="{top - 4}" transform="rotate(-60 {x} {top - 4})" font-size="{fs}" style="font-size:{fs}px">{_e(name)}</text>')
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        for j, count in enumerate(row):
            if not count:
                continue
            share = count / total
            color = f"rgba(33,102,172,{0.15 + 0.85 * share:.3f})" if (j < n_r and rows[i] == cols[j]) else f"rgba(214,39,40,{0.15 + 0.85 * share:.3f})"
            out.append(
                f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" fill="{color}">'
                f"<title>{_e(rows[i])} -> {_e(cols[j])}: {count} of {total}</title></rect>"
            )
            if cell >= 18:
                out.append(f'<text x="{left + j * cell + cell / 2}" y="{top + i * cell + cell / 2 + 4}" text-anchor="middle" font-size="10">{count}</text>')
    out.append("</svg>")
    return "".join(out)

// A small SVG line chart: numeric x (step) against y, several series, nice ticks, legend,
// hover read-out. Hand-written instead of a vendored library: a loss curve needs ~150
// lines, and the page then loads nothing it did not ship (see docs/dashboard.md).

const SVG = "http://www.w3.org/2000/svg";
const W = 640, H = 260;
const PAD = { left: 56, right: 16, top: 14, bottom: 38 };

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (parent) parent.append(node);
  return node;
}

/** About `count` round tick values covering [lo, hi] (1, 2 or 5 times a power of ten). */
export function niceTicks(lo, hi, count = 5, minStep = 0) {
  if (!(hi > lo)) {
    const pad = Math.abs(lo) * 0.1 || 1;
    lo -= pad;
    hi += pad;
  }
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = Math.max(minStep, [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw));
  const ticks = [];
  for (let v = Math.floor(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toPrecision(12));
  if (ticks[ticks.length - 1] < hi) ticks.push(+(ticks[ticks.length - 1] + step).toPrecision(12));
  return ticks;
}

function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1000) return v.toLocaleString("en-US", { maximumFractionDigits: 0 });
  if (a >= 10) return v.toFixed(0);
  if (a >= 1) return v.toFixed(2).replace(/\.?0+$/, "");
  return v.toPrecision(2);
}

/**
 * Draw into `container` (replacing what is there).
 * series: [{name, color, points: [[x, y], ...]}]; empty series are left out.
 * yDomain: [lo, hi] the y axis always covers (accuracy: [0, 1]).
 */
export function lineChart(container, { series, xLabel = "step", yLabel = "", yDomain = null, empty = "No data yet" }) {
  container.replaceChildren();
  const shown = series.filter((s) => s.points.length);
  if (!shown.length) {
    const p = document.createElement("p");
    p.className = "chart-empty";
    p.textContent = empty;
    container.append(p);
    return null;
  }
  const xs = shown.flatMap((s) => s.points.map((p) => p[0]));
  const ys = shown.flatMap((s) => s.points.map((p) => p[1]));
  const xTicks = niceTicks(Math.min(...xs), Math.max(...xs), 6, 1); // steps are whole numbers
  const yTicks = yDomain ? niceTicks(Math.min(yDomain[0], ...ys), Math.max(yDomain[1], ...ys), 5)
    : niceTicks(Math.min(...ys), Math.max(...ys), 5);
  const [x0, x1] = [xTicks[0], xTicks[xTicks.length - 1]];
  const [y0, y1] = [yTicks[0], yTicks[yTicks.length - 1]];
  const px = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const py = (y) => H - PAD.bottom - ((y - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);

  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": yLabel });
  const grid = el("g", { class: "grid" }, svg);
  for (const t of yTicks) {
    el("line", { x1: PAD.left, x2: W - PAD.right, y1: py(t), y2: py(t) }, grid);
    el("text", { x: PAD.left - 8, y: py(t) + 4, "text-anchor": "end", class: "tick" }, grid).textContent = fmt(t);
  }
  for (const t of xTicks) {
    el("line", { x1: px(t), x2: px(t), y1: PAD.top, y2: H - PAD.bottom, class: "vgrid" }, grid);
    el("text", { x: px(t), y: H - PAD.bottom + 16, "text-anchor": "middle", class: "tick" }, grid).textContent = fmt(t);
  }
  el("text", { x: (PAD.left + W - PAD.right) / 2, y: H - 4, "text-anchor": "middle", class: "axis-label" }, svg)
    .textContent = xLabel;
  el("text", { x: 14, y: (PAD.top + H - PAD.bottom) / 2, "text-anchor": "middle", class: "axis-label",
    transform: `rotate(-90 14 ${(PAD.top + H - PAD.bottom) / 2})` }, svg).textContent = yLabel;

  for (const s of shown) {
    const pts = [...s.points].sort((a, b) => a[0] - b[0]);
    const d = pts.map((p, i) => `${i ? "L" : "M"}${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(" ");
    el("path", { d, class: "series", stroke: s.color, "data-series": s.name }, svg);
    // Markers where points are sparse (validation every epoch), so a lone point still shows.
    if (pts.length <= 40) {
      for (const p of pts) el("circle", { cx: px(p[0]), cy: py(p[1]), r: 3, fill: s.color, class: "marker" }, svg);
    }
  }

  // Hover read-out: the nearest step's values of every series.
  const cursor = el("line", { class: "cursor", y1: PAD.top, y2: H - PAD.bottom, visibility: "hidden" }, svg);
  const readout = document.createElement("div");
  readout.className = "chart-readout";
  readout.hidden = true;
  svg.addEventListener("mousemove", (ev) => {
    const box = svg.getBoundingClientRect();
    const x = x0 + (((ev.clientX - box.left) / box.width) * W - PAD.left) / (W - PAD.left - PAD.right) * (x1 - x0);
    const near = xs.reduce((best, v) => (Math.abs(v - x) < Math.abs(best - x) ? v : best), xs[0]);
    cursor.setAttribute("x1", px(near));
    cursor.setAttribute("x2", px(near));
    cursor.setAttribute("visibility", "visible");
    const parts = shown.map((s) => {
      const hit = s.points.find((p) => p[0] === near);
      return hit ? `${s.name} ${hit[1].toFixed(4)}` : null;
    }).filter(Boolean);
    readout.textContent = `${xLabel} ${near}: ${parts.join(" · ")}`;
    readout.hidden = false;
  });
  svg.addEventListener("mouseleave", () => {
    cursor.setAttribute("visibility", "hidden");
    readout.hidden = true;
  });

  const legend = document.createElement("div");
  legend.className = "legend";
  for (const s of shown) {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.className = "swatch";
    swatch.style.background = s.color; // CSSOM, allowed by the page's CSP (a style attribute is not)
    item.append(swatch, document.createTextNode(`${s.name} (${s.points.length})`));
    legend.append(item);
  }
  container.append(legend, svg, readout);
  return svg;
}

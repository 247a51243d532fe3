// The report's interactive spectra, drawn with the vendored uPlot from the JSON that the page
// carries in its #report-data element (built by chart_data in deepscope/service/report.py):
// {layers: [{name, kind, rank, condition_number, spectrum: {count, max, min, profile: {indices,
// values}}}]}. (No markup in these comments: the file is also inlined in saved reports.)
//   chart 1: every layer's σᵢ/σ₁ against the relative index i/n (log y), one series per layer;
//   chart 2: the condition number σ₁/σₙ by layer depth (log y).
// On success #spectra-charts gets data-charts-ready="N" (the charts drawn); on failure
// data-charts-error and a console error, so that a person or a test can tell.
"use strict";
(function () {
  const root = document.getElementById("spectra-charts");
  const holder = document.getElementById("report-data");
  if (!root || !holder) return;

  const { HEIGHT, AXIS_STROKE, GRID, TICKS, color, fmt, pow10, logSplits } =
    window.deepscopeCharts;
  const SUPERSCRIPT = {
    "-": "⁻", "0": "⁰", "1": "¹", "2": "²", "3": "³", "4": "⁴",
    "5": "⁵", "6": "⁶", "7": "⁷", "8": "⁸", "9": "⁹",
  };

  function pow10Label(k) {
    if (k >= -3 && k <= 3) return String(pow10(k)); // 0.001 … 1000 read better as numbers
    return "10" + String(k).split("").map((c) => SUPERSCRIPT[c]).join("");
  }

  // Log scales span whole decades, so that every axis has labelled powers of ten at both ends.
  function logRange(u, min, max) {
    if (min == null || max == null || !(min > 0) || !(max > 0)) return [0.1, 10];
    let lo = Math.floor(Math.log10(min) + 1e-9);
    const hi = Math.ceil(Math.log10(max) - 1e-9);
    if (hi <= lo) lo = hi - 1;
    return [pow10(lo), pow10(hi)];
  }

  function logValues(u, splits) {
    return splits.map((v) => {
      if (v == null) return "";
      const k = Math.round(Math.log10(v));
      return Math.abs(Math.log10(v) - k) < 1e-9 ? pow10Label(k) : "";
    });
  }

  function logAxis(label) {
    return {
      label,
      labelSize: 22,
      size: 58,
      stroke: AXIS_STROKE,
      grid: GRID,
      ticks: TICKS,
      splits: logSplits,
      // uPlot's own filter thins log labels by its spacing rule; logValues already labels
      // the decades only.
      filter: (u, splits) => splits,
      values: logValues,
    };
  }

  function width() {
    return window.deepscopeCharts.width(root);
  }

  function spectraChart(el, layers) {
    // One [x, y] table per layer (x = (index + 1) / count); uPlot.join aligns them on the union
    // of the x values, leaving undefined where a layer has no point (hover skips those).
    // The unknown middle of each partial spectrum (complete: false, its largest and smallest
    // values only): [x after the last largest, x of the first smallest], per layer.
    const unknown = layers.map(() => null);
    const tables = layers.map((layer, j) => {
      const s = layer.spectrum;
      const top = s.max > 0 ? s.max : s.profile.values[0];
      const xs = s.profile.indices.map((i) => (i + 1) / s.count);
      // A zero σ has no place on a log axis: it is a gap (the rank column says how many).
      const ys = s.profile.values.map((v) => (v != null && v > 0 && top > 0 ? v / top : null));
      if (s.complete === false) {
        const k = s.profile.indices.findIndex((i, n) => n > 0 && i > s.profile.indices[n - 1] + 1);
        if (k > 0) {
          unknown[j] = [xs[k - 1], xs[k]];
          // One null inside, so that the line breaks even where no other layer has a point.
          xs.splice(k, 0, (xs[k - 1] + xs[k]) / 2);
          ys.splice(k, 0, null);
        }
      }
      return [xs, ys];
    });
    const data = uPlot.join(tables);
    // uPlot breaks a line only at null, and only between the null's neighbours in the joined x
    // values: every x of another layer inside the unknown middle is made null for this one.
    unknown.forEach((range, j) => {
      if (range == null) return;
      data[0].forEach((x, idx) => {
        if (x > range[0] && x < range[1]) data[j + 1][idx] = null;
      });
    });
    const notComputed = (j, x) => unknown[j] != null && x > unknown[j][0] && x < unknown[j][1];
    const series = [
      { label: "i/n", value: (u, v) => (v == null ? "—" : v.toFixed(4)) },
      ...layers.map((layer, j) => {
        const s = layer.spectrum;
        const top = s.max > 0 ? s.max : s.profile.values[0];
        return {
          label: layer.name,
          stroke: color(j),
          width: 1.6,
          points: { show: s.complete === false },
          value: (u, v, seriesIdx, idx) => {
            if (idx == null) return "—";
            if (v == null) return notComputed(j, u.data[0][idx]) ? "not computed" : "0";
            const i = Math.round(u.data[0][idx] * s.count);
            return `${fmt(v)} (σ${i} = ${fmt(v * top)})`;
          },
        };
      }),
    ];
    const opts = {
      title: "Singular values σᵢ/σ₁ against the relative index i/n",
      width: width(),
      height: HEIGHT,
      scales: { x: { time: false }, y: { distr: 3, log: 10, range: logRange } },
      axes: [
        {
          label: "relative index i/n",
          labelSize: 22,
          size: 34,
          stroke: AXIS_STROKE,
          grid: GRID,
          ticks: TICKS,
        },
        logAxis("σᵢ / σ₁ (log scale)"),
      ],
      series,
      // The series nearest the pointer stands out; with dozens of layers that is the one read.
      focus: { alpha: 0.35 },
      cursor: { focus: { prox: 24 } },
      legend: { live: true },
    };
    return new uPlot(opts, data, el);
  }

  function conditionChart(el, layers) {
    const xs = layers.map((_, i) => i + 1);
    const ys = layers.map((l) => (l.condition_number > 0 ? l.condition_number : null));
    const opts = {
      title: "Condition number σ₁/σₙ by layer depth",
      width: width(),
      height: HEIGHT,
      scales: {
        // Half a layer of margin, so that the first and last points are not on the frame.
        x: { time: false, range: (u, min, max) => [min - 0.5, max + 0.5] },
        y: { distr: 3, log: 10, range: logRange },
      },
      axes: [
        {
          label: "layer depth (hover for the name)",
          labelSize: 22,
          size: 34,
          stroke: AXIS_STROKE,
          grid: GRID,
          ticks: TICKS,
          // Whole layers only, at most ~20 labels.
          splits: (u, axisIdx, min, max) => {
            const first = Math.max(1, Math.ceil(min));
            const last = Math.min(layers.length, Math.floor(max));
            const step = Math.max(1, Math.ceil((last - first + 1) / 20));
            const out = [];
            for (let d = first; d <= last; d += step) out.push(d);
            return out;
          },
          values: (u, splits) => splits.map((d) => (d == null ? "" : String(d))),
        },
        logAxis("σ₁/σₙ (log scale)"),
      ],
      series: [
        {
          label: "layer",
          value: (u, v) => {
            const layer = v == null ? null : layers[Math.round(v) - 1];
            return layer ? `${Math.round(v)}: ${layer.name}` : "—";
          },
        },
        {
          label: "condition number",
          stroke: "#2456c7",
          width: 1.6,
          points: { show: true, size: 7, fill: "#2456c7" },
          value: (u, v, seriesIdx, idx) => (idx == null ? "—" : v == null ? "∞ (singular)" : fmt(v)),
        },
      ],
      legend: { live: true },
    };
    return new uPlot(opts, [xs, ys], el);
  }

  function draw() {
    if (typeof uPlot !== "function") throw new Error("uPlot did not load");
    const data = JSON.parse(holder.textContent);
    const layers = (data && Array.isArray(data.layers) ? data.layers : []).filter(
      (l) => l && l.spectrum && l.spectrum.profile && l.spectrum.count > 0,
    );
    if (layers.length === 0) throw new Error("no spectra in the report's data");
    const charts = [spectraChart(document.getElementById("chart-spectra"), layers)];

    const unbounded = layers.filter((l) => !(l.condition_number > 0)).map((l) => l.name);
    const conditionEl = document.getElementById("chart-condition");
    if (unbounded.length < layers.length) {
      charts.push(conditionChart(conditionEl, layers));
    } else {
      conditionEl.hidden = true;
    }
    if (unbounded.length > 0) {
      const note = document.getElementById("chart-unbounded");
      note.textContent =
        `Condition number ∞ (a singular matrix, σₙ = 0; not on the log axis): ` +
        unbounded.join(", ");
      note.hidden = false;
    }

    // Show or hide every layer of the first chart at once (one by one: its legend).
    const tools = root.querySelector(".chart-tools");
    for (const button of tools.querySelectorAll("button[data-layers-show]")) {
      button.addEventListener("click", () => {
        charts[0].setSeries(null, { show: button.dataset.layersShow === "all" });
      });
    }
    tools.hidden = false;

    window.deepscopeCharts.resizeWith(root, charts, HEIGHT);
    return charts.length;
  }

  window.deepscopeCharts.drawInto(root, draw, "the charts");
})();

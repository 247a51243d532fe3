// A report compared with a baseline job: both jobs' spectra and their ratio, drawn with the
// vendored uPlot from the JSON in the page's #compare-data element (compare_chart_data in
// deepscope/service/report.py): {baseline_id, layers: [{name, job, baseline, condition_number,
// baseline_condition_number, difference: {x, ratio}}]}, job and baseline being spectra as in
// report.js. (No markup in these comments: the file is also inlined in saved reports.)
//   chart 1: every layer's σᵢ against the relative index i/n, this job solid, the baseline
//   dashed in the same colour (log y);
//   chart 2: σᵢ / σᵢ of the baseline − 1 in percent against i/n (0 is unchanged).
// On success #compare-charts gets data-charts-ready="2"; on failure data-charts-error.
"use strict";
(function () {
  const root = document.getElementById("compare-charts");
  const holder = document.getElementById("compare-data");
  if (!root || !holder) return;

  const { HEIGHT, AXIS_STROKE, GRID, TICKS, color, fmt, pow10, logSplits } =
    window.deepscopeCharts;

  // Whole decades when the values span more than two; else the values with a margin, so that
  // the spectra of two versions of a model (often close) do not hug one edge.
  function logRange(u, min, max) {
    if (min == null || max == null || !(min > 0) || !(max > 0)) return [0.1, 10];
    if (Math.log10(max) - Math.log10(min) <= 2) return [min / 1.25, max * 1.25];
    let lo = Math.floor(Math.log10(min) + 1e-9);
    const hi = Math.ceil(Math.log10(max) - 1e-9);
    if (hi <= lo) lo = hi - 1;
    return [pow10(lo), pow10(hi)];
  }

  // The change in percent, symmetric around 0, at least ±5 %.
  function changeRange(u, min, max) {
    const a = Math.max(Math.abs(min || 0), Math.abs(max || 0), 5) * 1.15;
    return [-a, a];
  }

  function logLabel(v) {
    const k = Math.log10(v);
    if (Math.abs(k - Math.round(k)) < 1e-9) {
      const r = Math.round(k);
      return r >= -3 && r <= 3 ? String(pow10(r)) : `1e${r}`;
    }
    return fmt(v);
  }

  const X_AXIS = {
    label: "relative index i/n",
    labelSize: 22,
    size: 34,
    stroke: AXIS_STROKE,
    grid: GRID,
    ticks: TICKS,
  };

  // Ticks: charts.js's logSplits; labelled 1, 2 and 5 × 10ᵏ (every line on a narrow range).
  function logValues(u, splits) {
    const all = splits.length <= 9; // a narrow range: every grid line gets its number
    return splits.map((v) => {
      if (v != null && all) return logLabel(v);
      if (v == null) return "";
      const lead = Number((v / pow10(Math.floor(Math.log10(v) + 1e-9))).toPrecision(3));
      return lead === 1 || lead === 2 || lead === 5 ? logLabel(v) : "";
    });
  }

  function width() {
    return window.deepscopeCharts.width(root);
  }

  function xy(spectrum) {
    const xs = spectrum.profile.indices.map((i) => (i + 1) / spectrum.count);
    const ys = spectrum.profile.values.map((v) => (v != null && v > 0 ? v : null));
    return [xs, ys];
  }

  function spectraChart(el, layers) {
    const tables = [];
    const series = [{ label: "i/n", value: (u, v) => (v == null ? "—" : v.toFixed(4)) }];
    layers.forEach((layer, j) => {
      tables.push(xy(layer.job), xy(layer.baseline));
      const common = { stroke: color(j), points: { show: false }, value: (u, v) => fmt(v) };
      series.push({ ...common, label: `${layer.name}`, width: 1.8 });
      series.push({ ...common, label: `${layer.name} (baseline)`, width: 1.4, dash: [6, 4] });
    });
    const opts = {
      title: "Singular values σᵢ: this job (solid) and the baseline (dashed)",
      width: width(),
      height: HEIGHT,
      scales: { x: { time: false }, y: { distr: 3, log: 10, range: logRange } },
      axes: [
        X_AXIS,
        {
          label: "σᵢ (log scale)",
          labelSize: 22,
          size: 58,
          stroke: AXIS_STROKE,
          grid: GRID,
          ticks: TICKS,
          splits: logSplits,
          filter: (u, splits) => splits,
          values: logValues,
        },
      ],
      series,
      focus: { alpha: 0.35 },
      cursor: { focus: { prox: 24 } },
      legend: { live: true },
    };
    return new uPlot(opts, uPlot.join(tables), el);
  }

  function ratioChart(el, layers) {
    // The ratio as a change in percent: 0 is unchanged, on a linear axis (the versions of a
    // model compared are usually within a few percent of each other).
    const tables = layers.map((layer) => [
      layer.difference.x,
      layer.difference.ratio.map((v) => (v != null && v > 0 ? (v - 1) * 100 : null)),
    ]);
    const series = [
      { label: "i/n", value: (u, v) => (v == null ? "—" : v.toFixed(4)) },
      ...layers.map((layer, j) => ({
        label: layer.name,
        stroke: color(j),
        width: 1.8,
        points: { show: false },
        value: (u, v) => (v == null ? "—" : `${v >= 0 ? "+" : ""}${fmt(v)} %`),
      })),
    ];
    const opts = {
      title: "Difference: σᵢ of this job against σᵢ of the baseline (0 = unchanged)",
      width: width(),
      height: HEIGHT,
      scales: { x: { time: false }, y: { range: changeRange } },
      axes: [
        X_AXIS,
        {
          label: "σᵢ / σᵢ baseline − 1 (%)",
          labelSize: 22,
          size: 58,
          stroke: AXIS_STROKE,
          grid: GRID,
          ticks: TICKS,
          values: (u, splits) => splits.map((v) => (v == null ? "" : `${v > 0 ? "+" : ""}${fmt(v)}`)),
        },
      ],
      series,
      focus: { alpha: 0.35 },
      cursor: { focus: { prox: 24 } },
      legend: { live: true },
    };
    return new uPlot(opts, uPlot.join(tables), el);
  }

  function draw() {
    if (typeof uPlot !== "function") throw new Error("uPlot did not load");
    const data = JSON.parse(holder.textContent);
    const layers = (data && Array.isArray(data.layers) ? data.layers : []).filter(
      (l) => l && l.job && l.baseline && l.difference && l.job.count > 0 && l.baseline.count > 0,
    );
    if (layers.length === 0) throw new Error("no layer has both spectra");
    const charts = [
      spectraChart(document.getElementById("chart-compare-spectra"), layers),
      ratioChart(document.getElementById("chart-compare-ratio"), layers),
    ];
    window.deepscopeCharts.resizeWith(root, charts, HEIGHT);
    return charts.length;
  }

  window.deepscopeCharts.drawInto(root, draw, "the comparison charts");
})();

// What the report's charts share (report.js, compare.js): the colours, the axes' look, number
// formatting and the ticks of log axes. Loaded after uPlot and before the charts that use it.
// (No markup in these comments: the file is also inlined in saved reports.)
"use strict";
window.deepscopeCharts = (function () {
  // matplotlib's colours first: the same layer looks the same here and in the PNG plots.
  const PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
  ];

  function color(i) {
    // Past the palette, hues a golden angle apart stay distinguishable for many layers.
    return i < PALETTE.length ? PALETTE[i] : `hsl(${Math.round((i * 137.508) % 360)}, 60%, 42%)`;
  }

  // Four significant digits, as the tables of the page.
  function fmt(v) {
    if (v == null || !Number.isFinite(v)) return "—";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(3);
    return String(Number(v.toPrecision(4)));
  }

  function pow10(k) {
    // "1e-5" parses exactly, where 10 ** -5 is 0.000009999999999999999.
    return Number(`1e${k}`);
  }

  // Ticks at 1…9 × 10ᵏ over a few decades (a readable grid), else at every stride-th decade
  // (at most ~8 labels, so they never overlap on a 340 px chart).
  function logSplits(u, axisIdx, min, max) {
    const lo = Math.ceil(Math.log10(min) - 1e-9);
    const hi = Math.floor(Math.log10(max) + 1e-9);
    const splits = [];
    if (hi - lo <= 3) {
      for (let k = lo - 1; k <= hi; k++) {
        for (let m = 1; m < 10; m++) {
          const v = m * pow10(k);
          if (v >= min * (1 - 1e-9) && v <= max * (1 + 1e-9)) splits.push(v);
        }
      }
    } else {
      const stride = Math.ceil((hi - lo) / 8);
      for (let k = hi; k >= lo; k -= stride) splits.unshift(pow10(k));
    }
    return splits;
  }

  // A chart as wide as its container allows, between 320 and 1100 px.
  function width(el) {
    return Math.max(320, Math.min(el.clientWidth, 1100));
  }

  // Redraw ``charts`` at their container's width when the window is resized (once a frame).
  function resizeWith(el, charts, height) {
    let pending = false;
    window.addEventListener("resize", () => {
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => {
        pending = false;
        for (const chart of charts) chart.setSize({ width: width(el), height });
      });
    });
  }

  // Run ``draw`` (it returns how many charts it drew) and say the outcome on ``root``:
  // data-charts-ready="N", or data-charts-error and a console error, so that a person or a
  // test can tell.
  function drawInto(root, draw, what) {
    try {
      root.dataset.chartsReady = String(draw());
    } catch (err) {
      root.dataset.chartsError = String((err && err.message) || err);
      console.error(`deepscope report: ${what} could not be drawn:`, err);
    }
  }

  return {
    HEIGHT: 340,
    AXIS_STROKE: "#1d2330",
    GRID: { stroke: "#e3e6ec", width: 1 },
    TICKS: { stroke: "#c3c8d2", width: 1, size: 5 },
    color,
    fmt,
    pow10,
    logSplits,
    width,
    resizeWith,
    drawInto,
  };
})();

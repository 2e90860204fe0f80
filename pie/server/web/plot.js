// A small time-series plot on a <canvas>: the last `windowS` seconds of one series, filled
// under the line, with the scale's top and the time span labelled. Drawn by hand because the
// page ships no chart library and may not reach a CDN.

/** The smallest 1, 2 or 5 times a power of ten that is >= value (a readable scale top). */
export function niceCeil(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

/**
 * Draws `points` ([{t, v}], t in seconds, oldest first) ending at `now`.
 * `max`: a fixed scale top (the pool's size), else the data's rounded up.
 */
export function drawPlot(canvas, points, { now, windowS = 60, max = null, color = "#2563eb" }) {
  // Size the backing store to the element's CSS size times the pixel ratio, so lines are crisp.
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);

  const style = getComputedStyle(canvas);
  const muted = style.getPropertyValue("--plot-muted").trim() || "#888";
  const left = 2;
  const top = 12; // room for the scale label
  const bottom = height - 12; // room for the time labels
  const scaleTop = max ?? niceCeil(Math.max(0, ...points.map((p) => p.v)));
  const x = (t) => left + (width - left) * (1 - (now - t) / windowS);
  const y = (v) => bottom - (bottom - top) * Math.min(v / scaleTop, 1);

  // Grid: the scale's top and the baseline, labelled.
  ctx.strokeStyle = muted;
  ctx.globalAlpha = 0.35;
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(left, top + 0.5);
  ctx.lineTo(width, top + 0.5);
  ctx.moveTo(left, bottom + 0.5);
  ctx.lineTo(width, bottom + 0.5);
  ctx.stroke();
  ctx.globalAlpha = 1;
  ctx.fillStyle = muted;
  ctx.font = "10px system-ui, sans-serif";
  ctx.textBaseline = "bottom";
  ctx.textAlign = "left";
  ctx.fillText(formatScale(scaleTop), left, top - 1);
  ctx.textBaseline = "top";
  ctx.fillText(`-${windowS} s`, left, bottom + 1);
  ctx.textAlign = "right";
  ctx.fillText("now", width - 1, bottom + 1);

  const shown = points.filter((p) => now - p.t <= windowS + 2); // +2 s: the line enters at left
  if (shown.length === 0) return;
  ctx.beginPath();
  shown.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p.v)) : ctx.moveTo(x(p.t), y(p.v))));
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.stroke();
  // Close the path along the baseline and fill it faintly: the area reads at a glance.
  ctx.lineTo(x(shown[shown.length - 1].t), bottom);
  ctx.lineTo(x(shown[0].t), bottom);
  ctx.closePath();
  ctx.fillStyle = color;
  ctx.globalAlpha = 0.15;
  ctx.fill();
  ctx.globalAlpha = 1;
}

function formatScale(value) {
  return value >= 10000 ? `${value / 1000}k` : String(value);
}

// The live view: polls GET /api/stats about once a second (the server keeps a one-sample-a-second
// history, so the plots are full as soon as the page opens) and redraws the four plots.

import { apiFetch, errorOf } from "./http.js";
import { drawPlot } from "./plot.js";

const POLL_MS = 1000;
const TIMEOUT_MS = 5000; // a poll that takes longer is given up; the next one tries again
const WINDOW_S = 60;

export class LiveView {
  constructor(el, onUnauthorized) {
    this.el = el;
    this.onUnauthorized = onUnauthorized;
    this.stats = null; // the last answer of /api/stats
    window.addEventListener("resize", () => this.draw());
  }

  /** Polls forever; each poll starts after the previous ended, so a slow server is not piled on. */
  async run() {
    for (;;) {
      await this.poll();
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }

  async poll() {
    try {
      const response = await apiFetch("/api/stats", { signal: AbortSignal.timeout(TIMEOUT_MS) });
      if (!response.ok) throw await errorOf(response);
      this.stats = await response.json();
      this.show();
    } catch (error) {
      if (error.status === 401) {
        this.setStatus("unauthorized", "needs a token", error.message);
        this.onUnauthorized();
      } else {
        this.setStatus("unreachable", "unreachable", `stats: ${error.message}`);
      }
    }
  }

  /** `status`: ok | draining | unauthorized | unreachable (the style keys off it). */
  setStatus(status, text, title) {
    this.el.status.textContent = text;
    this.el.status.dataset.status = status;
    this.el.status.title = title || "";
  }

  show() {
    const { now, history } = this.stats;
    const latest = history[history.length - 1] || {};
    this.el.model.textContent = now.model;
    const status = now.draining ? "draining" : "ok";
    this.setStatus(status, status, `pie ${now.version} on ${now.device}`);
    this.el.uptime.textContent = `up ${formatDuration(now.uptime_s)}`;
    this.el.instances.textContent = now.instances;
    this.el.pages.textContent = `${now.pages.used} / ${now.pages.total}`;
    this.el.pagesFree.textContent = `${now.pages.free} free`;
    this.el.batch.textContent = (latest.batch_sequences ?? 0).toFixed(1);
    this.el.queue.textContent = `queue ${now.scheduler.queue_depth}`;
    this.el.tokens.textContent = Math.round(latest.tokens_per_s ?? 0);
    this.draw();
  }

  draw() {
    if (!this.stats) return;
    const { now, history } = this.stats;
    const end = history.length ? history[history.length - 1].t : Date.now() / 1000;
    const series = (key) => history.map((s) => ({ t: s.t, v: s[key] }));
    const plot = (canvas, key, options) =>
      drawPlot(canvas, series(key), { now: end, windowS: WINDOW_S, ...options });
    const css = getComputedStyle(document.documentElement);
    const color = (name) => css.getPropertyValue(name).trim();
    plot(this.el.plotInstances, "instances", { color: color("--c-instances") });
    // The pool's size is the natural top: the plot shows how full it is.
    plot(this.el.plotPages, "pages_used", { max: now.pages.total, color: color("--c-pages") });
    plot(this.el.plotBatch, "batch_sequences", { color: color("--c-batch") });
    plot(this.el.plotTokens, "tokens_per_s", { color: color("--c-tokens") });
  }
}

function formatDuration(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

// The chat playground. The conversation goes to the server's own /v1/chat/completions with
// stream: true, so the page runs the same built-in inferlet as every OpenAI client, and the reply
// is shown as its tokens arrive. Stop aborts the fetch: the server sees the client leave and
// cancels the instance, so its KV pages go back to the pool.

import { ApiError, apiFetch, errorOf, sseData } from "./http.js";

const HISTORY_KEY = "pie.chat.history";
const KEEP_ENTRIES = 200; // what survives a reload; older turns are dropped from storage

export class ChatPlayground {
  /** `el`: the page's elements by role; `onUnauthorized`: called on a 401 (asks for a token). */
  constructor(el, onUnauthorized) {
    this.el = el;
    this.onUnauthorized = onUnauthorized;
    // Entries: {role: "user" | "assistant" | "error", content, meta?, failed?}. Only the user and
    // assistant turns that went through are sent back to the model; errors are shown, not sent.
    this.entries = load();
    this.controller = null; // the AbortController of the reply streaming now
    this.model = null; // the served model's id, asked once from /v1/models
    for (const entry of this.entries) this.render(entry);

    el.temperature.addEventListener("input", () => this.showTemperature());
    this.showTemperature();
    el.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    el.prompt.addEventListener("keydown", (event) => {
      // Enter sends; Shift+Enter (and Enter while an IME composes) is a new line.
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        el.form.requestSubmit();
      }
    });
    el.stop.addEventListener("click", () => this.controller && this.controller.abort());
    el.clear.addEventListener("click", () => this.clear());
  }

  showTemperature() {
    this.el.temperatureValue.value = Number(this.el.temperature.value).toFixed(2);
  }

  /** The request's messages: the conversation so far, without failed turns and errors. */
  messages() {
    return this.entries
      .filter((e) => (e.role === "user" && !e.failed) || (e.role === "assistant" && e.content))
      .map((e) => ({ role: e.role, content: e.content }));
  }

  async modelId() {
    if (this.model) return this.model;
    const response = await apiFetch("/v1/models");
    if (!response.ok) throw await errorOf(response);
    this.model = (await response.json()).data[0].id;
    return this.model;
  }

  /** Sends the prompt and streams the reply into a new bubble until it ends or is stopped. */
  async send() {
    const text = this.el.prompt.value.trim();
    if (!text || this.controller) return;
    this.el.prompt.value = "";
    const user = { role: "user", content: text };
    this.push(user);
    const reply = { role: "assistant", content: "" };
    const view = this.render(reply);
    view.bubble.classList.add("streaming");
    this.setStreaming(true);

    const controller = (this.controller = new AbortController());
    const started = performance.now();
    let usage = null;
    let finish = null;
    try {
      const request = {
        model: await this.modelId(),
        messages: this.messages(),
        stream: true,
        stream_options: { include_usage: true },
        temperature: Number(this.el.temperature.value),
      };
      // Empty means "as many as fit"; anything else goes as typed, for the server to judge.
      const maxTokens = this.el.maxTokens.value.trim();
      if (maxTokens !== "") request.max_tokens = Number(maxTokens);
      const response = await apiFetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(request),
        signal: controller.signal,
      });
      if (!response.ok) throw await errorOf(response);
      let complete = false;
      for await (const data of sseData(response.body)) {
        if (data === "[DONE]") {
          complete = true;
          break;
        }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(response.status, chunk); // failed after the headers
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          reply.content += delta;
          this.appendText(view, delta);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      if (!complete) throw new Error("the stream ended before the reply was complete");
      const seconds = (performance.now() - started) / 1000;
      const tokens = usage ? `${usage.completion_tokens} tokens · ` : "";
      reply.meta = `${tokens}${seconds.toFixed(1)} s · finish: ${finish || "?"}`;
    } catch (error) {
      if (error.name === "AbortError") {
        reply.meta = `stopped after ${((performance.now() - started) / 1000).toFixed(1)} s`;
      } else {
        // The turn did not go through: show why (the server's own message) and keep the text
        // at hand to edit and resend; the failed turn is not sent to the model again.
        user.failed = true;
        view.bubble.remove();
        this.entries.push({ role: "error", content: describe(error) });
        this.render(this.entries[this.entries.length - 1]);
        if (!this.el.prompt.value) this.el.prompt.value = text;
        if (error instanceof ApiError && error.status === 401) this.onUnauthorized();
        return;
      }
    } finally {
      this.controller = null;
      this.setStreaming(false);
      view.bubble.classList.remove("streaming");
      this.save();
    }
    this.entries.push(reply);
    view.meta.textContent = reply.meta;
    this.save();
  }

  setStreaming(on) {
    this.el.send.disabled = on;
    this.el.stop.disabled = !on;
    this.el.chat.dataset.state = on ? "streaming" : "idle";
  }

  push(entry) {
    this.entries.push(entry);
    this.render(entry);
    this.save();
  }

  /** Adds a bubble for `entry`; returns its parts (the reply's text grows in `text`). */
  render(entry) {
    this.el.emptyHint.hidden = true;
    const bubble = document.createElement("div");
    bubble.className = `message ${entry.role}${entry.failed ? " failed" : ""}`;
    const body = document.createElement("div");
    body.className = "body";
    const text = document.createTextNode(entry.content);
    body.append(text);
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = entry.meta || "";
    bubble.append(body, meta);
    this.el.messages.append(bubble);
    this.el.messages.scrollTop = this.el.messages.scrollHeight;
    return { bubble, text, meta };
  }

  /** Appends streamed text, following it down only if the reader was at the bottom. */
  appendText(view, delta) {
    const box = this.el.messages;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    view.text.appendData(delta);
    if (atBottom) box.scrollTop = box.scrollHeight;
  }

  clear() {
    if (this.controller) this.controller.abort();
    this.entries = [];
    this.save();
    this.el.messages.querySelectorAll(".message").forEach((m) => m.remove());
    this.el.emptyHint.hidden = false;
  }

  save() {
    try {
      localStorage.setItem(HISTORY_KEY, JSON.stringify(this.entries.slice(-KEEP_ENTRIES)));
    } catch {
      // storage full or disabled: the conversation still lives in the page
    }
  }
}

function load() {
  try {
    const entries = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
    return Array.isArray(entries) ? entries : [];
  } catch {
    return [];
  }
}

/** What an error says to the reader: the server's message with its status and code. */
function describe(error) {
  if (error instanceof ApiError) return `Error ${error.status} (${error.code}): ${error.message}`;
  if (error instanceof TypeError) return `Could not reach the server: ${error.message}`;
  return `Error: ${error.message}`;
}

// Wires the page: the chat playground, the live view, and the token field a server started with
// --token needs (shown only once the server has answered 401).

import { setToken, token } from "./http.js";
import { ChatPlayground } from "./chat.js";
import { LiveView } from "./live.js";

const $ = (id) => document.getElementById(id);

const tokenField = $("token-field");
const tokenInput = $("token");
tokenInput.value = token();
tokenField.hidden = !token();
tokenInput.addEventListener("input", () => setToken(tokenInput.value.trim()));
tokenField.addEventListener("submit", (event) => event.preventDefault()); // Enter: keep the page
function askForToken() {
  if (!tokenField.hidden) return; // asked already: focus once, not on every refused poll
  tokenField.hidden = false;
  tokenInput.focus();
}

new ChatPlayground(
  {
    chat: $("chat"),
    messages: $("messages"),
    emptyHint: $("empty-hint"),
    form: $("composer"),
    prompt: $("prompt"),
    temperature: $("temperature"),
    temperatureValue: $("temperature-value"),
    maxTokens: $("max-tokens"),
    send: $("send"),
    stop: $("stop"),
    clear: $("clear"),
  },
  askForToken,
);

new LiveView(
  {
    model: $("model"),
    status: $("server-status"),
    uptime: $("uptime"),
    instances: $("v-instances"),
    pages: $("v-pages"),
    pagesFree: $("v-pages-free"),
    batch: $("v-batch"),
    queue: $("v-queue"),
    tokens: $("v-tokens"),
    plotInstances: $("plot-instances"),
    plotPages: $("plot-pages"),
    plotBatch: $("plot-batch"),
    plotTokens: $("plot-tokens"),
  },
  askForToken,
).run();

// Talking to the server: fetch with the optional bearer token, OpenAI-shaped error messages, and
// a server-sent-events parser over a fetch body (EventSource cannot POST or be aborted per
// request, so the chat reads the stream itself).

const TOKEN_KEY = "pie.token";

/** The token typed into the header (kept for this tab only: it is a credential). */
export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** fetch() on this server, with `Authorization: Bearer` when a token was given. */
export function apiFetch(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (token()) headers.set("Authorization", `Bearer ${token()}`);
  return fetch(path, { ...options, headers });
}

/** An error raised for a non-2xx answer or an error event; `message` is the server's own. */
export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    const code = error.code || error.type || "error";
    super(error.message || `the server answered ${status}`);
    this.status = status;
    this.code = code;
  }
}

/** The ApiError of a failed response (its JSON body when there is one). */
export async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page, say): the status alone is all there is
  }
  return new ApiError(response.status, body);
}

// An event ends at a blank line; the SSE spec allows \r\n, \n and \r as line ends.
const EVENT_END = /\r\n\r\n|\n\n|\r\r/;

/**
 * Yields the `data` of each server-sent event of a fetch response body, as the bytes arrive,
 * until the body ends. Aborting the fetch makes the pending read (and so this) throw AbortError.
 */
export async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = EVENT_END.exec(buffer)) !== null) {
        const block = buffer.slice(0, end.index);
        buffer = buffer.slice(end.index + end[0].length);
        const data = block
          .split(/\r\n|\n|\r/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5));
        if (data.length) yield data.join("\n"); // comments and other fields carry nothing here
      }
    }
  } finally {
    // A consumer that stops early (at [DONE], or on an error event) lets the connection go.
    reader.cancel().catch(() => {});
  }
}

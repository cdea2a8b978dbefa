// Aura with @microsoft/fetch-event-source: one run, every event once, in order, until [DONE].
// Retries (a dropped connection, a tab hidden then shown, a connection Aura ends) send the same
// POST again with the Last-Event-ID the library keeps: that id (`<runId>:<seq>`) names the run,
// so Aura resumes it, on any instance, instead of starting a second one.
import { EventStreamContentType, fetchEventSource } from "@microsoft/fetch-event-source";

/** Aura refused the request before any stream started (RFC 9457 problem details). */
export class AuraProblem extends Error {
  constructor(status, problem) {
    super(problem.detail || `HTTP ${status}`);
    this.name = "AuraProblem";
    this.status = status;
    this.code = problem.code ?? null;
    this.problem = problem;
  }
}

/** Worth another attempt: the connection ended early, or Aura asked us to come back later. */
class RetryLater extends Error {
  constructor(message, delayMs = null) {
    super(message);
    this.delayMs = delayMs;
  }
}

/**
 * Stream one Aura run.
 * @param {object} options
 * @param {string} options.baseUrl the URL of Aura's /aura/ (through the gateway: ".../api/aura/")
 * @param {() => string} options.token the current bearer token (asked on every connection)
 * @param {{prompt: string, context?: object, thread_id?: string, onDisconnect?: string}} options.request
 * @param {(envelope: object) => void} options.onEvent each event once, in seq order, and notices
 * @param {AbortSignal} [options.signal] stop reading (the run goes on with onDisconnect "continue")
 * @param {typeof fetch} [options.fetch]
 * @returns {Promise<{runId: string | null, status: string | null, lastSeq: number}>}
 */
export function streamAuraRun({ baseUrl, token, request, onEvent, signal, fetch = globalThis.fetch,
                                openWhenHidden = false, maxDelayMs = 10_000 }) {
  let runId = null;
  let status = null;
  let lastSeq = 0;
  let done = false;
  let delayMs = 500;
  // Covers a retry before the first event (no Last-Event-ID yet): the same key and body attach
  // to the run the lost attempt may have started. (getRandomValues: insecure contexts too.)
  const idempotencyKey = Array.from(crypto.getRandomValues(new Uint8Array(16)),
                                    (byte) => byte.toString(16).padStart(2, "0")).join("");
  return fetchEventSource(new URL("test/stream", baseUrl).href, {
    method: "POST",
    headers: { "Content-Type": "application/json", "Idempotency-Key": idempotencyKey },
    body: JSON.stringify(request),
    signal,
    openWhenHidden,
    // A fresh token on every connection: a run (an approval) can outlive a token.
    fetch: (url, init) => fetch(url, { ...init, headers: { ...init.headers, Authorization: `Bearer ${token()}` } }),
    async onopen(response) {
      const type = response.headers.get("content-type") || "";
      if (response.ok && type.startsWith(EventStreamContentType)) {
        delayMs = 500;
        return;
      }
      const problem = await response.json().catch(() => ({}));
      if (response.status === 429 || response.status === 502 || response.status === 503 || response.status === 504) {
        const retryAfter = Number(response.headers.get("retry-after"));
        throw new RetryLater(problem.detail || `HTTP ${response.status}`, retryAfter > 0 ? retryAfter * 1000 : null);
      }
      throw new AuraProblem(response.status, problem); // 401, 404 run_not_found, 409, 422 ...: do not retry
    },
    onmessage(message) {
      if (message.data === "[DONE]") {
        done = true;
        return;
      }
      const envelope = JSON.parse(message.data);
      if (message.id) { // a run event (notices such as events_lost have no id and seq 0)
        if (envelope.seq <= lastSeq) return; // delivered before a reconnection
        lastSeq = envelope.seq;
        if (envelope.type === "end") status = envelope.data.status;
      }
      if (envelope.type === "start") runId = envelope.runId;
      onEvent(envelope);
    },
    onclose() {
      // Aura ends every stream with [DONE]; anything else (a proxy's timeout, Aura's own
      // "reconnect" at the stream's lifetime) is a drop: resume.
      if (!done) throw new RetryLater("The stream ended before [DONE].");
    },
    onerror(error) {
      if (error instanceof AuraProblem) throw error; // ends fetchEventSource's promise with it
      const wait = error instanceof RetryLater && error.delayMs !== null ? error.delayMs : delayMs;
      delayMs = Math.min(delayMs * 2, maxDelayMs);
      return wait;
    },
  }).then(() => ({ runId, status, lastSeq }));
}

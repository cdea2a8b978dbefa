// aura-client.js — a small, framework-free client for Aura's streamed runs and approvals.
//
// Why not EventSource? It can only GET and cannot send an Authorization header, while a run
// starts with `POST /aura/test/stream` and a bearer token. So the stream is read with fetch and
// a ReadableStream, and parsed by `SseParser` (the WHATWG "server-sent events" rules).
//
// What the client guarantees to its caller:
//   - every envelope is delivered once, in `seq` order (duplicates after a resume are dropped);
//   - the run is over when the promise of `streamRun` resolves (Aura sent `data: [DONE]`);
//   - a dropped connection is resumed with `GET <resumeUrl>` and `Last-Event-ID: <last seq>`
//     (before `start` arrived: the POST again, with the same `Idempotency-Key`);
//   - HTTP errors become `AuraProblem` (RFC 9457 problem details with Aura's stable `code`).
//
// Usage:
//   import { AuraClient } from "./aura-client.js";
//   const aura = new AuraClient({ baseUrl: "/api/aura/", token: () => auth.accessToken });
//   const outcome = await aura.streamRun(
//     { prompt: "What changed?", context: { url: location.href } },
//     { onEvent: (envelope) => render(envelope) });
//   // outcome = { runId, status: "completed" | "failed" | "cancelled" | "timeout" | null, lastSeq }
//   await aura.approve(requestId);                 // or aura.reject(requestId, "not now")
//   await aura.cancel(runId);                      // stop the run; its stream ends with `end`

/** The data of the frame that ends every stream. */
export const DONE = "[DONE]";

/**
 * An HTTP error answered by Aura (or the gateway), as RFC 9457 problem details.
 * `code` is Aura's stable machine code (e.g. "token_expired"); show `detail` to people.
 */
export class AuraProblem extends Error {
  /**
   * @param {number} status HTTP status
   * @param {Record<string, any>} problem the problem document (may be nearly empty for non-Aura errors)
   * @param {Headers} [headers] the response headers (Retry-After, WWW-Authenticate …)
   */
  constructor(status, problem, headers) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.name = "AuraProblem";
    this.status = status;
    this.code = problem.code || `http_${status}`;
    this.title = problem.title || "";
    this.detail = problem.detail || "";
    this.traceId = problem.traceId || null;
    this.problem = problem;
    this.retryAfterSeconds = headers ? Number(headers.get("Retry-After")) || null : null;
  }
}

/** The stream ended without `[DONE]` and could not be resumed. */
export class AuraStreamError extends Error {
  /** @param {string} message @param {number} lastSeq the last event delivered */
  constructor(message, lastSeq) {
    super(message);
    this.name = "AuraStreamError";
    this.lastSeq = lastSeq;
  }
}

/**
 * One server-sent event. `id` is the id field of this frame (null when it had none: Aura sends
 * `[DONE]` and out-of-sequence notices without one); comments (heartbeats such as `: ping`) are
 * frames with `comment` set.
 * @typedef {{ id: string | null, event: string, data: string, comment: string | null }} SseFrame
 */

/**
 * An incremental SSE parser: feed it text as it arrives, in chunks of any size.
 * Lines end with CRLF, LF or CR (a CR at the end of one chunk may pair with an LF in the next);
 * `data` lines of one event are joined with LF; a single space after the colon is dropped;
 * a leading byte-order mark is ignored; an event is dispatched at a blank line, and only if it
 * had a data line (an unterminated event at the end of the stream is discarded, as the spec says).
 * A `retry:` field sets `reconnectionTimeMs` at once, whether or not an event is dispatched.
 */
export class SseParser {
  constructor() {
    this.buffer = "";
    this.started = false;
    this.pendingCR = false;
    /** @type {number | null} the server's reconnection time, from the last `retry:` field */
    this.reconnectionTimeMs = null;
    this.resetEvent();
  }

  resetEvent() {
    /** @type {string[]} */
    this.dataLines = [];
    this.eventType = "";
    /** @type {string | null} */
    this.eventId = null;
  }

  /**
   * @param {string} text the next decoded piece of the stream
   * @returns {SseFrame[]} the frames completed by it
   */
  push(text) {
    if (!this.started && text.length > 0) {
      this.started = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    if (this.pendingCR && text.startsWith("\n")) text = text.slice(1); // the LF of a split CRLF
    this.pendingCR = false;
    this.buffer += text;
    /** @type {SseFrame[]} */
    const frames = [];
    const lineBreak = /\r\n|\r|\n/g;
    let lineStart = 0;
    let match;
    while ((match = lineBreak.exec(this.buffer)) !== null) {
      // A CR at the very end ends a line, but the next chunk may start with its LF.
      if (match[0] === "\r" && match.index === this.buffer.length - 1) this.pendingCR = true;
      this.line(this.buffer.slice(lineStart, match.index), frames);
      lineStart = lineBreak.lastIndex;
    }
    this.buffer = this.buffer.slice(lineStart);
    return frames;
  }

  /** @param {string} line @param {SseFrame[]} frames */
  line(line, frames) {
    if (line === "") {
      if (this.dataLines.length > 0) {
        frames.push({ id: this.eventId, event: this.eventType || "message", data: this.dataLines.join("\n"),
                      comment: null });
      }
      this.resetEvent();
      return;
    }
    if (line.startsWith(":")) {
      frames.push({ id: null, event: "", data: "", comment: line.slice(1).replace(/^ /, "") });
      return;
    }
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.dataLines.push(value);
    else if (field === "event") this.eventType = value;
    else if (field === "id" && !value.includes("\0")) this.eventId = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.reconnectionTimeMs = Number(value);
    // any other field is ignored, as the spec says
  }
}

/**
 * @typedef {Object} RunHandlers
 * @property {(envelope: Record<string, any>) => void} [onEvent] each envelope once: the run's
 *           events in seq order, plus notices (seq 0, no SSE id) such as an `error` events_lost
 *           followed by a `snapshot` of the run's state when the server no longer has the gap
 * @property {() => void} [onHeartbeat] a comment (`: ping`) arrived: the connection is alive
 * @property {(info: { attempt: number, lastSeq: number, delayMs: number }) => void} [onReconnect]
 *           the connection dropped; the client reconnects after `delayMs`
 * @property {() => void} [onResumed] a reconnection was answered with a stream
 * @property {AbortSignal} [signal] abort to stop reading (the run follows its onDisconnect policy;
 *           to stop the run itself, call `cancel(runId)`)
 * @property {string} [idempotencyKey] the POST's Idempotency-Key (default: 128 random bits)
 */

/**
 * @typedef {Object} RunOutcome
 * @property {string | null} runId
 * @property {string | null} status the `status` of the `end` event
 * @property {number} lastSeq the seq of the last event delivered
 */

const RETRIED_STATUSES = new Set([502, 503, 504]);

/** 128 random bits as hex: works outside secure contexts too, unlike crypto.randomUUID. */
function newIdempotencyKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export class AuraClient {
  /**
   * @param {Object} options
   * @param {string} [options.baseUrl] the URL that maps to Aura's `/aura/`: "/aura/" when calling Aura
   *        directly, "/api/aura/" through the DWP gateway (which strips `/api`). Relative URLs resolve
   *        against the page.
   * @param {string | (() => string | Promise<string>)} options.token the bearer token, or a function
   *        returning the current one (called for every request, so a refreshed token is picked up)
   * @param {typeof fetch} [options.fetch] the fetch to use (tests pass a fake)
   * @param {number} [options.maxReconnects] reconnections in a row without a new event before giving up
   * @param {number} [options.reconnectDelayMs] the first reconnection delay; doubles per attempt, up to
   *        10 s; a `retry:` field sent by the server replaces it
   * @param {number} [options.idleTimeoutMs] no byte for this long (heartbeats included) counts as a
   *        dropped connection; Aura pings every 15 s by default. 0 disables it.
   */
  constructor({ baseUrl = "/aura/", token, fetch: fetchImpl, maxReconnects = 5, reconnectDelayMs = 500,
                idleTimeoutMs = 45_000 }) {
    const base = new URL(baseUrl, globalThis.location?.href);
    if (!base.pathname.endsWith("/")) base.pathname += "/";
    this.baseUrl = base;
    this.token = token;
    this.fetch = fetchImpl || globalThis.fetch.bind(globalThis);
    this.maxReconnects = maxReconnects;
    this.reconnectDelayMs = reconnectDelayMs;
    this.idleTimeoutMs = idleTimeoutMs;
  }

  /**
   * The absolute URL of an Aura path. Aura names its own paths from `/aura/` (e.g. the `resumeUrl`
   * `/aura/runs/{runId}/events`); they are re-rooted on `baseUrl` so they also work behind the gateway.
   * @param {string} path e.g. "test/stream" or "/aura/hitl/approve/req_1"
   */
  url(path) {
    const relative = path.startsWith("/aura/") ? path.slice("/aura/".length) : path.replace(/^\/+/, "");
    return new URL(relative, this.baseUrl);
  }

  /** @param {Record<string, string>} [extra] */
  async headers(extra = {}) {
    const token = typeof this.token === "function" ? await this.token() : this.token;
    /** @type {Record<string, string>} */
    const headers = { ...extra };
    if (token) headers.Authorization = `Bearer ${token}`;
    return headers;
  }

  /**
   * A JSON request to the approval API (or any other JSON route).
   * @param {string} method @param {string} path @param {unknown} [body]
   * @returns {Promise<any>} the parsed JSON answer
   * @throws {AuraProblem} on any non-2xx answer
   */
  async json(method, path, body) {
    const init = { method, headers: await this.headers({ Accept: "application/json" }) };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await this.fetch(this.url(path), init);
    if (!response.ok) throw await problemOf(response);
    return response.status === 204 ? null : response.json();
  }

  /** The approval request as stored by Aura (status pending, approved, rejected, expired, cancelled). */
  getApproval(requestId) {
    return this.json("GET", `hitl/requests/${encodeURIComponent(requestId)}`);
  }

  /** Approve; resolves to the decided request. A second decision answers 409 `already_decided`. */
  approve(requestId) {
    return this.json("POST", `hitl/approve/${encodeURIComponent(requestId)}`, {});
  }

  /** Reject with an optional reason; the action does not run and the agent carries on. */
  reject(requestId, reason) {
    return this.json("POST", `hitl/reject/${encodeURIComponent(requestId)}`, reason ? { reason } : {});
  }

  /** Cancel a run wherever it runs; its streams then end with `end` (cancelled) and `[DONE]`. */
  cancel(runId) {
    return this.json("POST", `runs/${encodeURIComponent(runId)}/cancel`);
  }

  /**
   * Start a run and deliver its events until `[DONE]`, reconnecting after dropped connections:
   * with `GET resumeUrl` + `Last-Event-ID` once the `start` event named it, before that by sending
   * the POST again with the same Idempotency-Key (Aura attaches to the run that key started instead
   * of starting a second one). An HTTP error answer to the first POST rejects with `AuraProblem`.
   * @param {{ prompt: string, context?: Record<string, any>, thread_id?: string,
   *           onDisconnect?: "cancel" | "continue" }} request
   * @param {RunHandlers} [handlers]
   * @returns {Promise<RunOutcome>}
   */
  async streamRun(request, handlers = {}) {
    const { signal } = handlers;
    const state = { runId: null, status: null, lastSeq: 0, lastEventId: null, resumeUrl: null, retryMs: null,
                    done: false,
                    body: JSON.stringify(request), idempotencyKey: handlers.idempotencyKey || newIdempotencyKey() };
    /** @type {Response | null} */
    let response = null;
    try {
      response = await this.open(state, signal);
    } catch (error) {
      // Offline, or the answer was lost: whether or not the run started, the same key is safe to send again.
      if (signal?.aborted || !(error instanceof TypeError)) throw error;
    }
    if (response && !response.ok) throw await problemOf(response);
    let failedAttempts = 0;
    for (;;) {
      if (response) {
        const seqBefore = state.lastSeq;
        await this.consume(response, state, handlers);
        if (state.done) return { runId: state.runId, status: state.status, lastSeq: state.lastSeq };
        if (state.lastSeq > seqBefore) failedAttempts = 0; // that connection made progress
      }
      response = await this.reconnect(state, handlers, () => ++failedAttempts);
    }
  }

  /** The request that opens (or reopens) the stream of `state`'s run. */
  async open(state, signal) {
    const extra = { Accept: "text/event-stream" };
    if (state.lastEventId !== null) extra["Last-Event-ID"] = state.lastEventId; // `<runId>:<seq>`
    if (state.resumeUrl) {
      const headers = await this.headers(extra);
      return this.fetch(this.url(state.resumeUrl), { method: "GET", headers, signal, cache: "no-store" });
    }
    const headers = await this.headers({ ...extra, "Content-Type": "application/json",
                                          "Idempotency-Key": state.idempotencyKey });
    return this.fetch(this.url("test/stream"), { method: "POST", headers, body: state.body, signal,
                                                 cache: "no-store" });
  }

  /**
   * Reopen the stream after a drop, waiting between attempts, until a stream answers.
   * @returns {Promise<Response>}
   */
  async reconnect(state, handlers, nextAttempt) {
    const { signal } = handlers;
    for (;;) {
      const attempt = nextAttempt();
      if (attempt > this.maxReconnects) {
        throw new AuraStreamError(`The connection dropped and ${this.maxReconnects} reconnections failed.`,
                                  state.lastSeq);
      }
      const delayMs = state.retryMs ?? Math.min(this.reconnectDelayMs * 2 ** (attempt - 1), 10_000);
      handlers.onReconnect?.({ attempt, lastSeq: state.lastSeq, delayMs });
      await delay(delayMs, signal);
      let response;
      try {
        response = await this.open(state, signal);
      } catch (error) {
        if (signal?.aborted) throw error;
        continue; // still offline: try again
      }
      if (response.ok) {
        handlers.onResumed?.();
        return response;
      }
      if (!RETRIED_STATUSES.has(response.status)) throw await problemOf(response); // e.g. 404: run expired
      await response.body?.cancel();
    }
  }

  /**
   * Read one connection's frames into `state`, delivering new envelopes. Returns when the stream
   * ends or drops (state.done tells which); rethrows only when the caller aborted.
   */
  async consume(response, state, handlers) {
    const { signal, onEvent, onHeartbeat } = handlers;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SseParser();
    let idleTimer = null;
    const armIdleTimer = () => {
      clearTimeout(idleTimer);
      if (this.idleTimeoutMs > 0) {
        // Nothing, not even a heartbeat: the connection is dead even if TCP has not noticed yet.
        idleTimer = setTimeout(() => reader.cancel("idle").catch(() => {}), this.idleTimeoutMs);
      }
    };
    const stopOnAbort = () => reader.cancel("aborted").catch(() => {});
    signal?.addEventListener("abort", stopOnAbort, { once: true });
    try {
      armIdleTimer();
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (error) {
          if (signal?.aborted) throw abortError(signal);
          return; // network error mid-stream: reconnect
        }
        if (signal?.aborted) throw abortError(signal);
        if (chunk.done) return; // closed without [DONE] (dropped, or Aura asked us to reconnect)
        armIdleTimer();
        const frames = parser.push(chunk.value);
        if (parser.reconnectionTimeMs !== null) state.retryMs = parser.reconnectionTimeMs;
        for (const frame of frames) {
          if (frame.comment !== null) {
            onHeartbeat?.();
            continue;
          }
          if (frame.data === DONE) {
            state.done = true;
            return;
          }
          const envelope = JSON.parse(frame.data);
          if (frame.id !== null) {
            const seq = envelope.seq; // the id is `<runId>:<seq>`: sent back as it is
            if (seq <= state.lastSeq) continue; // delivered before the reconnection
            state.lastSeq = seq;
            state.lastEventId = frame.id;
          } // no id: a notice outside the run's sequence; it never moves Last-Event-ID
          if (envelope.type === "start") {
            state.runId = envelope.runId;
            state.resumeUrl = envelope.data.resumeUrl || null;
          } else if (envelope.type === "end") {
            state.status = envelope.data.status;
          }
          onEvent?.(envelope);
        }
      }
    } finally {
      clearTimeout(idleTimer);
      signal?.removeEventListener("abort", stopOnAbort);
      reader.cancel().catch(() => {}); // release the connection on every exit path
    }
  }
}

/**
 * The problem details of a failed response (Aura answers `application/problem+json`; a gateway or
 * proxy may answer anything else, which still becomes an AuraProblem with its status).
 * @param {Response} response
 * @returns {Promise<AuraProblem>}
 */
export async function problemOf(response) {
  let problem = {};
  const type = response.headers.get("Content-Type") || "";
  if (type.includes("json")) {
    try {
      problem = await response.json();
    } catch {
      problem = {};
    }
  } else {
    await response.body?.cancel();
  }
  if (typeof problem !== "object" || problem === null) problem = {};
  return new AuraProblem(response.status, { title: response.statusText, ...problem }, response.headers);
}

function abortError(signal) {
  return signal.reason instanceof Error ? signal.reason : new DOMException("The run was stopped.", "AbortError");
}

function delay(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(abortError(signal));
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(abortError(signal));
    }, { once: true });
  });
}

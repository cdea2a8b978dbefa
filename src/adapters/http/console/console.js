// The Aura console: renders one run's events into the page and sends approval decisions.
// Everything from the server is written with textContent, never as HTML: model output and tool
// results are untrusted text.

import { AuraClient, AuraProblem, AuraStreamError } from "./aura-client.js";

/** @param {string} id */
const byId = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

const ui = {
  form: /** @type {HTMLFormElement} */ (byId("run-form")),
  token: /** @type {HTMLInputElement} */ (byId("token")),
  tokenHint: byId("token-hint"),
  mintToken: /** @type {HTMLButtonElement} */ (byId("mint-token")),
  prompt: /** @type {HTMLTextAreaElement} */ (byId("prompt")),
  context: /** @type {HTMLTextAreaElement} */ (byId("context")),
  contextError: byId("context-error"),
  keepRunning: /** @type {HTMLInputElement} */ (byId("keep-running")),
  run: /** @type {HTMLButtonElement} */ (byId("run")),
  stop: /** @type {HTMLButtonElement} */ (byId("stop")),
  runStatus: byId("run-status"),
  runMessage: byId("run-message"),
  runId: byId("run-id"),
  threadId: byId("thread-id"),
  eventCount: byId("event-count"),
  lastSeq: byId("last-seq"),
  connection: byId("connection"),
  approval: byId("approval"),
  approvalMessage: byId("approval-message"),
  approvalAction: byId("approval-action"),
  approvalRequest: byId("approval-request"),
  approvalExpires: byId("approval-expires"),
  approvalArgs: byId("approval-args"),
  rejectReason: /** @type {HTMLInputElement} */ (byId("reject-reason")),
  approve: /** @type {HTMLButtonElement} */ (byId("approve")),
  reject: /** @type {HTMLButtonElement} */ (byId("reject")),
  approvalDecision: byId("approval-decision"),
  timeline: byId("timeline"),
  timelineEmpty: byId("timeline-empty"),
  plan: byId("plan"),
  planProgress: /** @type {HTMLProgressElement} */ (byId("plan-progress")),
  planProgressLabel: byId("plan-progress-label"),
  tools: byId("tools"),
  toolsEmpty: byId("tools-empty"),
  answer: byId("answer"),
  thoughts: byId("thoughts"),
  errors: byId("errors"),
  errorsEmpty: byId("errors-empty"),
  announcer: byId("announcer"),
};

// The page lives at <base>/console, so "./" is the URL that maps to Aura's /aura/ (directly or
// behind the gateway's /api prefix).
const aura = new AuraClient({ baseUrl: new URL("./", location.href).href, token: () => ui.token.value.trim() });

const FINISHED_STEP_STATUSES = new Set(["completed", "failed", "skipped"]);

/** Per-run view state, replaced at every Run. */
let view = freshView();

function freshView() {
  return {
    events: 0,
    /** @type {Map<string, HTMLLIElement>} */ timeline: new Map(),
    /** @type {Map<string, HTMLLIElement>} */ thoughts: new Map(),
    /** @type {Map<string, HTMLLIElement>} */ plan: new Map(),
    /** @type {Map<string, string>} */ planStatus: new Map(),
    /** @type {Map<string, HTMLLIElement>} */ tools: new Map(),
    /** @type {string | null} */ runId: null,
    /** @type {string | null} */ pendingRequestId: null,
    answerFinal: false,
  };
}

// ---- small DOM helpers ---------------------------------------------------------------------

/**
 * @param {string} tag @param {string} [className] @param {string} [text]
 * @returns {HTMLElement}
 */
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A status word shown as a badge; CSS colours it by `data-status`. */
function badge(status) {
  const node = el("span", "badge", status);
  node.dataset.status = status;
  return node;
}

/** @param {HTMLElement} node @param {string} status */
function setBadge(node, status) {
  node.textContent = status;
  node.dataset.status = status;
}

function prettyJson(value) {
  return JSON.stringify(value, null, 2);
}

function announce(text) {
  // Clear first so that the same sentence twice is announced twice.
  ui.announcer.textContent = "";
  requestAnimationFrame(() => { ui.announcer.textContent = text; });
}

function clock(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleTimeString();
}

// ---- rendering one envelope per type ---------------------------------------------------------

const render = {
  start(envelope) {
    view.runId = envelope.runId;
    setBadge(ui.runStatus, "running");
    ui.runMessage.textContent = envelope.data.message;
    ui.runId.textContent = envelope.runId;
    ui.threadId.textContent = envelope.threadId;
  },

  thought(envelope) {
    // A thought grows while the model writes it: pieces (chunk: true) of one thoughtId are
    // appended in order; its final event (chunk: false) replaces them with the whole text.
    const { thoughtId, thoughtType, content, chunk } = envelope.data;
    let item = thoughtId ? view.thoughts.get(thoughtId) : undefined;
    if (!item) {
      item = /** @type {HTMLLIElement} */ (el("li", "thought"));
      item.append(el("span", "thought-type", thoughtType), el("span", "thought-text", ""));
      if (thoughtId) {
        item.dataset.thoughtId = thoughtId;
        view.thoughts.set(thoughtId, item);
      }
      ui.thoughts.append(item);
    }
    const text = /** @type {HTMLElement} */ (item.querySelector(".thought-text"));
    text.textContent = chunk ? text.textContent + content : content;
    item.classList.toggle("thought-growing", Boolean(chunk));
  },

  timeline_step_update(envelope) {
    const { stepId, title, status, progress } = envelope.data;
    let item = view.timeline.get(stepId);
    if (!item) {
      item = /** @type {HTMLLIElement} */ (el("li", "step"));
      item.dataset.stepId = stepId;
      const head = el("div", "step-head");
      head.append(el("span", "step-title"), el("span", "step-id mono", stepId), badge(status));
      item.append(head);
      view.timeline.set(stepId, item);
      ui.timeline.append(item);
      ui.timelineEmpty.hidden = true;
    }
    item.querySelector(".step-title").textContent = title;
    setBadge(item.querySelector(".badge"), status);
    item.title = `${Math.round((progress ?? 0) * 100)} %`;
  },

  plan_step(envelope) {
    const { stepId, index, description, status, confidence } = envelope.data;
    const item = /** @type {HTMLLIElement} */ (el("li", "step"));
    item.dataset.stepId = stepId;
    const head = el("div", "step-head");
    head.append(el("span", "step-title", `${index}. ${description}`), badge(status));
    const bar = /** @type {HTMLProgressElement} */ (el("progress"));
    bar.max = 1;
    bar.value = 0;
    bar.setAttribute("aria-label", `Progress of step ${index}`);
    const note = el("p", "note", `confidence ${Math.round(confidence * 100)} %`);
    item.append(head, bar, note);
    view.plan.set(stepId, item);
    view.planStatus.set(stepId, status);
    ui.plan.append(item);
    updatePlanProgress();
  },

  plan_step_update(envelope) {
    const { stepId, status, progress, note } = envelope.data;
    const item = view.plan.get(stepId);
    if (!item) return;
    setBadge(item.querySelector(".badge"), status);
    /** @type {HTMLProgressElement} */ (item.querySelector("progress")).value = progress ?? 0;
    if (note) item.querySelector(".note").textContent = note;
    view.planStatus.set(stepId, status);
    updatePlanProgress();
  },

  tool_execution(envelope) {
    const data = envelope.data;
    let item = view.tools.get(data.toolCallId);
    if (!item) {
      item = /** @type {HTMLLIElement} */ (el("li", "tool"));
      item.dataset.callId = data.toolCallId;
      const head = el("div", "tool-head");
      head.append(el("span", "tool-name mono", data.toolName), el("span", "tool-call mono", data.toolCallId));
      if (data.requiresApproval) head.append(el("span", "tag", "needs approval"));
      head.append(badge(data.status));
      const details = el("dl", "tool-details");
      const args = el("div");
      args.append(el("dt", undefined, "Arguments"), el("dd"));
      args.lastElementChild.append(el("pre", "json", prettyJson(data.toolArgs)));
      const outcome = el("div", "tool-outcome");
      outcome.hidden = true;
      outcome.append(el("dt"), el("dd"));
      details.append(args, outcome);
      item.append(head, details);
      view.tools.set(data.toolCallId, item);
      ui.tools.append(item);
      ui.toolsEmpty.hidden = true;
    }
    setBadge(item.querySelector(".badge"), data.status);
    const outcome = /** @type {HTMLElement} */ (item.querySelector(".tool-outcome"));
    if (data.error) {
      outcome.hidden = false;
      outcome.querySelector("dt").textContent = "Error";
      outcome.querySelector("dd").replaceChildren(el("pre", "json error-text", String(data.error)));
    } else if (data.result !== null && data.result !== undefined) {
      outcome.hidden = false;
      outcome.querySelector("dt").textContent = "Result";
      outcome.querySelector("dd").replaceChildren(el("pre", "json", prettyJson(data.result)));
    }
    // A decision taken elsewhere (the DWP backend, another tab) shows up here first.
    if (view.pendingRequestId && data.status !== "pending") {
      const outcome = { rejected: "rejected", cancelled: "cancelled" }[data.status] ?? "approved";
      settleApproval(outcome, "decided elsewhere");
    }
  },

  hitl(envelope) {
    const data = envelope.data;
    view.pendingRequestId = data.requestId;
    ui.approvalMessage.textContent = data.message;
    ui.approvalAction.textContent = data.actionType;
    ui.approvalRequest.textContent = data.requestId;
    ui.approvalExpires.textContent = data.expiresAt ? clock(data.expiresAt) : "—";
    ui.approvalArgs.textContent = prettyJson(data.context);
    ui.approvalDecision.textContent = "";
    ui.rejectReason.value = "";
    ui.approve.disabled = false;
    ui.reject.disabled = false;
    ui.rejectReason.disabled = false;
    ui.approval.dataset.state = "pending";
    ui.approval.hidden = false;
    announce(`Approval needed: ${data.message}`);
  },

  content(envelope) {
    const { content, chunk } = envelope.data;
    if (chunk) {
      ui.answer.setAttribute("aria-busy", "true"); // announce the answer once, when it is whole
      ui.answer.append(document.createTextNode(content));
    } else {
      ui.answer.textContent = content; // the final whole answer is authoritative
      ui.answer.setAttribute("aria-busy", "false");
      view.answerFinal = true;
    }
  },

  error(envelope) {
    const { errorType, message, retryable } = envelope.data;
    addError(`${errorType}: ${message}${retryable ? " (retryable)" : ""}`);
    if (errorType === "hitl_timeout") settleApproval("expired", "no decision in time");
  },

  // After a gap the server no longer holds (notice `error` events_lost), the run's whole state.
  snapshot(envelope) {
    const state = envelope.data;
    view.plan.clear();
    view.planStatus.clear();
    ui.plan.replaceChildren();
    for (const step of state.plan ?? []) {
      render.plan_step({ data: step });
      render.plan_step_update({ data: step });
    }
    view.timeline.clear();
    ui.timeline.replaceChildren();
    for (const entry of state.timeline ?? []) render.timeline_step_update({ data: entry });
    ui.answer.textContent = state.answer ?? "";
    if (state.pendingApproval?.status === "pending") render.hitl({ data: state.pendingApproval });
    if (state.status) setBadge(ui.runStatus, state.status);
  },

  end(envelope) {
    const { status, message } = envelope.data;
    setBadge(ui.runStatus, status);
    ui.runMessage.textContent = message || envelope.data.reason || "";
    ui.answer.setAttribute("aria-busy", "false");
    if (view.pendingRequestId) settleApproval("closed", "the run ended");
    announce(`Run ${status}.`);
  },
};

function updatePlanProgress() {
  const total = view.planStatus.size;
  const done = [...view.planStatus.values()].filter((status) => FINISHED_STEP_STATUSES.has(status)).length;
  ui.planProgress.max = Math.max(total, 1);
  ui.planProgress.value = done;
  ui.planProgressLabel.textContent = `${done} of ${total} steps finished`;
}

/** @param {string} text */
function addError(text) {
  ui.errors.append(el("li", "error", text));
  ui.errorsEmpty.hidden = true;
}

/** @param {unknown} error */
function describeError(error) {
  if (error instanceof AuraProblem) {
    const trace = error.traceId ? ` (trace ${error.traceId})` : "";
    return `HTTP ${error.status} ${error.code}: ${error.detail || error.title}${trace}`;
  }
  if (error instanceof AuraStreamError) return `connection lost after event ${error.lastSeq}: ${error.message}`;
  return error instanceof Error ? error.message : String(error);
}

// ---- approvals -----------------------------------------------------------------------------

/** Show the outcome of the pending approval and disable its buttons. */
function settleApproval(outcome, detail) {
  view.pendingRequestId = null;
  ui.approve.disabled = true;
  ui.reject.disabled = true;
  ui.rejectReason.disabled = true;
  ui.approval.dataset.state = outcome;
  if (!ui.approvalDecision.textContent) ui.approvalDecision.textContent = `${capitalise(outcome)} (${detail}).`;
}

function capitalise(word) {
  return word.charAt(0).toUpperCase() + word.slice(1);
}

/** @param {boolean} approve */
async function decide(approve) {
  const requestId = view.pendingRequestId;
  if (!requestId) return;
  ui.approve.disabled = true;
  ui.reject.disabled = true;
  try {
    const decided = approve
      ? await aura.approve(requestId)
      : await aura.reject(requestId, ui.rejectReason.value.trim() || undefined);
    const reason = decided.reason ? `: ${decided.reason}` : "";
    ui.approvalDecision.textContent = `${capitalise(decided.status)} by ${decided.decidedBy}${reason}.`;
    settleApproval(decided.status, "by you");
    announce(`${capitalise(decided.status)}.`);
  } catch (error) {
    if (error instanceof AuraProblem && error.code === "already_decided") {
      const { requestStatus, decidedBy } = error.problem;
      ui.approvalDecision.textContent = `Already ${requestStatus} by ${decidedBy}.`;
      settleApproval(requestStatus, "earlier");
      return;
    }
    addError(describeError(error));
    ui.approve.disabled = false;
    ui.reject.disabled = false;
  }
}

ui.approve.addEventListener("click", () => decide(true));
ui.reject.addEventListener("click", () => decide(false));

// ---- starting and stopping a run -----------------------------------------------------------

/** @type {AbortController | null} */
let running = null;

function resetView() {
  view = freshView();
  for (const list of [ui.timeline, ui.plan, ui.tools, ui.thoughts, ui.errors]) list.replaceChildren();
  ui.timelineEmpty.hidden = false;
  ui.toolsEmpty.hidden = false;
  ui.errorsEmpty.hidden = false;
  ui.answer.textContent = "";
  ui.answer.setAttribute("aria-busy", "false");
  ui.approval.hidden = true;
  ui.runMessage.textContent = "—";
  ui.runId.textContent = "—";
  ui.threadId.textContent = "—";
  ui.eventCount.textContent = "0";
  ui.lastSeq.textContent = "—";
  updatePlanProgress();
}

/** The context textarea as an object, or null after showing why it is not one. */
function readContext() {
  const text = ui.context.value.trim() || "{}";
  let value;
  try {
    value = JSON.parse(text);
  } catch {
    value = undefined;
  }
  const valid = typeof value === "object" && value !== null && !Array.isArray(value);
  ui.contextError.hidden = valid;
  ui.context.setAttribute("aria-invalid", String(!valid));
  if (!valid) {
    ui.contextError.textContent = "The context must be a JSON object, e.g. {\"path\": \"/items/42\"}.";
    ui.context.focus();
    return null;
  }
  return value;
}

/** @param {SubmitEvent} event */
async function startRun(event) {
  event.preventDefault();
  if (running) return;
  const context = readContext();
  if (context === null) return;
  if (!ui.prompt.value.trim()) {
    ui.prompt.focus();
    return;
  }
  resetView();
  running = new AbortController();
  ui.run.disabled = true;
  ui.stop.disabled = false;
  ui.stop.focus(); // the Run button is disabled now; keep keyboard focus in the form
  setBadge(ui.runStatus, "starting");
  ui.connection.textContent = "connecting";
  try {
    const outcome = await aura.streamRun(
      { prompt: ui.prompt.value, context, onDisconnect: ui.keepRunning.checked ? "continue" : "cancel" },
      {
        signal: running.signal,
        onEvent(envelope) {
          view.events += 1;
          ui.eventCount.textContent = String(view.events);
          if (envelope.seq > 0) ui.lastSeq.textContent = String(envelope.seq); // notices have seq 0
          ui.connection.textContent = "streaming";
          render[envelope.type]?.(envelope); // unknown types: a newer server; ignore them
        },
        onHeartbeat() {
          ui.connection.textContent = `alive (heartbeat ${new Date().toLocaleTimeString()})`;
        },
        onReconnect({ attempt, lastSeq, delayMs }) {
          ui.connection.textContent = `dropped; resuming after event ${lastSeq} (attempt ${attempt}, ${delayMs} ms)`;
        },
        onResumed() {
          ui.connection.textContent = "resumed";
        },
      },
    );
    ui.connection.textContent = "done";
    if (!outcome.status) setBadge(ui.runStatus, "unknown");
  } catch (error) {
    if (error instanceof DOMException && error.name === "AbortError") {
      setBadge(ui.runStatus, "stopped");
      ui.connection.textContent = "closed by you";
    } else {
      addError(describeError(error));
      setBadge(ui.runStatus, ui.runId.textContent === "—" ? "not started" : "disconnected");
      ui.connection.textContent = "failed";
      announce(`Error: ${describeError(error)}`);
    }
  } finally {
    running = null;
    const stopHadFocus = document.activeElement === ui.stop;
    ui.run.disabled = false;
    ui.stop.disabled = true;
    if (stopHadFocus) ui.run.focus();
  }
}

/** Stop cancels the run itself (its stream then ends with `end` cancelled); before the run has
 * an id, closing the connection is all there is to do. */
async function stopRun() {
  if (!running) return;
  if (!view.runId) {
    running.abort();
    return;
  }
  ui.connection.textContent = "cancelling";
  try {
    await aura.cancel(view.runId);
  } catch (error) {
    addError(describeError(error));
    running?.abort();
  }
}

ui.form.addEventListener("submit", startRun);
ui.stop.addEventListener("click", stopRun);

// ---- dev mode: mint a token ----------------------------------------------------------------

async function mintDevToken() {
  ui.mintToken.disabled = true;
  try {
    const response = await fetch(new URL("console/dev-token", location.href), {
      method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
    });
    if (!response.ok) throw new AuraProblem(response.status, await response.json().catch(() => ({})));
    const minted = await response.json();
    ui.token.value = minted.token;
    const role = minted.role ? `role ${minted.role}` : "no role";
    ui.tokenHint.textContent = `Dev token for ${minted.user} in tenant ${minted.tenant} (${role}).`;
    announce("Dev token minted.");
  } catch (error) {
    addError(describeError(error));
  } finally {
    ui.mintToken.disabled = false;
  }
}

async function loadConsoleConfig() {
  try {
    const response = await fetch(new URL("console/config", location.href), { headers: { Accept: "application/json" } });
    const config = response.ok ? await response.json() : { devMode: false };
    ui.mintToken.hidden = !config.devMode;
  } catch {
    ui.mintToken.hidden = true;
  }
}

ui.mintToken.addEventListener("click", mintDevToken);
updatePlanProgress();
loadConsoleConfig().finally(() => { document.body.dataset.ready = "true"; });

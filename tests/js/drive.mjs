// Drives Aura with the real @microsoft/fetch-event-source in Node (tests/e2e/test_fetch_event_source.py).
// argv[2]: JSON {baseUrl, token, request, mode: "plain" | "service"}.
// stdin: "hide" / "show" lines (the page's visibility; the library closes the stream while hidden).
// stdout: JSON lines: {"request": {...}} per connection, {"event": type, "seq": n} per event, then
// {"outcome": ..., "events": [...]} or {"error": {...}}.
import { createInterface } from "node:readline";

class PageDocument extends EventTarget {
  hidden = false;
}
globalThis.window = globalThis; // the library calls window.setTimeout and listens on document
globalThis.document = new PageDocument();

const { streamAuraRun } = await import("./aura-sse.mjs");
const { AuraRunService } = await import("./aura-run.service.mjs");

const config = JSON.parse(process.argv[2]);
const emit = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);
createInterface({ input: process.stdin }).on("line", (command) => {
  document.hidden = command.trim() === "hide";
  document.dispatchEvent(new Event("visibilitychange"));
});
const observedFetch = (url, init) => {
  emit({ request: { method: init.method, lastEventId: init.headers["last-event-id"] ?? null } });
  return fetch(url, init);
};
const events = [];
const onEvent = (envelope) => {
  events.push(envelope);
  emit({ event: envelope.type, seq: envelope.seq });
};
const settings = { baseUrl: config.baseUrl, token: () => config.token, fetch: observedFetch };
try {
  let outcome;
  if (config.mode === "service") {
    outcome = await new Promise((resolve, reject) => {
      new AuraRunService(settings).run$(config.request).subscribe({
        next: onEvent, error: reject, complete: () => resolve({ completed: true }),
      });
    });
  } else {
    outcome = await streamAuraRun({ ...settings, request: config.request, onEvent });
  }
  emit({ outcome, events });
} catch (error) {
  emit({ error: { name: error.name, message: error.message, status: error.status ?? null, code: error.code ?? null } });
}
process.exit(0);

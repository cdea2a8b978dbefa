// An Angular-style service around streamAuraRun: a run is an Observable of its events;
// unsubscribing stops reading (with onDisconnect "cancel", the run is cancelled once no reader
// came back within Aura's grace period).
import { Observable } from "rxjs";

import { streamAuraRun } from "./aura-sse.mjs";

export class AuraRunService {
  /** @param {{ baseUrl: string, token: () => string, fetch?: typeof fetch }} config */
  constructor(config) {
    this.config = config;
  }

  /** The run's events, in seq order, each once; completes after [DONE]. */
  run$(request) {
    return new Observable((subscriber) => {
      const controller = new AbortController();
      streamAuraRun({ ...this.config, request, signal: controller.signal, onEvent: (event) => subscriber.next(event) })
        .then(() => subscriber.complete(), (error) => subscriber.error(error));
      return () => controller.abort();
    });
  }
}

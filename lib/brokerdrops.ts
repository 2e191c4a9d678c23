/**
 * Messages the broker dropped. Mosquitto drops QoS 1 messages beyond
 * `max_queued_messages` (1000 by default) for a slow or offline subscriber
 * and still acknowledges them to the publisher: a silent loss that no client
 * sees. It publishes the running count (all clients, since the broker
 * started) as a retained `$SYS` topic; the service watches it and says so
 * loudly when it grows. Other brokers do not publish this topic: then there
 * is nothing to watch.
 */

/** Mosquitto's count of dropped PUBLISH messages since it started. */
export const DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped";

/** What one reading of the counter means. */
export type DropReading =
  | { readonly kind: "first"; readonly total: number }
  | { readonly kind: "new"; readonly dropped: number; readonly total: number }
  | { readonly kind: "same" }
  | { readonly kind: "invalid" };

/**
 * Turns successive values of DROPPED_TOPIC into drops seen since the last
 * one. Kept across reconnects, so drops while the service was away (its
 * queue overflowing at the broker) count too; a smaller value means the
 * broker restarted and counts from zero again.
 */
export class DropCounter {
  #last: number | null = null;

  /** Reads one payload of DROPPED_TOPIC. */
  observe(payload: Uint8Array): DropReading {
    const text = new TextDecoder().decode(payload).trim();
    if (!/^\d{1,15}$/.test(text)) return { kind: "invalid" };
    const total = Number(text);
    const last = this.#last;
    this.#last = total;
    if (last === null) return { kind: "first", total };
    const dropped = total >= last ? total - last : total; // smaller: the broker restarted
    return dropped === 0 ? { kind: "same" } : { kind: "new", dropped, total };
  }
}

/**
 * Prometheus metrics (prom-client) for one service: what came in, what was
 * acknowledged, stored and rejected, how long batches take, how much waits in
 * the spool, and the state of the broker and database connections. Each
 * service owns its own registry, so several can run in one process (tests).
 */

import { Counter, Gauge, Histogram, Registry } from "prom-client";
import type { MqttEvents } from "./mqtt.ts";
import { Reasons } from "./rejection.ts";
import type { Spool } from "./spool.ts";
import { VERSION } from "./version.ts";
import type { WriterEvents } from "./writer.ts";

/** Most distinct `reason` labels; further ones are counted as `other`. */
export const MAX_REASON_LABELS = 64;

/** Batch latency buckets in seconds: a healthy batch takes milliseconds. */
const BATCH_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

const FIXED_REASONS = new Set<string>(Object.values(Reasons));

/**
 * Maps a rejection reason to a label of bounded cardinality: the user-facing
 * strings stay as they are; quoted names and numbers inside generated reasons
 * become `"…"` and `N` (the 8 of "UTF-8" is a name, not a number); a database
 * error keeps only its family.
 */
export function reasonLabel(reason: string): string {
  if (FIXED_REASONS.has(reason)) return reason;
  const colon = reason.indexOf(": ");
  if (reason.startsWith("database rejected")) return reason.slice(0, colon < 0 ? undefined : colon);
  return reason.replace(/"(?:[^"\\]|\\.)*"/g, '"…"').replace(/(?<!UTF-|\d)\d+/g, "N")
    .slice(0, 100);
}

export class Metrics {
  readonly registry = new Registry();
  readonly #reasons = new Set<string>();
  readonly #received: Counter;
  readonly #acknowledged: Counter;
  readonly #stored: Counter;
  readonly #rejected: Counter<"reason">;
  readonly #rows: Counter;
  readonly #batch: Histogram;
  readonly #mqttUp: Gauge;
  readonly #reconnects: Counter;
  readonly #brokerDropped: Counter;
  readonly #dbUp: Gauge;
  #spool: Spool | null = null;
  #everConnected = false;

  constructor() {
    const registers = [this.registry];
    const spool = () => this.#spool;
    this.#received = new Counter({
      name: "sif_messages_received_total",
      help: "MQTT messages delivered by the broker (redeliveries included).",
      registers,
    });
    this.#acknowledged = new Counter({
      name: "sif_messages_acknowledged_total",
      help: "Messages made durable in the spool and acknowledged to the broker.",
      registers,
    });
    this.#stored = new Counter({
      name: "sif_messages_stored_total",
      help: "Messages written to their app table.",
      registers,
    });
    this.#rejected = new Counter({
      name: "sif_messages_rejected_total",
      help: 'Messages recorded in "errorTable" and the dead letters, by reason.',
      labelNames: ["reason"],
      registers,
    });
    this.#rows = new Counter({
      name: "sif_rows_written_total",
      help: "Rows inserted into app tables.",
      registers,
    });
    this.#batch = new Histogram({
      name: "sif_batch_duration_seconds",
      help: "Time to parse, translate and commit one batch.",
      buckets: BATCH_BUCKETS,
      registers,
    });
    new Gauge({
      name: "sif_spool_messages",
      help: "Messages in the spool, acknowledged but not yet written.",
      registers,
      collect() {
        this.set(spool()?.count ?? 0);
      },
    });
    new Gauge({
      name: "sif_spool_bytes",
      help: "Bytes in the spool (payloads and topics).",
      registers,
      collect() {
        this.set(spool()?.bytes ?? 0);
      },
    });
    new Gauge({
      name: "sif_spool_oldest_age_seconds",
      help: "Age of the oldest message in the spool; 0 when empty.",
      registers,
      collect() {
        let oldest: number | null = null;
        try {
          oldest = spool()?.oldestReceivedAt() ?? null;
        } catch {
          // spool closed during shutdown
        }
        this.set(oldest === null ? 0 : Math.max(0, Date.now() - oldest) / 1000);
      },
    });
    this.#mqttUp = new Gauge({
      name: "sif_mqtt_connected",
      help: "1 while connected to the MQTT broker.",
      registers,
    });
    this.#reconnects = new Counter({
      name: "sif_mqtt_reconnects_total",
      help: "Connections to the broker re-established after a loss.",
      registers,
    });
    this.#brokerDropped = new Counter({
      name: "sif_broker_dropped_messages_total",
      help: "Messages the broker reported dropping (all its clients; Mosquitto's $SYS count) " +
        "while this service watched.",
      registers,
    });
    this.#dbUp = new Gauge({
      name: "sif_database_up",
      help: "1 while the last database write or check succeeded.",
      registers,
    });
    new Gauge({
      name: "sif_build_info",
      help: "Always 1; the version is in the label.",
      labelNames: ["version"],
      registers,
    }).set({ version: VERSION }, 1);
    const started = Date.now() / 1000;
    new Gauge({
      name: "process_start_time_seconds",
      help: "Start time of the process since the Unix epoch.",
      registers,
    }).set(started);
    new Gauge({
      name: "process_resident_memory_bytes",
      help: "Resident memory of the process.",
      registers,
      collect() {
        this.set(Deno.memoryUsage().rss);
      },
    });
  }

  /** Reports the spool's depth and oldest message on every scrape. */
  watchSpool(spool: Spool): void {
    this.#spool = spool;
  }

  /** Counts a message made durable and acknowledged. */
  acknowledged(): void {
    this.#acknowledged.inc();
  }

  /** Hooks for the writer. */
  readonly writer: Required<WriterEvents> = {
    batch: ({ messages, rows, rejected, seconds }) => {
      this.#stored.inc(messages - rejected);
      this.#rows.inc(rows);
      this.#batch.observe(seconds);
    },
    rejected: (reason) => {
      let label = reasonLabel(reason);
      if (!this.#reasons.has(label)) {
        if (this.#reasons.size >= MAX_REASON_LABELS) label = "other";
        else this.#reasons.add(label);
      }
      this.#rejected.inc({ reason: label });
    },
    database: (ok) => this.#dbUp.set(ok ? 1 : 0),
  };

  /** Hooks for the MQTT client. */
  readonly mqtt: Required<Pick<MqttEvents, "connected" | "received" | "brokerDropped">> = {
    connected: (ok) => {
      this.#mqttUp.set(ok ? 1 : 0);
      if (ok && this.#everConnected) this.#reconnects.inc();
      if (ok) this.#everConnected = true;
    },
    received: () => this.#received.inc(),
    brokerDropped: (n) => this.#brokerDropped.inc(n),
  };

  /** The exposition text and its content type. */
  async render(): Promise<{ contentType: string; body: string }> {
    return { contentType: this.registry.contentType, body: await this.registry.metrics() };
  }
}

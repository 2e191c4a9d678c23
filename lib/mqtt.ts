/**
 * The MQTT side: a QoS 1 subscription on a persistent session. Each message
 * is handed to `accept` (which makes it durable) before mqtt.js sends its
 * PUBACK, so an acknowledged message is never only in memory. With a
 * `GroupCommit`, `accept` only stages messages and one disk commit covers
 * all messages of a socket read; their PUBACKs wait in the corked socket
 * until that commit has returned.
 */

import mqtt from "mqtt";
import type { MqttConfig } from "./config.ts";
import { log } from "./log.ts";
import { DropCounter, DROPPED_TOPIC } from "./brokerdrops.ts";

/** Makes a message durable; returns false to withhold the acknowledgement (full spool). */
export type Accept = (topic: string, payload: Uint8Array) => boolean;

/**
 * Group commit: `accept` stages a message, `commit` makes every staged
 * message durable at once (one transaction instead of one per message).
 */
export interface GroupCommit {
  /** Makes the staged messages durable; throws on a disk error. */
  commit(): void;
  /** Drops the staged messages after a disk error (they are not acknowledged). */
  rollback(): void;
}

/**
 * Most messages per group. Their PUBACKs (4 to 7 bytes each) wait in the
 * socket's buffer and must stay under its 16 KiB high-water mark, or mqtt.js
 * would wait for a "drain" that only the commit brings.
 */
export const MAX_GROUP = 1000;

export interface MqttEvents {
  connected?(ok: boolean): void;
  received?(): void;
  /** The broker granted the subscription to `topic`. */
  subscribed?(topic: string): void;
  /** The broker refused our credentials or authorization: not worth retrying. */
  fatal?(reason: string): void;
  /** The broker reported `dropped` more messages lost (all its clients; lib/brokerdrops.ts). */
  brokerDropped?(dropped: number): void;
}

/** Session expiry for MQTT 5: how long the broker keeps our queue while we are away. */
export const SESSION_EXPIRY_SECONDS = 7 * 24 * 3600;

/** CONNACK codes that mean "fix the configuration", for MQTT 3.1.1 and 5. */
const AUTH_CODES = new Set([4, 5, 0x86, 0x87, 0x8c]);

/** node:tls errors about the broker's certificate (not worth a retry, but maybe rotated). */
const CERT_ERROR = /CERT|SELF_SIGNED|ISSUER|ALTNAME|certificate/i;

/** Connects and subscribes; reconnects with backoff and resubscribes by itself. */
export function startMqtt(
  cfg: MqttConfig,
  accept: Accept,
  events: MqttEvents = {},
  group?: GroupCommit,
): mqtt.MqttClient {
  const client = mqtt.connect(cfg.url, {
    clientId: cfg.clientId,
    clean: false,
    protocolVersion: cfg.protocolVersion ?? 5,
    // MQTT 3.1.1 has no session expiry: a clean:false session lasts until the broker drops it.
    properties: cfg.protocolVersion === 4
      ? undefined
      : { sessionExpiryInterval: SESSION_EXPIRY_SECONDS },
    keepalive: 30,
    reconnectPeriod: 1000,
    connectTimeout: 10_000,
    resubscribe: false,
    username: cfg.username,
    password: cfg.password,
    ca: cfg.ca ? [cfg.ca] : undefined,
    cert: cfg.cert,
    key: cfg.key,
    rejectUnauthorized: true,
    // mqtt.js logs through `debug` several times per packet; that costs even when off.
    log: () => {},
  });
  let connected = false;
  let backpressureSince = 0;
  let lastError = "";
  // Reconnect backoff: 1 s doubling to 30 s, reset once connected.
  client.on("reconnect", () => {
    client.options.reconnectPeriod = Math.min(30_000, (client.options.reconnectPeriod ?? 1000) * 2);
  });

  // The broker's count of dropped messages (lib/brokerdrops.ts).
  const dropCounter = new DropCounter();
  let dropWatchRefused = false;
  const drops = (payload: Uint8Array) => {
    const r = dropCounter.observe(payload);
    const hint = "the broker's queue for a slow or offline client is full: " +
      "raise max_queued_messages (deploy/mosquitto.conf)";
    if (r.kind === "first" && r.total > 0) {
      log("warn", "the broker has dropped messages since it started (all its clients)", {
        broker: cfg.url,
        dropped_total: r.total,
        hint,
      });
    } else if (r.kind === "new") {
      log("error", "the broker dropped messages for a client whose queue was full: they are lost", {
        broker: cfg.url,
        dropped: r.dropped,
        dropped_total: r.total,
        hint,
      });
      events.brokerDropped?.(r.dropped);
    }
  };

  // The open group: the socket its PUBACKs are corked in, and how many there are.
  let open: { stream: mqtt.MqttClient["stream"]; messages: number } | null = null;
  // Disk error: acknowledge nothing that is not durable. Dropping the connection
  // discards the PUBACKs corked in it; the broker sends those messages again.
  const failed = (e: unknown, messages: number) => {
    group?.rollback();
    open = null;
    log("error", "cannot spool message, not acknowledging", { messages, error: e });
    client.end(true, () => client.reconnect());
  };
  // Commits the open group, then lets its PUBACKs go.
  const flush = () => {
    const g = open;
    if (!g || !group) return;
    open = null;
    try {
      group.commit();
    } catch (e) {
      failed(e, g.messages);
      return;
    }
    g.stream.uncork();
  };

  client.handleMessage = (packet, done) => {
    const topic = packet.topic;
    const payload = packet.payload as Uint8Array;
    // No ingest filter matches a `$` topic (MQTT 4.7.2): these are our own watches.
    if (topic.startsWith("$SYS/")) {
      if (topic === DROPPED_TOPIC) drops(payload);
      done();
      return;
    }
    // The RETAIN flag is only set on a copy the broker replays because we
    // subscribed (MQTT 3.3.1.3; live deliveries have it cleared): a message
    // already delivered to the stream's subscribers when it was published.
    // Ingesting it would store it again after every reconnect.
    if (packet.retain) {
      log("info", "retained message not ingested (a replay, not a new publication)", { topic });
      done();
      return;
    }
    events.received?.();
    if (open && open.stream !== client.stream) flush();
    const stream = client.stream; // the connection this delivery came on
    const tryAccept = () => {
      // Waiting for room and the connection broke: the broker sends the
      // message again on the next one; taking this copy too would store it twice.
      if (stream !== client.stream || stream.destroyed) {
        log("info", "connection lost while the spool was full; the broker will send it again", {
          topic,
        });
        return;
      }
      let ok: boolean;
      try {
        ok = accept(topic, payload);
      } catch (e) {
        failed(e, (open?.messages ?? 0) + 1);
        return;
      }
      if (ok) {
        if (backpressureSince) {
          log("info", "spool has room again, acknowledging", {
            waited_ms: Date.now() - backpressureSince,
          });
          backpressureSince = 0;
        }
        if (!group) {
          done();
          return;
        }
        if (!open) {
          open = { stream: client.stream, messages: 0 };
          open.stream.cork();
          // Runs once every message already read from the socket is staged.
          setImmediate(flush);
        }
        open.messages++;
        done(); // its PUBACK waits in the corked socket
        if (open && open.messages >= MAX_GROUP) flush();
        return;
      }
      flush(); // what is staged can be acknowledged meanwhile
      if (!backpressureSince) {
        backpressureSince = Date.now();
        log("error", "spool full: not acknowledging until the database catches up", { topic });
      }
      setTimeout(tryAccept, 100);
    };
    tryAccept();
  };

  client.on("connect", (connack) => {
    connected = true;
    lastError = "";
    client.options.reconnectPeriod = 1000;
    events.connected?.(true);
    log("info", "broker connected", {
      broker: cfg.url,
      client_id: cfg.clientId,
      session_present: connack.sessionPresent,
    });
    // Retain Handling 2 (MQTT 5): no retained replays at all; 3.1.1 has no such option.
    const options = cfg.protocolVersion === 4 ? { qos: 1 as const } : { qos: 1 as const, rh: 2 };
    client.subscribe(cfg.topic, options, (err, granted) => {
      const code = granted?.[0]?.qos;
      if (err || code === undefined || code >= 0x80) {
        const reason = `subscription to ${cfg.topic} refused` +
          (err ? `: ${err.message}` : ` (code ${code})`);
        log("error", reason);
        events.fatal?.(reason);
        return;
      }
      log("info", "subscribed", { topic: cfg.topic, qos: code });
      events.subscribed?.(cfg.topic);
      client.subscribe(DROPPED_TOPIC, { qos: 0 }, (err, granted) => {
        const code = granted?.[0]?.qos;
        if ((err || code === undefined || code >= 0x80) && !dropWatchRefused) {
          dropWatchRefused = true;
          log("info", "the broker does not let us watch its dropped-message count", {
            topic: DROPPED_TOPIC,
            hint: "Mosquitto: allow reading this $SYS topic in the ACL to detect drops",
          });
        }
      });
    });
  });
  client.on("close", () => {
    if (connected) {
      connected = false;
      events.connected?.(false);
      if (client.disconnecting) log("info", "broker disconnected", { broker: cfg.url });
      else log("warn", "broker connection lost, reconnecting", { broker: cfg.url });
    }
  });
  client.on("error", (err) => {
    const code = (err as { code?: number }).code;
    if (typeof code === "number" && AUTH_CODES.has(code)) {
      const reason = `broker refused the connection: ${err.message}`;
      log("error", reason, {
        broker: cfg.url,
        client_id: cfg.clientId,
        hint: "check MQTT_USERNAME, MQTT_PASSWORD (or MQTT_CERT) and the broker's ACL",
      });
      events.fatal?.(reason);
      return;
    }
    if (err.message !== lastError) {
      const tls = CERT_ERROR.test(`${(err as { code?: unknown }).code ?? ""} ${err.message}`);
      log(tls ? "error" : "warn", tls ? "broker certificate not trusted" : "broker error", {
        broker: cfg.url,
        error: err.message,
        hint: tls
          ? "check MQTT_CA, and that INGEST_STREAM names a host in the broker's certificate"
          : undefined,
      });
    }
    lastError = err.message;
  });
  return client;
}

/**
 * The running service: spool, writer and MQTT client wired together, with an
 * ordered stop. `main.ts` drives it from signals; tests start it in-process.
 */

import type { MqttClient } from "mqtt";
import type { Config } from "./config.ts";
import { connect, type Sql } from "./db.ts";
import { type OpsServer, startHttp } from "./http.ts";
import { log } from "./log.ts";
import { Metrics } from "./metrics.ts";
import { type MqttEvents, startMqtt } from "./mqtt.ts";
import { Provisioner } from "./provision.ts";
import { RejectStore } from "./rejects.ts";
import { SchemaCache } from "./schema.ts";
import { Spool } from "./spool.ts";
import { replacePrevious } from "./subscription.ts";
import { Writer, type WriterEvents } from "./writer.ts";

export interface ServiceHooks {
  readonly writer?: WriterEvents;
  readonly mqtt?: MqttEvents;
  /** Writer timings that tests shorten (defaults in lib/writer.ts). */
  readonly writerTimings?: { readonly loneCancelWaitMs?: number };
}

export interface Service {
  readonly spool: Spool;
  readonly writer: Writer;
  readonly client: MqttClient;
  readonly sql: Sql;
  readonly metrics: Metrics;
  /** Health, readiness and metrics endpoint; null when HTTP_PORT=0. */
  readonly http: OpsServer | null;
  /** Ready = broker connected, last database write or check succeeded, not stopping. */
  ready(): { ready: boolean; checks: { mqtt: boolean; database: boolean } };
  /** Resolves with a reason when the service cannot go on (e.g. refused credentials). */
  readonly fatal: Promise<string>;
  /** Stops taking messages, writes what is pending within `deadlineMs`, closes. */
  stop(deadlineMs?: number): Promise<{ drained: boolean; pending: number }>;
}

/** Starts the service; it keeps running until `stop()`. */
export function startService(config: Config, hooks: ServiceHooks = {}): Service {
  const spool = Spool.open(config.stateDir, { sync: config.spoolSync });
  if (spool.count > 0) {
    log("info", "spool has messages from a previous run", { messages: spool.count });
  }
  const metrics = new Metrics();
  metrics.watchSpool(spool);
  let stopping: Promise<{ drained: boolean; pending: number }> | null = null;
  const ready = () => {
    const checks = { mqtt: client.connected, database: writer.databaseOk };
    return { ready: !stopping && checks.mqtt && checks.database, checks };
  };
  let http: OpsServer | null = null;
  try {
    if (config.httpPort !== 0) {
      http = startHttp(config.httpHost, config.httpPort, {
        ready,
        metrics: () => metrics.render(),
      });
    }
  } catch (e) {
    spool.close();
    throw e;
  }
  const sql = connect(config.db);
  const errorsSql = config.errorsDb.database === config.db.database
    ? sql
    : connect(config.errorsDb);
  const writer = new Writer({
    spool,
    sql,
    errorsSql,
    schema: new SchemaCache(sql, config.schema),
    rejects: new RejectStore(config.schema, `${config.mqtt.clientId}/${spool.epoch}`),
    clientId: config.mqtt.clientId,
    batchMaxMessages: config.batchMaxMessages,
    batchMaxWaitMs: config.batchMaxWaitMs,
    events: both<WriterEvents>(metrics.writer, hooks.writer),
    provision: config.autoCreateTables ? new Provisioner(sql, config.schema) : undefined,
    ...hooks.writerTimings,
  });
  const writing = writer.start();

  let onFatal: (reason: string) => void = () => {};
  const fatal = new Promise<string>((resolve) => (onFatal = resolve));
  writing.catch((e) => onFatal(`writer stopped: ${(e as Error).message}`));
  const client = startMqtt(config.mqtt, (topic, payload) => {
    if (spool.bytes >= config.spoolMaxBytes) return false;
    spool.stage(topic, payload, Date.now());
    metrics.acknowledged();
    return true;
  }, {
    ...both<MqttEvents>(metrics.mqtt, hooks.mqtt),
    fatal(reason) {
      hooks.mqtt?.fatal?.(reason);
      onFatal(reason);
    },
    subscribed(topic) {
      hooks.mqtt?.subscribed?.(topic);
      replacePrevious(client, config.stateDir, config.mqtt.clientId, topic);
    },
  }, {
    // One spool transaction per socket read; PUBACKs go out after it (lib/mqtt.ts).
    commit: () => {
      if (spool.commit() > 0) writer.notify();
    },
    rollback: () => spool.rollback(),
  });

  const stop = (deadlineMs = 20_000) =>
    stopping ??= (async () => {
      // Stop taking messages first, then write what is pending.
      await client.endAsync(true).catch(() => {});
      const drained = await writer.stop(deadlineMs);
      await Promise.allSettled([sql.end({ timeout: 5 }), errorsSql.end({ timeout: 5 })]);
      await http?.close();
      const pending = spool.count;
      spool.close();
      return { drained, pending };
    })();
  return { spool, writer, client, sql, metrics, http, ready, fatal, stop };
}

/** Hooks that call `a`'s function, then `b`'s, for every event either has. */
function both<T extends object>(a: T, b: T | undefined): T {
  if (!b) return a;
  const out: Record<string, unknown> = { ...(b as Record<string, unknown>) };
  for (const [k, f] of Object.entries(a)) {
    const g = out[k];
    out[k] = typeof g !== "function" ? f : (...args: unknown[]) => {
      f(...args);
      g(...args);
    };
  }
  return out as T;
}

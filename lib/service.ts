/**
 * The running service: spool, writer and MQTT client wired together, with an
 * ordered stop. `main.ts` drives it from signals; tests start it in-process.
 */

import type { MqttClient } from "mqtt";
import type { Config } from "./config.ts";
import { connect, type Sql } from "./db.ts";
import { log } from "./log.ts";
import { type MqttEvents, startMqtt } from "./mqtt.ts";
import { RejectStore } from "./rejects.ts";
import { SchemaCache } from "./schema.ts";
import { Spool } from "./spool.ts";
import { Writer, type WriterEvents } from "./writer.ts";

export interface ServiceHooks {
  readonly writer?: WriterEvents;
  readonly mqtt?: MqttEvents;
}

export interface Service {
  readonly spool: Spool;
  readonly writer: Writer;
  readonly client: MqttClient;
  readonly sql: Sql;
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
    events: hooks.writer,
  });
  const writing = writer.start();

  let onFatal: (reason: string) => void = () => {};
  const fatal = new Promise<string>((resolve) => (onFatal = resolve));
  writing.catch((e) => onFatal(`writer stopped: ${(e as Error).message}`));
  const client = startMqtt(config.mqtt, (topic, payload) => {
    if (spool.bytes >= config.spoolMaxBytes) return false;
    spool.append(topic, payload, Date.now());
    writer.notify();
    return true;
  }, {
    ...hooks.mqtt,
    fatal(reason) {
      hooks.mqtt?.fatal?.(reason);
      onFatal(reason);
    },
  });

  let stopping: Promise<{ drained: boolean; pending: number }> | null = null;
  const stop = (deadlineMs = 20_000) =>
    stopping ??= (async () => {
      // Stop taking messages first, then write what is pending.
      await client.endAsync(true).catch(() => {});
      const drained = await writer.stop(deadlineMs);
      await Promise.allSettled([sql.end({ timeout: 5 }), errorsSql.end({ timeout: 5 })]);
      const pending = spool.count;
      spool.close();
      return { drained, pending };
    })();
  return { spool, writer, client, sql, fatal, stop };
}

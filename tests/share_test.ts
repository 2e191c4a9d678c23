/**
 * Scaling out: two instances with the same INGEST_SHARE_GROUP (own client id,
 * own spool) split one stream through `$share/<group>/<topic>` on the local
 * Mosquitto. Every message must land exactly once across them.
 */

import assert from "node:assert/strict";
import { loadConfig } from "../lib/config.ts";
import { setLogLevel } from "../lib/log.ts";
import { type Service, startService } from "../lib/service.ts";
import {
  adminSql,
  clearSession,
  ensureTestDatabase,
  LOCAL_BROKER,
  parseMetrics,
  publishAll,
  publisher,
  reading,
  TEST_DATABASE,
  testSchema,
  uid,
  until,
} from "./helpers/ops.ts";

const npmSockets = { sanitizeResources: false, sanitizeOps: false };
const N = 2000;

/** Resolves once the service's subscription is acknowledged. */
function subscribed(service: Service): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no SUBACK within 10 s")), 10_000);
    service.client.on("packetreceive", (packet) => {
      if (packet.cmd === "suback") {
        clearTimeout(timer);
        resolve();
      }
    });
  });
}

async function counts(service: Service): Promise<{ received: number; stored: number }> {
  const m = parseMetrics((await service.metrics.render()).body);
  return {
    received: m.get("sif_messages_received_total") ?? -1,
    stored: m.get("sif_messages_stored_total") ?? -1,
  };
}

Deno.test({
  name: `two instances in one share group: ${N} messages land exactly once, both take part`,
  ...npmSockets,
  fn: async () => {
    await ensureTestDatabase();
    const sql = adminSql();
    const schema = await testSchema(sql);
    const id = uid();
    const topic = `test/share-${id}`;
    const services: Service[] = [];
    const clientIds: string[] = [];
    const stateDirs: string[] = [];
    const pub = await publisher();
    // Both start at once on a fresh schema: neither may see the database as down
    // (CREATE TABLE IF NOT EXISTS races between instances).
    const databaseDown: number[] = [];
    setLogLevel("error");
    try {
      for (const n of [1, 2]) {
        const stateDir = await Deno.makeTempDir({ prefix: `sif-share-${n}-` });
        stateDirs.push(stateDir);
        const config = loadConfig({
          ENV: "DEVELOPMENT",
          INGEST_STREAM: LOCAL_BROKER,
          MQTT_TOPIC: `${topic}/#`,
          INGEST_SHARE_GROUP: `g${id}`,
          MQTT_CLIENT_ID: `sif-test-share-${id}-${n}`,
          TS_HOST: "127.0.0.1",
          TS_USER: "postgres",
          TS_DATABASE: TEST_DATABASE,
          TS_SCHEMA: schema.name,
          STATE_DIR: stateDir,
          AUTO_CREATE_TABLES: "false",
          HTTP_PORT: "0",
          BATCH_MAX_WAIT_MS: "5",
          LOG_LEVEL: "error",
        });
        assert.equal(config.mqtt.topic, `$share/g${id}/${topic}/#`);
        clientIds.push(config.mqtt.clientId);
        const service = startService(config, {
          writer: { database: (ok) => void (ok || databaseDown.push(n)) },
        });
        services.push(service);
        await subscribed(service);
      }

      const payloads = Array.from({ length: N }, (_, i) => reading(i));
      await publishAll(pub, `${topic}/${id}`, payloads);

      await until(
        async () => {
          const [a, b] = await Promise.all(services.map(counts));
          return a!.stored + b!.stored === N && services.every((s) => s.spool.count === 0);
        },
        60_000,
        `${N} messages stored`,
      );

      const [a, b] = await Promise.all(services.map(counts));
      assert.equal(a!.received + b!.received, N, "no message delivered twice");
      assert.ok(a!.stored > 0 && b!.stored > 0, `both took part: ${a!.stored} + ${b!.stored}`);
      const [row] = await sql.unsafe<{ n: number; distinct: number; lo: number; hi: number }[]>(
        `SELECT count(*)::int AS n, count(DISTINCT value)::int AS distinct,
                min(value) AS lo, max(value) AS hi FROM ${schema.table}`,
      );
      assert.deepEqual({ ...row }, { n: N, distinct: N, lo: 0, hi: N - 1 });
      assert.deepEqual(databaseDown, []);
    } finally {
      await Promise.all(services.map((s) => s.stop(5000)));
      await pub.endAsync();
      await Promise.all(clientIds.map((c) => clearSession(c).catch(() => {})));
      for (const d of stateDirs) await Deno.remove(d, { recursive: true }).catch(() => {});
      await schema[Symbol.asyncDispose]();
      await sql.end({ timeout: 5 });
    }
  },
});

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

Deno.test({
  name: "joining a share group under the same client id drops the old subscription: no doubles",
  ...npmSockets,
  fn: async () => {
    await ensureTestDatabase();
    const sql = adminSql();
    const schema = await testSchema(sql);
    const id = uid();
    const topic = `test/rejoin-${id}`;
    const clientId = `sif-test-rejoin-${id}`;
    const stateDir = await Deno.makeTempDir({ prefix: "sif-rejoin-" });
    const pub = await publisher();
    let service: Service | null = null;
    setLogLevel("error");
    const start = async (group: string | undefined) => {
      const config = loadConfig({
        ENV: "DEVELOPMENT",
        INGEST_STREAM: LOCAL_BROKER,
        MQTT_TOPIC: `${topic}/#`,
        INGEST_SHARE_GROUP: group ?? "",
        MQTT_CLIENT_ID: clientId,
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
      const s = startService(config);
      await subscribed(s);
      return s;
    };
    try {
      // First without a group, then (same client id, same spool) in a group.
      service = await start(undefined);
      await service.stop(5000);
      service = await start(`g${id}`);
      // The old subscription is dropped right after the new one is granted.
      await until(
        async () => {
          try {
            const saved = JSON.parse(await Deno.readTextFile(`${stateDir}/subscription.json`));
            return saved.topic === `$share/g${id}/${topic}/#`;
          } catch {
            return false;
          }
        },
        10_000,
        "the new subscription remembered",
      );

      await publishAll(pub, `${topic}/0`, Array.from({ length: 50 }, (_, i) => reading(i)));
      const svc = service;
      await until(
        async () => (await counts(svc)).stored >= 50 && svc.spool.count === 0,
        15_000,
        "50 stored",
      );
      await new Promise((r) => setTimeout(r, 300)); // doubles would arrive meanwhile
      assert.deepEqual(await counts(svc), { received: 50, stored: 50 });
      const [row] = await sql.unsafe<{ n: number }[]>(
        `SELECT count(*)::int AS n FROM ${schema.table}`,
      );
      assert.equal(row!.n, 50);
    } finally {
      await service?.stop(5000);
      await pub.endAsync();
      await clearSession(clientId).catch(() => {});
      await Deno.remove(stateDir, { recursive: true }).catch(() => {});
      await schema[Symbol.asyncDispose]();
      await sql.end({ timeout: 5 });
    }
  },
});

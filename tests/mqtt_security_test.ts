/**
 * MQTT security, run as the production binary would (subprocess with the
 * compile task's flags, ENV=PRODUCTION) against a throwaway Mosquitto with a
 * test CA and a password file: the right CA connects and ingests, a wrong CA
 * is refused with a clear error, a wrong password ends the process non-zero.
 */

import assert from "node:assert/strict";
import { type MqttInstance, startMosquitto, type TestCerts } from "./helpers/servers.ts";
import { makeTestCerts } from "./helpers/servers.ts";
import {
  adminSql,
  ensureTestDatabase,
  type LogLine,
  ProductionProcess,
  publishAll,
  publisher,
  reading,
  TEST_DATABASE,
  testSchema,
  uid,
  until,
} from "./helpers/ops.ts";

const npmSockets = { sanitizeResources: false, sanitizeOps: false };
const USER = "ingest";
const PASSWORD = "s3cret-Pa55";

interface Setup {
  certs: TestCerts;
  broker: MqttInstance;
  sql: ReturnType<typeof adminSql>;
  schema: Awaited<ReturnType<typeof testSchema>>;
  stateDir: string;
  certDir: string;
}

/** TLS broker with a password file, a schema on the local database, a spool folder. */
async function setup(requireClientCert = false): Promise<Setup> {
  await ensureTestDatabase();
  const certDir = await Deno.makeTempDir({ prefix: "sif-mqtt-certs-" });
  const certs = await makeTestCerts(certDir, { clientCommonName: USER });
  const broker = await startMosquitto({
    tls: { certs, requireClientCert },
    passwordFile: { user: USER, password: PASSWORD },
  });
  const sql = adminSql();
  const schema = await testSchema(sql);
  const stateDir = await Deno.makeTempDir({ prefix: "sif-mqtt-state-" });
  return { certs, broker, sql, schema, stateDir, certDir };
}

async function teardown(s: Setup): Promise<void> {
  await s.schema[Symbol.asyncDispose]();
  await s.sql.end({ timeout: 5 });
  await s.broker.destroy();
  for (const d of [s.stateDir, s.certDir]) await Deno.remove(d, { recursive: true });
}

function env(s: Setup, overrides: Record<string, string>): Record<string, string> {
  return {
    ENV: "PRODUCTION",
    INGEST_STREAM: s.broker.url, // mqtts://localhost:PORT
    MQTT_CA: s.certs.caCert,
    MQTT_USERNAME: USER,
    MQTT_PASSWORD: PASSWORD,
    MQTT_CLIENT_ID: `sif-test-sec-${uid()}`,
    TS_HOST: "127.0.0.1",
    TS_USER: "postgres",
    TS_DATABASE: TEST_DATABASE,
    PGSSLMODE: "disable",
    TS_SCHEMA: s.schema.name,
    STATE_DIR: s.stateDir,
    HTTP_PORT: "0",
    ...overrides,
  };
}

/** A publisher that trusts the test CA and knows the password. */
function goodPublisher(s: Setup) {
  return publisher(s.broker.url, {
    ca: [Deno.readTextFileSync(s.certs.caCert)],
    username: USER,
    password: PASSWORD,
    cert: Deno.readTextFileSync(s.certs.clientCert),
    key: Deno.readTextFileSync(s.certs.clientKey),
  });
}

async function rows(s: Setup): Promise<number> {
  const r = await s.sql.unsafe<{ n: number }[]>(`SELECT count(*)::int AS n FROM ${s.schema.table}`);
  return r[0]!.n;
}

/** No log line may carry the password. */
function assertNoSecret(lines: LogLine[]): void {
  for (const l of lines) assert.ok(!JSON.stringify(l).includes(PASSWORD), JSON.stringify(l));
}

Deno.test({
  name: "mqtts with the right CA and password: connects and stores a message end to end",
  ...npmSockets,
  fn: async () => {
    const s = await setup();
    const p = ProductionProcess.start(env(s, {}));
    try {
      await p.waitFor("subscribed", 30_000);
      const pub = await goodPublisher(s);
      await publishAll(pub, "ingest/stream/0", [reading(7)]);
      await pub.endAsync();
      await until(async () => (await rows(s)) === 1, 15_000, "the row");
      p.signal("SIGTERM");
      assert.equal(await p.exit(25_000), 0, p.tail());
      assert.deepEqual(p.other, []);
      assert.equal(p.find("broker connected").length, 1);
      // A deliberate disconnect on SIGTERM is not reported as a lost connection.
      assert.equal(p.find("broker disconnected").length, 1);
      assert.equal(p.find("broker connection lost, reconnecting").length, 0);
      assert.equal(p.lines[0]!.broker, `mqtts://localhost:${s.broker.port}`);
      assertNoSecret(p.lines);
    } finally {
      p.signal("SIGKILL");
      await p.status;
      await teardown(s);
    }
  },
});

Deno.test({
  name: "mqtts with client certificate and key (mutual TLS): connects and stores",
  ...npmSockets,
  fn: async () => {
    const s = await setup(true);
    const p = ProductionProcess.start(env(s, {
      MQTT_CERT: s.certs.clientCert,
      MQTT_KEY: s.certs.clientKey,
    }));
    try {
      await p.waitFor("subscribed", 30_000);
      const pub = await goodPublisher(s);
      await publishAll(pub, "ingest/stream/0", [reading(8)]);
      await pub.endAsync();
      await until(async () => (await rows(s)) === 1, 15_000, "the row");
      p.signal("SIGTERM");
      assert.equal(await p.exit(25_000), 0, p.tail());
    } finally {
      p.signal("SIGKILL");
      await p.status;
      await teardown(s);
    }
  },
});

Deno.test({
  name: "mqtts with the wrong CA: refused with a clear error, nothing ingested",
  ...npmSockets,
  fn: async () => {
    const s = await setup();
    const e = env(s, { MQTT_CA: s.certs.wrongCaCert });
    const p = ProductionProcess.start(e);
    try {
      const line = await p.waitFor("broker certificate not trusted", 30_000);
      assert.equal(line.level, "error");
      assert.equal(line.error, "self-signed certificate in certificate chain");
      assert.match(String(line.hint), /MQTT_CA/);
      const pub = await goodPublisher(s);
      await publishAll(pub, "ingest/stream/0", [reading(9)]);
      await pub.endAsync();
      await new Promise((r) => setTimeout(r, 3000));
      assert.equal(await rows(s), 0);
      assert.equal(p.find("broker connected").length, 0);
      // Reconnects go on with backoff (the broker may be mid-rotation), logged once.
      assert.equal(p.find("broker certificate not trusted").length, 1);
      p.signal("SIGTERM");
      assert.equal(await p.exit(25_000), 0, p.tail());
      assertNoSecret(p.lines);
    } finally {
      p.signal("SIGKILL");
      await p.status;
      await teardown(s);
    }
  },
});

Deno.test({
  name: "wrong MQTT password: one clear error, exit non-zero within seconds",
  ...npmSockets,
  fn: async () => {
    const s = await setup();
    const e = env(s, { MQTT_PASSWORD: "wrong-password" });
    const started = Date.now();
    const p = ProductionProcess.start(e);
    try {
      const code = await p.exit(15_000);
      const seconds = (Date.now() - started) / 1000;
      assert.equal(code, 1, p.tail());
      assert.ok(seconds < 5, `exit after ${seconds} s`);
      const errors = p.lines.filter((l) => l.level === "error");
      assert.deepEqual(errors.map((l) => l.msg), [
        "broker refused the connection: Connection refused: Not authorized",
      ]);
      assert.match(String(errors[0]!.hint), /MQTT_USERNAME, MQTT_PASSWORD/);
      assert.equal(p.lines.filter((l) => l.level === "warn").length, 0, p.tail());
      assert.deepEqual(p.other, []);
      assert.ok(!JSON.stringify(p.lines).includes("wrong-password"));
    } finally {
      p.signal("SIGKILL");
      await p.status;
      await teardown(s);
    }
  },
});

Deno.test("config: MQTT_CA, MQTT_CERT and MQTT_KEY are checked at start-up", async () => {
  const { ConfigError, loadConfig } = await import("../lib/config.ts");
  const dir = await Deno.makeTempDir({ prefix: "sif-mqtt-pem-" });
  const problemsOf = (env: Record<string, string>): string[] => {
    try {
      loadConfig({ ENV: "DEVELOPMENT", INGEST_STREAM: "broker:8883", TS_HOST: "db", ...env });
    } catch (e) {
      if (e instanceof ConfigError) return e.problems;
      throw e;
    }
    return [];
  };
  try {
    const certs = await makeTestCerts(dir);
    const garbage = `${dir}/garbage.pem`;
    await Deno.writeTextFile(garbage, "not PEM\n");
    assert.deepEqual(problemsOf({ MQTT_CA: certs.caCert }), []);
    assert.deepEqual(problemsOf({ MQTT_CA: garbage }), [
      `MQTT_CA: ${garbage} holds no PEM certificate ("-----BEGIN CERTIFICATE-----")`,
    ]);
    // A key given as the certificate and the other way round.
    assert.deepEqual(
      problemsOf({ MQTT_CA: certs.caCert, MQTT_CERT: certs.caKey, MQTT_KEY: certs.caCert }),
      [
        `MQTT_CERT: ${certs.caKey} holds no PEM certificate ("-----BEGIN CERTIFICATE-----")`,
        `MQTT_KEY: ${certs.caCert} holds no PEM private key ("PRIVATE KEY-----")`,
      ],
    );
    assert.deepEqual(problemsOf({ MQTT_CA: certs.caCert, MQTT_CERT: certs.caCert }), [
      "MQTT_CERT and MQTT_KEY go together: set both or neither",
    ]);
    assert.deepEqual(problemsOf({ MQTT_CERT: certs.caCert, MQTT_KEY: certs.caKey }), []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

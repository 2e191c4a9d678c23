/**
 * The compiled binary runs with the permissions baked in by `deno task compile`.
 * The build cannot run here (it downloads the Deno runtime), so `main.ts` runs
 * as a subprocess with exactly those flags (read from deno.json): a missing
 * permission fails here, not on the EC2 instance.
 */

import assert from "node:assert/strict";
import { freePort } from "./helpers/servers.ts";
import {
  adminSql,
  clearSession,
  compileFlags,
  ensureTestDatabase,
  get,
  metric,
  ProductionProcess,
  publishAll,
  publisher,
  reading,
  TEST_DATABASE,
  testSchema,
  uid,
  until,
} from "./helpers/ops.ts";
import { VERSION } from "../lib/version.ts";

const npmSockets = { sanitizeResources: false, sanitizeOps: false };

/** Every setting PRODUCTION requires, pointing at the local services. */
function productionEnv(stateDir: string, schema: string, id: string): Record<string, string> {
  return {
    ENV: "PRODUCTION",
    INGEST_STREAM: "127.0.0.1:1883",
    TS_HOST: "127.0.0.1",
    TS_PORT: "5432",
    TS_USER: "postgres",
    TS_DATABASE: TEST_DATABASE,
    PGSSLMODE: "disable",
    STATE_DIR: stateDir,
    TS_SCHEMA: schema,
    MQTT_CLIENT_ID: `sif-test-prod-${id}`,
    MQTT_TOPIC: `test/prod-${id}/#`,
    HTTP_PORT: "0",
  };
}

Deno.test("compile tasks: narrow permissions, the same for both targets, nothing baked in", () => {
  const x86 = compileFlags("compile");
  const arm = compileFlags("compile:aarch64");
  assert.deepEqual(arm, x86);
  assert.deepEqual(x86, [
    "--allow-net",
    "--allow-env",
    "--allow-read",
    "--allow-write",
    "--allow-sys=hostname",
    // Young generation capped at 4 MB semi-spaces: about 40 MB less peak RSS at
    // 20,000 msg/s with no measurable cost in rate (bench/RESULTS.md).
    "--v8-flags=--max-semi-space-size=4",
  ]);
});

Deno.test("--version and --help exit 0 before any configuration is read", async () => {
  // ENV=nonsense would fail the configuration: these must not even look at it.
  const version = ProductionProcess.start({ ENV: "nonsense" }, ["--version"]);
  assert.equal(await version.exit(30_000), 0);
  assert.deepEqual(version.other, [`sif-stream-broker ${VERSION}`]);
  const help = ProductionProcess.start({ ENV: "nonsense" }, ["--help"]);
  assert.equal(await help.exit(30_000), 0);
  // Plain text, not log lines: the version line, then the settings summary.
  const lines = help.other;
  assert.equal(
    lines[0],
    `sif-stream-broker ${VERSION}: IR messages from MQTT into PostgreSQL/TimescaleDB`,
  );
  for (const setting of ["INGEST_STREAM", "TS_HOST", "MQTT_CA", "HTTP_PORT", "LOG_LEVEL"]) {
    assert.ok(lines.some((l) => l.trim().split(/\s+/).includes(setting)), setting);
  }
});

Deno.test("PRODUCTION without TS_HOST: exit 2 with one line naming it", async () => {
  const env = productionEnv("/nonexistent/never-created", "public", uid());
  delete env.TS_HOST;
  const p = ProductionProcess.start(env);
  assert.equal(await p.exit(30_000), 2);
  assert.deepEqual(p.other, []);
  assert.equal(p.lines.length, 1, p.tail());
  assert.equal(p.lines[0]!.level, "error");
  assert.equal(p.lines[0]!.msg, "configuration: TS_HOST is required when ENV=PRODUCTION");
});

Deno.test("credentials inside INGEST_STREAM are refused without being echoed", async () => {
  const env = productionEnv("/nonexistent/never-created", "public", uid());
  env.INGEST_STREAM = "mqtts://ingest:hunter2@broker.internal:8883";
  const p = ProductionProcess.start(env);
  assert.equal(await p.exit(30_000), 2);
  assert.deepEqual(p.lines.map((l) => l.msg), [
    'configuration: INGEST_STREAM must be host, host:port or mqtt(s)://host:port (got "mqtts://***@broker.internal:8883"); credentials go in MQTT_USERNAME and MQTT_PASSWORD',
  ]);
});

Deno.test({
  name:
    "PRODUCTION with the compile flags, as under systemd: stores, serves /readyz, SIGTERM exits 0",
  ...npmSockets,
  fn: async () => {
    await ensureTestDatabase();
    const sql = adminSql();
    const schema = await testSchema(sql);
    const id = uid();
    const stateDir = await Deno.makeTempDir({ prefix: "sif-prod-state-" });
    const port = freePort();
    const env: Record<string, string> = {
      ...productionEnv(stateDir, schema.name, id),
      HTTP_PORT: String(port),
    };
    // systemd's StateDirectory= sets STATE_DIRECTORY; STATE_DIR stays unset.
    delete env.STATE_DIR;
    env.STATE_DIRECTORY = stateDir;
    const p = ProductionProcess.start(env);
    const pub = await publisher();
    try {
      await p.waitFor("subscribed", 30_000);
      assert.equal(p.find("starting")[0]?.state_dir, stateDir);
      await until(async () => (await get(port, "/readyz")).status === 200, 15_000, "ready");
      await publishAll(pub, `test/prod-${id}/0`, [reading(42)]);
      const rows = await until(
        async () => {
          const r = await sql.unsafe(`SELECT metric, value FROM ${schema.table}`);
          return r.length > 0 ? r : null;
        },
        15_000,
        "the row",
      );
      assert.deepEqual(rows.map((r) => ({ ...r })), [{ metric: "n", value: 42 }]);
      assert.equal(await metric(port, "sif_messages_stored_total"), 1);
      assert.equal(await metric(port, "sif_rows_written_total"), 1);

      p.signal("SIGTERM");
      assert.equal(await p.exit(25_000), 0, p.tail());
      assert.deepEqual(p.other, [], "nothing but JSON log lines");
      const last = p.lines.at(-1)!;
      assert.equal(last.msg, "stopped");
      assert.equal(last.pending_in_spool, 0);
      // No secret or connection string in the log (the password is not set here,
      // but the URL form with credentials must never appear).
      assert.ok(!p.lines.some((l) => JSON.stringify(l).includes("postgres://")));
    } finally {
      p.signal("SIGKILL");
      await p.status;
      await pub.endAsync();
      await clearSession(env.MQTT_CLIENT_ID!).catch(() => {});
      await Deno.remove(stateDir, { recursive: true }).catch(() => {});
      await schema[Symbol.asyncDispose]();
      await sql.end({ timeout: 5 });
    }
  },
});

/**
 * lib/db.ts: a database that goes away under a stream of small queries must
 * not end the process. postgres.js 3.4.9 queues small writes with
 * setImmediate and, when the connection closed first, throws from that
 * callback (porsager/postgres#1154, #1208): uncaught, it killed the service
 * during `deno task bench --outage`. connect() guards against it.
 */

import assert from "node:assert/strict";
import type { DbConfig } from "../lib/config.ts";
import { connect } from "../lib/db.ts";
import { startPostgres } from "./helpers/servers.ts";

Deno.test({
  name: "connect(): PostgreSQL stopped 4 times under a stream of small queries: " +
    "queries fail and recover, nothing is thrown outside them",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const pg = await startPostgres();
    const uncaught: unknown[] = [];
    const spy = (e: ErrorEvent) => uncaught.push(e.error);
    globalThis.addEventListener("error", spy);
    const cfg: DbConfig = {
      host: pg.host,
      port: pg.port,
      user: pg.user,
      password: undefined,
      database: pg.database,
      sslMode: "disable",
      ca: undefined,
      caPath: undefined,
      explicit: true,
    } as DbConfig;
    const sql = connect(cfg, 2);
    try {
      let failed = 0, done = 0, stop = false;
      const stream = (async () => {
        while (!stop) {
          const batch = Array.from(
            { length: 20 },
            () =>
              sql.begin((tx) => [tx`SELECT 1`, tx`SELECT 2`]).then(
                () => done++,
                () => failed++,
              ),
          );
          await Promise.all(batch);
        }
      })();
      // The race needs a write queued just as the server goes: try a few times.
      for (let cycle = 0; cycle < 4; cycle++) {
        await new Promise((r) => setTimeout(r, 200));
        await pg.stop();
        await new Promise((r) => setTimeout(r, 200));
        await pg.start();
      }
      await new Promise((r) => setTimeout(r, 300));
      stop = true;
      await stream;
      const [row] = await sql`SELECT 42 AS n`;
      assert.equal(row?.n, 42);
      assert.ok(done > 0 && failed > 0, `done ${done}, failed ${failed}`);
      // Without the guard the stray write's TypeError ends the test run (about
      // every other run); with it, nothing else reaches the global handler.
      assert.deepEqual(uncaught.filter((e) => !(e instanceof TypeError)), []);
    } finally {
      globalThis.removeEventListener("error", spy);
      await sql.end({ timeout: 1 });
      await pg.destroy();
    }
  },
});

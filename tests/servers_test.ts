import assert from "node:assert/strict";
import postgres from "postgres";
import mqtt from "mqtt";
import {
  freePort,
  makeTestCerts,
  type MqttInstance,
  pathExists,
  type PgInstance,
  startMosquitto,
  startPostgres,
} from "./helpers/servers.ts";

// npm clients (postgres.js, mqtt.js) keep sockets/timers around briefly after close.
const npmSockets = { sanitizeResources: false, sanitizeOps: false };

async function selectOne(opts: postgres.Options<Record<string, never>>): Promise<number> {
  const sql = postgres({ max: 1, onnotice: () => {}, connect_timeout: 5, ...opts });
  try {
    const rows = await sql<{ x: number }[]>`select 1::int as x`;
    return rows[0]?.x ?? -1;
  } finally {
    await sql.end({ timeout: 1 });
  }
}

async function openssl(args: string[]): Promise<string> {
  const out = await new Deno.Command("openssl", { args, stderr: "inherit" }).output();
  assert.ok(out.success, `openssl ${args.join(" ")} failed`);
  return new TextDecoder().decode(out.stdout);
}

Deno.test("freePort returns a bindable port that is not a system service port", () => {
  const port = freePort();
  assert.ok(port > 1024 && port < 65536);
  assert.notEqual(port, 5432);
  assert.notEqual(port, 1883);
  const l = Deno.listen({ hostname: "127.0.0.1", port });
  l.close();
});

Deno.test("makeTestCerts writes a v3 CA, server (SAN) and client chain", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sif-certs-test-" });
  try {
    const certs = await makeTestCerts(dir);
    const server = await openssl(["x509", "-in", certs.serverCert, "-noout", "-text"]);
    assert.match(server, /Version: 3 \(0x2\)/);
    assert.match(server, /DNS:localhost, IP Address:127\.0\.0\.1/);
    assert.match(server, /CA:FALSE/);
    assert.match(server, /TLS Web Server Authentication/);
    assert.match(server, /Digital Signature, Key Encipherment/);
    const ca = await openssl(["x509", "-in", certs.caCert, "-noout", "-text"]);
    assert.match(ca, /CA:TRUE/);
    const client = await openssl(["x509", "-in", certs.clientCert, "-noout", "-text"]);
    assert.match(client, /TLS Web Client Authentication/);
    assert.match(
      await openssl(["verify", "-CAfile", certs.caCert, certs.serverCert, certs.clientCert]),
      /server\.crt: OK[\s\S]*client\.crt: OK/,
    );
    const wrong = await new Deno.Command("openssl", {
      args: ["verify", "-CAfile", certs.wrongCaCert, certs.serverCert],
      stdout: "null",
      stderr: "null",
    }).output();
    assert.equal(wrong.success, false, "server cert must not verify against the wrong CA");
    assert.equal((await Deno.stat(certs.serverKey)).mode! & 0o777, 0o600);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name: "startPostgres: plain instance answers, survives stop/start and kill/start",
  ...npmSockets,
  fn: async () => {
    const t0 = performance.now();
    const pg = await startPostgres();
    console.log(`postgres (plain) ready in ${Math.round(performance.now() - t0)} ms`);
    try {
      assert.notEqual(pg.port, 5432);
      assert.equal(pg.host, "127.0.0.1");
      const conn = { host: pg.host, port: pg.port, user: "postgres", database: "postgres" };
      assert.equal(await selectOne(conn), 1);

      await pg.stop();
      assert.equal(pg.running, false);
      await assert.rejects(selectOne(conn));
      const t1 = performance.now();
      await pg.start();
      console.log(`postgres restart ready in ${Math.round(performance.now() - t1)} ms`);
      assert.equal(await selectOne(conn), 1);

      await pg.kill();
      assert.equal(pg.running, false);
      await pg.start(); // crash recovery
      assert.equal(await selectOne({ ...conn, host: pg.socketDir }), 1); // unix socket too
    } finally {
      await pg.destroy();
      await pg.destroy(); // idempotent
    }
    assert.equal(await pathExists(pg.dataDir), false);
  },
});

Deno.test({
  name: "startPostgres({ssl}): verified TLS to localhost, wrong CA rejected",
  ...npmSockets,
  fn: async () => {
    const t0 = performance.now();
    const pg = await startPostgres({ ssl: true });
    console.log(`postgres (ssl, incl. certs) ready in ${Math.round(performance.now() - t0)} ms`);
    try {
      assert.ok(pg.certs);
      const ca = await Deno.readTextFile(pg.certs.caCert);
      const sql = postgres({
        host: "localhost",
        port: pg.port,
        user: "postgres",
        database: "postgres",
        ssl: { ca, rejectUnauthorized: true },
        max: 1,
        onnotice: () => {},
        connect_timeout: 5,
      });
      try {
        const rows = await sql<{ ssl: boolean }[]>`
          select ssl from pg_stat_ssl where pid = pg_backend_pid()`;
        assert.equal(rows[0]?.ssl, true);
      } finally {
        await sql.end({ timeout: 1 });
      }

      const wrongCa = await Deno.readTextFile(pg.certs.wrongCaCert);
      await assert.rejects(
        selectOne({
          host: "localhost",
          port: pg.port,
          user: "postgres",
          database: "postgres",
          ssl: { ca: wrongCa, rejectUnauthorized: true },
        }),
      );
    } finally {
      await pg.destroy();
    }
  },
});

function receiveOne(client: mqtt.MqttClient, topic: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no message on ${topic}`)), 5000);
    client.on("message", (t, payload) => {
      if (t !== topic) return;
      clearTimeout(timer);
      resolve(new TextDecoder().decode(payload));
    });
  });
}

Deno.test({
  name: "startMosquitto: subscribe + QoS1 publish round trip, stop/start",
  ...npmSockets,
  fn: async () => {
    const t0 = performance.now();
    const broker = await startMosquitto({ persistence: true });
    console.log(`mosquitto ready in ${Math.round(performance.now() - t0)} ms`);
    try {
      assert.notEqual(broker.port, 1883);
      assert.equal(broker.url, `mqtt://127.0.0.1:${broker.port}`);
      for (const phase of ["first", "after restart"]) {
        const client = await mqtt.connectAsync(broker.url, {
          reconnectPeriod: 0,
          connectTimeout: 5000,
        });
        try {
          await client.subscribeAsync("sif/test", { qos: 1 });
          const got = receiveOne(client, "sif/test");
          await client.publishAsync("sif/test", `hello ${phase}`, { qos: 1 });
          assert.equal(await got, `hello ${phase}`);
        } finally {
          await client.endAsync();
        }
        if (phase === "first") {
          await broker.stop();
          assert.equal(broker.running, false);
          await broker.start();
        }
      }
      assert.ok(await pathExists(`${broker.dir}/mosquitto.db`), "persistence file written");
    } finally {
      await broker.destroy();
      await broker.destroy();
    }
    assert.equal(await pathExists(broker.dir), false);
  },
});

Deno.test({
  name: "startMosquitto: TLS listener + password file",
  ...npmSockets,
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "sif-certs-test-" });
    let broker: MqttInstance | undefined;
    try {
      const certs = await makeTestCerts(dir);
      broker = await startMosquitto({
        tls: { certs },
        passwordFile: { user: "sif", password: "s3cret" },
      });
      assert.equal(broker.url, `mqtts://localhost:${broker.port}`);
      const ca = await Deno.readTextFile(certs.caCert);
      const base = { reconnectPeriod: 0, connectTimeout: 5000, ca, rejectUnauthorized: true };
      await assert.rejects(
        mqtt.connectAsync(broker.url, { ...base, username: "sif", password: "no" }),
      );
      const client = await mqtt.connectAsync(broker.url, {
        ...base,
        username: "sif",
        password: "s3cret",
      });
      try {
        await client.subscribeAsync("sif/tls", { qos: 1 });
        const got = receiveOne(client, "sif/tls");
        await client.publishAsync("sif/tls", "secure", { qos: 1 });
        assert.equal(await got, "secure");
      } finally {
        await client.endAsync();
      }
    } finally {
      await broker?.destroy();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "startMosquitto: mTLS listener requires a client cert signed by the test CA",
  ...npmSockets,
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "sif-certs-test-" });
    let broker: MqttInstance | undefined;
    try {
      const certs = await makeTestCerts(dir);
      broker = await startMosquitto({ tls: { certs, requireClientCert: true } });
      const ca = await Deno.readTextFile(certs.caCert);
      const base = { reconnectPeriod: 0, connectTimeout: 3000, ca, rejectUnauthorized: true };
      await assert.rejects(mqtt.connectAsync(broker.url, base));
      const client = await mqtt.connectAsync(broker.url, {
        ...base,
        cert: await Deno.readTextFile(certs.clientCert),
        key: await Deno.readTextFile(certs.clientKey),
      });
      await client.endAsync();
    } finally {
      await broker?.destroy();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("startup failures throw with the server's log tail and leave nothing behind", async () => {
  await assert.rejects(
    startMosquitto({ extraConfig: "bogus_option 1" }),
    /exited during startup[\s\S]*Unknown configuration variable "bogus_option"/,
  );
  await assert.rejects(
    startPostgres({ extraConfig: "shared_buffers = 'lots'" }),
    /exited during startup[\s\S]*invalid value for parameter "shared_buffers"/,
  );
  // no instance dir owned by this process survives the failed starts
  const base = Deno.env.get("TMPDIR") ?? "/tmp";
  for await (const e of Deno.readDir(base)) {
    if (!/^sif-(pg|mqtt)-/.test(e.name)) continue;
    const owner = await Deno.readTextFile(`${base}/${e.name}/owner.pid`).catch(() => "");
    assert.notEqual(owner, String(Deno.pid), `${e.name} left behind`);
  }
});

Deno.test("helpers leak no ops or resources through a full lifecycle (sanitizers on)", async () => {
  let broker: MqttInstance | undefined;
  let pg: PgInstance | undefined;
  try {
    broker = await startMosquitto({ persistence: true });
    pg = await startPostgres();
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: broker.port });
    conn.close();
    await broker.stop();
    await broker.start();
    await broker.kill();
    await broker.start();
    await pg.stop();
    await pg.start();
    await pg.kill();
    assert.equal(pg.running, false);
    assert.match(await pg.log(), /database system is ready to accept connections/);
  } finally {
    await broker?.destroy();
    await pg?.destroy();
  }
});

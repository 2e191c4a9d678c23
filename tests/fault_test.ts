/**
 * Fault tests: the service as a real subprocess against its own throwaway
 * PostgreSQL cluster and Mosquitto instance (persistence on), with servers
 * stopped, the service killed and signalled while a QoS 1 publisher streams.
 *
 * Every message carries a unique id as its metric name (`m<id>`, one row per
 * message), so the row counts tell stored, duplicated and lost messages
 * apart. The publisher counts a message as acknowledged only when the broker's
 * PUBACK arrived; every acknowledged message must end up stored.
 */

import assert from "node:assert/strict";
import mqtt from "mqtt";
import postgres from "postgres";
import {
  freePort,
  type MqttInstance,
  type PgInstance,
  startMosquitto,
  startPostgres,
} from "./helpers/servers.ts";
import { type LogLine, ServiceProcess } from "./helpers/process.ts";

const npmSockets = { sanitizeResources: false, sanitizeOps: false };
const TOPIC = "ingest/stream/0";

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** Polls `check` until it returns true; throws `what` (and the last detail) after `timeoutMs`. */
async function waitFor(
  what: string,
  check: () => Promise<boolean> | boolean,
  timeoutMs: number,
  detail: () => string = () => "",
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    try {
      if (await check()) return;
    } catch {
      // e.g. the database is still starting: try again
    }
    await sleep(200);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} ${detail()}`);
}

/** One IR message with a unique metric `m<id>`; `value` defaults to the id. */
function message(table: string, id: number, value = id, pad = 0): Uint8Array {
  const msg: Record<string, unknown> = {
    app_id: table,
    data: { time: 1_700_000_000 + id / 1000, device: "fault-test", payload: { [`m${id}`]: value } },
  };
  if (pad > 0) msg.pad = "x".repeat(pad);
  return new TextEncoder().encode(JSON.stringify(msg));
}

/** A QoS 1 publisher that remembers which message ids the broker acknowledged. */
class Publisher {
  readonly acked = new Set<number>();
  /** Ids published after `mark()`; lets a test single out a later phase. */
  readonly marked = new Set<number>();
  sent = 0;
  failed = 0;
  #marking = false;
  #next = 0;
  #timer: ReturnType<typeof setInterval> | undefined;

  private constructor(readonly client: mqtt.MqttClient, readonly table: string) {}

  static async connect(url: string, table: string): Promise<Publisher> {
    const client = mqtt.connect(url, {
      clientId: `fault-publisher-${crypto.randomUUID().slice(0, 8)}`,
      protocolVersion: 4,
      clean: true,
      reconnectPeriod: 300,
      connectTimeout: 5000,
    });
    client.on("error", () => {});
    await new Promise<void>((resolve, reject) => {
      client.once("connect", () => resolve());
      setTimeout(() => reject(new Error("publisher could not connect")), 10_000);
    });
    return new Publisher(client, table);
  }

  /** Publishes one message (QoS 1); returns its id. */
  publish(opts: { value?: number; pad?: number } = {}): number {
    const id = this.#next++;
    this.sent++;
    if (this.#marking) this.marked.add(id);
    this.client.publish(
      TOPIC,
      message(this.table, id, opts.value ?? id, opts.pad ?? 0) as never,
      { qos: 1 },
      (err) => {
        if (err) this.failed++;
        else this.acked.add(id);
      },
    );
    return id;
  }

  /** From now on, remember the ids published. */
  mark(): void {
    this.#marking = true;
  }

  /** Publishes `perSecond` messages a second until `stopStream()`. */
  stream(perSecond: number): void {
    const perTick = Math.max(1, Math.round(perSecond / 100));
    this.#timer = setInterval(() => {
      for (let i = 0; i < perTick; i++) this.publish();
    }, 10);
  }

  stopStream(): void {
    clearInterval(this.#timer);
  }

  /** Waits until every published message was acknowledged or failed. */
  async settled(timeoutMs = 15_000): Promise<void> {
    await waitFor(
      "the broker's PUBACKs",
      () => this.acked.size + this.failed === this.sent,
      timeoutMs,
      () => `(sent ${this.sent}, acked ${this.acked.size}, failed ${this.failed})`,
    );
  }

  async close(): Promise<void> {
    this.stopStream();
    await this.client.endAsync(true).catch(() => {});
  }
}

interface Tally {
  /** Rows in the table. */
  total: number;
  /** Distinct message ids stored. */
  stored: number;
  /** Rows beyond the first of each id. */
  duplicated: number;
  ids: Set<number>;
  /** Ids stored more than once. */
  dupIds: number[];
}

/** One throwaway PostgreSQL + Mosquitto, an app table, a spool folder and the services started. */
class Rig {
  readonly services: ServiceProcess[] = [];
  readonly clientId = `fault-${crypto.randomUUID().slice(0, 8)}`;
  readonly table = `fault_${crypto.randomUUID().slice(0, 8)}`;

  private constructor(
    readonly pg: PgInstance,
    readonly mq: MqttInstance,
    readonly sql: postgres.Sql,
    readonly stateDir: string,
  ) {}

  /** Starts the servers and creates the app table (`extraDdl` may refer to `{table}`). */
  static async open(opts: { valueCheck?: boolean; extraDdl?: string } = {}): Promise<Rig> {
    const [pg, mq] = await Promise.all([startPostgres(), startMosquitto({ persistence: true })]);
    const sql = postgres({
      host: pg.host,
      port: pg.port,
      user: pg.user,
      database: pg.database,
      max: 1,
      connect_timeout: 3,
      onnotice: () => {},
    });
    const stateDir = await Deno.makeTempDir({ prefix: "sif-fault-state-" });
    const rig = new Rig(pg, mq, sql, stateDir);
    await sql.unsafe(`CREATE TABLE public."${rig.table}" (
      time TIMESTAMPTZ NOT NULL,
      metric VARCHAR(128) NOT NULL,
      value DOUBLE PRECISION NOT NULL ${opts.valueCheck ? "CHECK (value >= 0)" : ""})`);
    if (opts.extraDdl) await sql.unsafe(opts.extraDdl.replaceAll("{table}", rig.table));
    return rig;
  }

  /** Starts a service process on this rig (same spool folder and client id every time). */
  start(env: Record<string, string> = {}): ServiceProcess {
    const svc = ServiceProcess.start({
      db: this.pg,
      brokerUrl: this.mq.url,
      stateDir: this.stateDir,
      clientId: this.clientId,
      env,
    });
    this.services.push(svc);
    return svc;
  }

  /** Starts a service and waits until it is subscribed and its database is ready. */
  async startReady(env: Record<string, string> = {}): Promise<ServiceProcess> {
    const svc = this.start(env);
    await svc.waitForLog("subscribed", 20_000);
    await svc.waitForLog("database available", 20_000);
    return svc;
  }

  publisher(): Promise<Publisher> {
    return Publisher.connect(this.mq.url, this.table);
  }

  async tally(): Promise<Tally> {
    const rows = await this.sql.unsafe<{ metric: string; n: number }[]>(
      `SELECT metric, count(*)::int AS n FROM public."${this.table}" GROUP BY metric`,
    );
    const ids = new Set<number>();
    const dupIds: number[] = [];
    let total = 0;
    for (const r of rows) {
      const id = Number(r.metric.slice(1));
      ids.add(id);
      if (r.n > 1) dupIds.push(id);
      total += r.n;
    }
    dupIds.sort((a, b) => a - b);
    return { total, stored: ids.size, duplicated: total - ids.size, ids, dupIds };
  }

  /** Waits until every id in `ids` is stored; returns the final tally. */
  async waitStored(ids: Set<number>, timeoutMs: number): Promise<Tally> {
    let last: Tally | null = null;
    await waitFor(
      `${ids.size} messages stored`,
      async () => {
        last = await this.tally();
        for (const id of ids) if (!last.ids.has(id)) return false;
        return true;
      },
      timeoutMs,
      () => {
        const svc = this.services.at(-1);
        return `(stored ${last?.stored ?? "?"}); service log tail:\n${svc?.tail() ?? ""}`;
      },
    );
    // A moment more, so that late duplicates would be counted too.
    await sleep(1000);
    return await this.tally();
  }

  /** Messages in the spool of the last service started (its metrics; the file is locked). */
  async spoolCount(): Promise<number> {
    const n = (await this.services.at(-1)!.metrics()).get("sif_spool_messages");
    if (n === undefined) throw new Error("no sif_spool_messages in /metrics");
    return n;
  }

  async close(): Promise<void> {
    await Promise.allSettled(this.services.map((s) => s.kill()));
    await this.sql.end({ timeout: 1 }).catch(() => {});
    await Promise.allSettled([this.pg.destroy(), this.mq.destroy()]);
    await Deno.remove(this.stateDir, { recursive: true }).catch(() => {});
  }
}

/** Acknowledged ids that are not stored. */
function lostIds(acked: Set<number>, t: Tally): number[] {
  return [...acked].filter((id) => !t.ids.has(id)).sort((a, b) => a - b);
}

/** The closing-note line: sent / acknowledged / stored / duplicated / lost. */
function report(name: string, pub: Publisher, t: Tally, extra: Record<string, unknown> = {}) {
  const lost = lostIds(pub.acked, t).length;
  console.log(
    `[fault] ${name}: sent=${pub.sent} acked=${pub.acked.size} stored=${t.stored} ` +
      `duplicated=${t.duplicated} lost=${lost}` +
      Object.entries(extra).map(([k, v]) => ` ${k}=${JSON.stringify(v)}`).join(""),
  );
}

function logged(svc: ServiceProcess, msg: string): LogLine[] {
  return svc.find(msg);
}

Deno.test({
  name: "fault 1: PostgreSQL stopped during a QoS 1 stream, then started: every message once",
  ...npmSockets,
  async fn() {
    const rig = await Rig.open();
    let pub: Publisher | undefined;
    try {
      const svc = await rig.startReady();
      pub = await rig.publisher();
      pub.stream(250);
      await sleep(2000);
      await rig.pg.stop();
      await svc.waitForLog("database unavailable, retrying", 10_000);
      await sleep(6000);
      await rig.pg.start();
      await sleep(2000);
      pub.stopStream();
      await pub.settled();
      assert.equal(pub.acked.size, pub.sent, "the broker acknowledged every publish");

      const t = await rig.waitStored(pub.acked, 45_000);
      report("1 postgres outage 6 s", pub, t);
      assert.deepEqual(lostIds(pub.acked, t), []);
      assert.equal(t.stored, pub.sent);
      assert.equal(t.total, pub.sent, "no duplicate rows");
      assert.ok(logged(svc, "database available").length >= 2, "logged the recovery");

      const exit = await svc.stop();
      assert.deepEqual(exit, { code: 0, signal: null });
    } finally {
      await pub?.close();
      await rig.close();
    }
  },
});

/**
 * A TCP proxy in front of PostgreSQL that, once armed, drops the connection
 * right after the server's `CommandComplete "COMMIT"`: the transaction is
 * committed, and the client sees a broken connection instead of the answer.
 */
function commitCuttingProxy(targetPort: number) {
  // 'C', length 11, "COMMIT\0"
  const commitDone = new Uint8Array([0x43, 0, 0, 0, 11, ...new TextEncoder().encode("COMMIT"), 0]);
  const contains = (hay: Uint8Array, needle: Uint8Array) => {
    outer: for (let i = 0; i + needle.length <= hay.length; i++) {
      for (let j = 0; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
      return true;
    }
    return false;
  };
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns = new Set<Deno.Conn>();
  const state = { armed: false, cuts: 0 };
  const closeBoth = (a: Deno.Conn, b: Deno.Conn) => {
    for (const c of [a, b]) {
      conns.delete(c);
      try {
        c.close();
      } catch {
        // already closed
      }
    }
  };
  const pipe = async (from: Deno.Conn, to: Deno.Conn, watch: boolean) => {
    const buf = new Uint8Array(64 * 1024);
    try {
      for (;;) {
        const n = await from.read(buf);
        if (n === null) break;
        const chunk = buf.subarray(0, n);
        if (watch && state.armed && contains(chunk, commitDone)) {
          state.armed = false;
          state.cuts++;
          break;
        }
        let off = 0;
        while (off < n) off += await to.write(chunk.subarray(off));
      }
    } catch {
      // the other direction closed the connection
    }
    closeBoth(from, to);
  };
  (async () => {
    try {
      for await (const client of listener) {
        const server = await Deno.connect({ hostname: "127.0.0.1", port: targetPort });
        conns.add(client).add(server);
        pipe(client, server, false);
        pipe(server, client, true);
      }
    } catch {
      // listener closed
    }
  })();
  return {
    port: (listener.addr as Deno.NetAddr).port,
    state,
    close() {
      listener.close();
      for (const c of [...conns]) closeBoth(c, c);
    },
  };
}

Deno.test({
  name:
    "fault 1b: the connection breaks after COMMIT reached the server: the batch is not written twice",
  ...npmSockets,
  async fn() {
    const rig = await Rig.open();
    const proxy = commitCuttingProxy(rig.pg.port);
    let pub: Publisher | undefined;
    try {
      const svc = await rig.startReady({ TS_PORT: String(proxy.port) });
      pub = await rig.publisher();
      proxy.state.armed = true;
      for (let i = 0; i < 500; i++) pub.publish();
      await pub.settled();
      const t = await rig.waitStored(pub.acked, 30_000);
      report("1b commit answer lost", pub, t, { cuts: proxy.state.cuts });
      assert.equal(proxy.state.cuts, 1, "one COMMIT answer was cut");
      assert.ok(svc.find("database unavailable, retrying").length >= 1);
      assert.equal(t.stored, 500);
      assert.equal(t.total, 500, "the committed batch was not written again");
      assert.deepEqual(await svc.stop(), { code: 0, signal: null });
    } finally {
      proxy.close();
      await pub?.close();
      await rig.close();
    }
  },
});

Deno.test({
  name: "fault 2: service SIGKILLed at random points, restarted: every acknowledged message lands",
  ...npmSockets,
  async fn() {
    const rig = await Rig.open();
    let pub: Publisher | undefined;
    try {
      let svc = await rig.startReady();
      pub = await rig.publisher();
      pub.stream(2000);
      const kills: number[] = [];
      const sentAtKill: number[] = [];
      for (let i = 0; i < 4; i++) {
        const after = 600 + Math.floor(Math.random() * 1400);
        kills.push(after);
        await sleep(after);
        const exit = await svc.kill();
        sentAtKill.push(pub.sent);
        assert.equal(exit.signal, "SIGKILL");
        await sleep(Math.floor(Math.random() * 400));
        svc = rig.start();
      }
      await svc.waitForLog("subscribed", 20_000);
      await sleep(1000);
      pub.stopStream();
      await pub.settled();
      assert.equal(pub.acked.size, pub.sent, "the broker acknowledged every publish");

      const t = await rig.waitStored(pub.acked, 45_000);
      // What the restarts found: spooled messages left by the killed run, and
      // those of them already committed (killed between commit and spool delete).
      const sum = (msg: string) =>
        rig.services.flatMap((s) => s.find(msg)).reduce((n, l) => n + Number(l.messages), 0);
      report("2 service SIGKILL x4", pub, t, {
        kill_after_ms: kills,
        replayed_from_spool: sum("spool has messages from a previous run"),
        skipped_as_committed: sum("skipped spooled messages already committed"),
        sent_at_kill: sentAtKill,
        duplicate_ids: t.dupIds,
      });
      assert.deepEqual(lostIds(pub.acked, t), []);
      assert.equal(t.stored, pub.sent);
      // A duplicate is only possible for a message that was spooled but whose
      // PUBACK died with the process: the broker delivers it again.
      // Mosquitto has at most 20 (max_inflight_messages) unacknowledged
      // messages out to the service, so each kill can cause at most 20.
      assert.ok(t.duplicated <= 4 * 20, `duplicates bounded by in-flight window: ${t.duplicated}`);
      assert.ok(t.dupIds.every((id) => id < sentAtKill.at(-1)!), `duplicates: ${t.dupIds}`);

      const exit = await svc.stop();
      assert.deepEqual(exit, { code: 0, signal: null });
    } finally {
      await pub?.close();
      await rig.close();
    }
  },
});

Deno.test({
  name: "fault 3: Mosquitto restarted during a stream: the service reconnects and resumes",
  ...npmSockets,
  async fn() {
    const rig = await Rig.open();
    let pub: Publisher | undefined;
    try {
      const svc = await rig.startReady();
      pub = await rig.publisher();
      pub.stream(250);
      await sleep(2000);
      await rig.mq.stop();
      const sentBeforeStop = pub.sent;
      await svc.waitForLog("broker connection lost, reconnecting", 10_000);
      await sleep(2000);
      await rig.mq.start();
      const reconnected = await svc.waitForLog(
        (l) => l.msg === "broker connected" && l.session_present === true,
        20_000,
      );
      pub.mark();
      await sleep(2000);
      pub.stopStream();
      await pub.settled(20_000);
      assert.equal(pub.acked.size, pub.sent, "the broker acknowledged every publish");
      assert.ok(pub.marked.size > 300, `published after the restart: ${pub.marked.size}`);

      const t = await rig.waitStored(pub.acked, 45_000);
      report("3 mosquitto restart", pub, t, {
        after_restart: pub.marked.size,
        duplicate_ids: t.dupIds,
      });
      assert.deepEqual(lostIds(pub.marked, t), [], "messages published after the restart land");
      assert.deepEqual(lostIds(pub.acked, t), []);
      assert.equal(t.stored, pub.sent);
      // Duplicates come only from acknowledgements lost when the broker went
      // down: Mosquitto saves, and sends again, what it delivered to the service
      // without seeing the PUBACK yet (at most max_inflight_messages, 20), and
      // the publisher sends again what the broker took without acknowledging.
      // Either way the message was on the wire before the broker stopped.
      assert.ok(t.duplicated <= 40, `duplicates within the in-flight windows: ${t.duplicated}`);
      assert.ok(t.dupIds.every((id) => id < sentBeforeStop), `duplicates: ${t.dupIds}`);
      assert.equal(t.total, pub.sent + t.duplicated);
      assert.equal(reconnected.client_id, rig.clientId);
      assert.equal(logged(svc, "subscribed").length, 2, "subscribed again after the reconnect");

      const exit = await svc.stop();
      assert.deepEqual(exit, { code: 0, signal: null });
    } finally {
      await pub?.close();
      await rig.close();
    }
  },
});

Deno.test({
  name: "fault 4: messages published while the service is stopped land after it starts",
  ...npmSockets,
  async fn() {
    const rig = await Rig.open();
    let pub: Publisher | undefined;
    try {
      // The first run creates the persistent session and its subscription.
      const first = await rig.startReady();
      assert.deepEqual(await first.stop(), { code: 0, signal: null });

      pub = await rig.publisher();
      for (let i = 0; i < 3000; i++) pub.publish();
      await pub.settled();
      assert.equal(pub.acked.size, 3000);

      const svc = rig.start();
      const connected = await svc.waitForLog("broker connected", 20_000);
      assert.equal(connected.session_present, true, "the broker kept the session");
      const t = await rig.waitStored(pub.acked, 30_000);
      report("4 published while stopped", pub, t);
      assert.equal(t.stored, 3000);
      assert.equal(t.total, 3000);

      assert.deepEqual(await svc.stop(), { code: 0, signal: null });
    } finally {
      await pub?.close();
      await rig.close();
    }
  },
});

/**
 * Puts `count` messages (the one at `poisonAt` with a negative value, which the
 * table's CHECK refuses) into the service's spool while PostgreSQL is down, so
 * the writer meets them as one batch when the database returns.
 */
async function poisonBatch(
  rig: Rig,
  count: number,
  poisonAt: number,
): Promise<{ svc: ServiceProcess; pub: Publisher }> {
  const first = await rig.startReady();
  assert.deepEqual(await first.stop(), { code: 0, signal: null });
  await rig.pg.stop();
  const pub = await rig.publisher();
  for (let i = 0; i < count; i++) pub.publish(i === poisonAt ? { value: -1 } : {});
  await pub.settled();
  const svc = rig.start({ BATCH_MAX_MESSAGES: String(count) });
  await svc.waitForLog("database unavailable, retrying", 20_000);
  let spooled = 0;
  await waitFor(
    "the whole batch spooled",
    async () => (spooled = await rig.spoolCount()) === count,
    20_000,
    () => `(spooled ${spooled}); service log tail:\n${svc.tail()}`,
  );
  await rig.pg.start();
  return { svc, pub };
}

async function rejectedRows(rig: Rig) {
  const errors = await rig.sql.unsafe<{ app_id: string; error: string; device: string }[]>(
    `SELECT app_id, error, device FROM public."errorTable"`,
  );
  const dead = await rig.sql.unsafe<{ app_id: string; error: string; payload: Uint8Array }[]>(
    `SELECT app_id, error, payload FROM public.sif_dead_letter`,
  );
  return { errors, dead };
}

Deno.test({
  name: "fault 5: one poison message in a batch of 1000: it alone is rejected, 999 land",
  ...npmSockets,
  async fn() {
    const rig = await Rig.open({ valueCheck: true });
    let pub: Publisher | undefined;
    try {
      const run = await poisonBatch(rig, 1000, 500);
      pub = run.pub;
      const { svc } = run;
      const expected = new Set([...pub.acked].filter((id) => id !== 500));
      const t = await rig.waitStored(expected, 30_000);
      assert.equal(t.stored, 999);
      assert.equal(t.total, 999);
      assert.equal(t.ids.has(500), false);

      const { errors, dead } = await rejectedRows(rig);
      assert.equal(errors.length, 1);
      assert.equal(errors[0]!.app_id, rig.table);
      assert.equal(errors[0]!.device, "fault-test");
      assert.match(errors[0]!.error, /^database rejected the row: .*check constraint.*23514/);
      assert.equal(dead.length, 1);
      assert.equal(
        new TextDecoder().decode(dead[0]!.payload),
        new TextDecoder().decode(message(rig.table, 500, -1)),
      );
      assert.equal(logged(svc, "message rejected").length, 1);
      assert.deepEqual(await svc.stop(), { code: 0, signal: null });
    } finally {
      await pub?.close();
      await rig.close();
    }
  },
});

Deno.test({
  name: "fault 5b: a transient error while a poisoned batch is being split writes nothing twice",
  ...npmSockets,
  async fn() {
    // The row of message 750 fails once with a serialization failure (SQLSTATE
    // 40001, retried), after the first half of the split batch was committed.
    const rig = await Rig.open({
      valueCheck: true,
      extraDdl: `CREATE SEQUENCE public.fault_once;
        CREATE FUNCTION public.fault_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.value = 750 AND nextval('public.fault_once') = 1 THEN
            RAISE EXCEPTION 'injected transient failure' USING ERRCODE = '40001';
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER fault_once BEFORE INSERT ON public."{table}"
          FOR EACH ROW EXECUTE FUNCTION public.fault_once();`,
    });
    let pub: Publisher | undefined;
    try {
      const run = await poisonBatch(rig, 1000, 500);
      pub = run.pub;
      const { svc } = run;
      const expected = new Set([...pub.acked].filter((id) => id !== 500));
      const t = await rig.waitStored(expected, 30_000);
      const fired = await rig.sql`SELECT last_value::int AS n FROM public.fault_once`;
      assert.ok(fired[0]!.n >= 1, "the injected failure happened");
      assert.equal(t.stored, 999);
      assert.equal(t.total, 999, `no duplicate rows (got ${t.duplicated})`);
      const { errors, dead } = await rejectedRows(rig);
      assert.equal(errors.length, 1);
      assert.equal(dead.length, 1);
      assert.deepEqual(await svc.stop(), { code: 0, signal: null });
    } finally {
      await pub?.close();
      await rig.close();
    }
  },
});

Deno.test({
  name: "fault 6: SIGTERM under load: exit 0, spool drained, every acknowledged message stored",
  ...npmSockets,
  async fn() {
    const rig = await Rig.open();
    let pub: Publisher | undefined;
    try {
      // Load: a backlog of 20,000 messages at the broker plus a live stream.
      const first = await rig.startReady();
      assert.deepEqual(await first.stop(), { code: 0, signal: null });
      pub = await rig.publisher();
      for (let i = 0; i < 20_000; i++) pub.publish();
      await pub.settled(30_000);
      const svc = rig.start();
      await svc.waitForLog("subscribed", 20_000);
      pub.stream(1000);
      await sleep(1500);
      const m = await svc.metrics();
      const atSignal = {
        acknowledged: m.get("sif_messages_acknowledged_total"),
        in_spool: m.get("sif_spool_messages"),
      };
      const signalled = Date.now();
      svc.signal("SIGTERM");
      const exit = await svc.exit(30_000);
      const tookMs = Date.now() - signalled;
      assert.deepEqual(exit, { code: 0, signal: null });
      const stopped = svc.find("stopped")[0];
      assert.equal(stopped?.pending_in_spool, 0, "the spool was drained before exit");
      assert.ok(tookMs < 20_000 + 5_000, `shutdown took ${tookMs} ms`);
      const atExit = await rig.tally();

      // The rest of the stream waits at the broker for the next run.
      await sleep(500);
      pub.stopStream();
      await pub.settled();
      assert.equal(pub.acked.size, pub.sent);
      assert.ok(atExit.stored < pub.sent, "some messages were still at the broker");
      const next = rig.start();
      const t = await rig.waitStored(pub.acked, 30_000);
      report("6 SIGTERM under load", pub, t, {
        at_signal: atSignal,
        stored_at_exit: atExit.stored,
        exit_ms: tookMs,
      });
      assert.deepEqual(lostIds(pub.acked, t), []);
      assert.equal(t.stored, pub.sent);
      assert.equal(t.total, pub.sent, "no duplicate rows");
      assert.deepEqual(await next.stop(), { code: 0, signal: null });
    } finally {
      await pub?.close();
      await rig.close();
    }
  },
});

Deno.test({
  name: "fault 6b: a second SIGTERM while draining exits at once; the spool keeps the rest",
  ...npmSockets,
  async fn() {
    const rig = await Rig.open();
    let pub: Publisher | undefined;
    try {
      const svc = await rig.startReady();
      await rig.pg.stop();
      pub = await rig.publisher();
      for (let i = 0; i < 300; i++) pub.publish();
      await pub.settled();
      await waitFor("300 messages spooled", async () => (await rig.spoolCount()) === 300, 10_000);

      // The database is down: the first signal starts a drain that cannot finish.
      svc.signal("SIGTERM");
      await svc.waitForLog("stopping", 5000);
      await sleep(1500);
      assert.equal(svc.running, true, "still draining after the first signal");
      const second = Date.now();
      svc.signal("SIGTERM");
      const exit = await svc.exit(5000);
      assert.ok(Date.now() - second < 2000, `exited ${Date.now() - second} ms after the second`);
      assert.equal(exit.code, 130);
      assert.equal(svc.find((l) => l.msg.startsWith("second signal")).length, 1);

      await rig.pg.start();
      const next = rig.start();
      const t = await rig.waitStored(pub.acked, 30_000);
      report("6b second signal", pub, t);
      assert.equal(t.stored, 300);
      assert.equal(t.total, 300);
      assert.deepEqual(await next.stop(), { code: 0, signal: null });
    } finally {
      await pub?.close();
      await rig.close();
    }
  },
});

Deno.test({
  name: "fault 7: spool budget full: stops acknowledging, says so, drops nothing",
  ...npmSockets,
  async fn() {
    const rig = await Rig.open();
    let pub: Publisher | undefined;
    try {
      const budget = 1024 * 1024;
      const svc = await rig.startReady({ SPOOL_MAX_BYTES: String(budget) });
      await rig.pg.stop();
      pub = await rig.publisher();
      const count = 2500; // about 2.5 MiB: more than twice the budget
      for (let i = 0; i < count; i++) pub.publish({ pad: 1000 });
      await pub.settled();
      assert.equal(pub.acked.size, count, "the broker took every message");
      const full = await svc.waitForLog(
        "spool full: not acknowledging until the database catches up",
        20_000,
      );
      assert.equal(full.level, "error");
      await sleep(1000);
      const spooled = await rig.spoolCount();
      assert.ok(spooled > 500 && spooled < 1100, `spool holds about the budget: ${spooled}`);

      await rig.pg.start();
      const t = await rig.waitStored(pub.acked, 60_000);
      report("7 spool full", pub, t, { spooled_at_full: spooled });
      assert.deepEqual(lostIds(pub.acked, t), []);
      assert.equal(t.stored, count);
      assert.equal(t.total, count, "no duplicate rows");
      assert.ok(
        logged(svc, "spool full: not acknowledging until the database catches up").length >= 1,
      );
      assert.ok(logged(svc, "spool has room again, acknowledging").length >= 1);
      assert.deepEqual(await svc.stop(), { code: 0, signal: null });
    } finally {
      await pub?.close();
      await rig.close();
    }
  },
});

/**
 * deploy/mosquitto.conf as shipped, with only addresses, ports and paths
 * moved into a temp dir (127.0.0.2 stands in for the private interface).
 */
async function deployedMosquitto(): Promise<{
  privatePort: number;
  loopbackPort: number;
  start(): Promise<void>;
  stop(): Promise<void>;
  destroy(): Promise<void>;
}> {
  const dir = await Deno.makeTempDir({ prefix: "sif-mqtt-deploy-" });
  const privatePort = freePort();
  const loopbackPort = freePort();
  let conf = await Deno.readTextFile(new URL("../deploy/mosquitto.conf", import.meta.url));
  const swap = (from: RegExp, to: string) => {
    assert.match(conf, from, `deploy/mosquitto.conf has ${from}`);
    conf = conf.replace(from, to);
  };
  swap(/^listener 1883 10\.0\.0\.10$/m, `listener ${privatePort} 127.0.0.2`);
  swap(/^listener 1883 127\.0\.0\.1$/m, `listener ${loopbackPort} 127.0.0.1`);
  swap(/^persistence_location \/var\/lib\/mosquitto\/$/m, `persistence_location ${dir}/`);
  swap(/^password_file \/etc\/mosquitto\/passwd$/m, `password_file ${dir}/passwd`);
  swap(/^pid_file .*$/m, "");
  // As root Mosquitto would switch to `mosquitto`, which cannot write the temp dir.
  swap(/^user mosquitto$/m, Deno.uid() === 0 ? "user root" : "");
  await Deno.writeTextFile(`${dir}/mosquitto.conf`, conf);
  const passwd = await new Deno.Command("/usr/bin/mosquitto_passwd", {
    args: ["-b", "-c", `${dir}/passwd`, "sif", "secret"],
    stdout: "null",
    stderr: "piped",
  }).output();
  assert.ok(passwd.success, new TextDecoder().decode(passwd.stderr));
  let child: Deno.ChildProcess | null = null;
  let log = "";
  const start = async () => {
    child = new Deno.Command("/usr/bin/setpriv", {
      args: ["--pdeathsig", "KILL", "--", "/usr/sbin/mosquitto", "-c", `${dir}/mosquitto.conf`],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const c = child;
    (async () => {
      for await (const chunk of c.stderr) log += new TextDecoder().decode(chunk);
    })();
    await waitFor(
      "the deployed mosquitto's listeners",
      async () => {
        for (const [hostname, port] of [["127.0.0.2", privatePort], ["127.0.0.1", loopbackPort]]) {
          const conn = await Deno.connect({ hostname: hostname as string, port: port as number });
          conn.close();
        }
        return true;
      },
      10_000,
      () => log,
    );
  };
  const stop = async () => {
    const c = child;
    if (!c) return;
    child = null;
    c.kill("SIGTERM");
    await c.status;
  };
  await start();
  return {
    privatePort,
    loopbackPort,
    start,
    stop,
    async destroy() {
      await stop();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}

Deno.test({
  name: "deploy/mosquitto.conf: keeps 3000 queued QoS 1 messages of an away session over a restart",
  ...npmSockets,
  async fn() {
    const broker = await deployedMosquitto();
    const clients: mqtt.MqttClient[] = [];
    const got = new Set<string>();
    const connect = (port: number, host: string, opts: mqtt.IClientOptions) =>
      new Promise<mqtt.MqttClient>((resolve, reject) => {
        const c = mqtt.connect(`mqtt://${host}:${port}`, {
          reconnectPeriod: 0,
          connectTimeout: 5000,
          ...opts,
        });
        // Queued messages follow the CONNACK at once: listen before connecting.
        c.on("message", (_t, payload) => got.add(new TextDecoder().decode(payload)));
        clients.push(c);
        c.once("connect", () => resolve(c));
        c.once("error", reject);
      });
    try {
      // Anonymous clients are refused.
      await assert.rejects(
        connect(broker.loopbackPort, "127.0.0.1", { protocolVersion: 5 }),
        /Not authorized|Bad User Name or Password/i,
      );
      // The service's session, as lib/mqtt.ts opens it, then away.
      const session = {
        clientId: "sif-stream-broker-deploy-test",
        clean: false,
        protocolVersion: 5 as const,
        properties: { sessionExpiryInterval: 3600 },
        username: "sif",
        password: "secret",
      };
      const sub = await connect(broker.loopbackPort, "127.0.0.1", session);
      await sub.subscribeAsync("ingest/stream/#", { qos: 1 });
      await sub.endAsync();

      // The ingest-broker publishes 3000 messages (three times Mosquitto's default queue).
      const pub = await connect(broker.privatePort, "127.0.0.2", {
        protocolVersion: 4,
        username: "sif",
        password: "secret",
      });
      await Promise.all(
        Array.from({ length: 3000 }, (_, i) => pub.publishAsync(TOPIC, `m${i}`, { qos: 1 })),
      );
      await pub.endAsync();

      await broker.stop();
      await broker.start();

      assert.equal(got.size, 0);
      await connect(broker.loopbackPort, "127.0.0.1", session);
      await waitFor("3000 queued messages", () => got.size === 3000, 15_000, () => `${got.size}`);
      assert.equal(got.has("m0") && got.has("m2999"), true);
    } finally {
      await Promise.allSettled(clients.map((c) => c.endAsync(true)));
      await broker.destroy();
    }
  },
});

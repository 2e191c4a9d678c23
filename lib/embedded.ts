/**
 * Development only: an embedded MQTT broker (aedes) and an embedded
 * PostgreSQL (PGlite served over TCP), so the service starts on a bare
 * machine. Each part starts only when its address was not configured and
 * nothing answers on the default one; PRODUCTION never starts anything here.
 *
 * The service talks to both exactly as to real servers (mqtt.js, postgres.js
 * over TCP); only two settings follow: MQTT 3.1.1 (aedes has no MQTT 5) and a
 * pool of one connection (PGlite is one backend session).
 */

import { Aedes } from "aedes";
import { PGlite } from "@electric-sql/pglite";
import { PGLiteSocketServer } from "@electric-sql/pglite-socket";
import { createConnection, createServer, type Server } from "node:net";
import { join, resolve } from "node:path";
import type { Config, DbConfig, MqttConfig } from "./config.ts";
import { log } from "./log.ts";

/** What was started, and the configuration that points at it. */
export interface Embedded {
  /** The input config with the addresses of the embedded parts filled in. */
  readonly config: Config;
  /** `"mqtt"` and/or `"postgres"`: the parts that run in this process. */
  readonly running: readonly string[];
  /** Stops the embedded parts (after the service has stopped). */
  stop(): Promise<void>;
}

/** Says whether something accepts TCP connections at `host:port`. */
export function answers(host: string, port: number, timeoutMs = 1000): Promise<boolean> {
  return new Promise((done) => {
    const socket = createConnection({ host: unbracket(host), port });
    const finish = (ok: boolean) => {
      socket.destroy();
      done(ok);
    };
    socket.setTimeout(timeoutMs, () => finish(false));
    socket.once("connect", () => finish(true));
    socket.once("error", () => finish(false));
  });
}

/**
 * Starts what development needs and nothing else: the broker when
 * `INGEST_STREAM` is unset and nothing answers on the default address, the
 * database when `TS_HOST` is unset and nothing answers on the default one.
 * Says in the log what runs where.
 */
export async function startEmbedded(config: Config): Promise<Embedded> {
  if (config.env !== "DEVELOPMENT") return { config, running: [], stop: () => Promise.resolve() };
  const stops: Array<() => Promise<void>> = [];
  const running: string[] = [];
  let mqtt: MqttConfig = config.mqtt;
  let db: DbConfig = config.db;
  let errorsDb: DbConfig = config.errorsDb;
  try {
    if (!config.mqtt.explicit) {
      const { host, port } = brokerAddress(config.mqtt.url);
      if (await answers(host, port)) {
        log(
          "info",
          "INGEST_STREAM is unset: using the broker that answers on the default address",
          {
            broker: config.mqtt.url,
          },
        );
      } else {
        const broker = await startBroker(host, port);
        stops.push(broker.stop);
        running.push("mqtt");
        mqtt = { ...mqtt, protocolVersion: 4 };
        log("info", "embedded MQTT broker running (development only)", {
          address: broker.address,
          protocol: "MQTT 3.1.1",
          sessions: "kept in memory until the service stops",
        });
      }
    }
    if (!config.db.explicit) {
      if (await answers(db.host, db.port)) {
        log("info", "TS_HOST is unset: using the PostgreSQL that answers on the default address", {
          address: `${db.host}:${db.port}`,
        });
      } else {
        const dataDir = resolve(join(config.stateDir, "pgdata"));
        const pg = await startDatabase(dataDir, db.host, db.port);
        stops.push(pg.stop);
        running.push("postgres");
        // PGlite is one database and one user in one backend session (it ignores the
        // names a client asks for): one connection, no TLS, errors in the same database.
        db = {
          ...db,
          user: "postgres",
          database: "postgres",
          password: undefined,
          sslMode: "disable",
          ca: undefined,
          caPath: undefined,
          poolSize: 1,
        };
        errorsDb = db;
        log("info", "embedded PostgreSQL running (development only)", {
          address: pg.address,
          data_dir: dataDir,
          engine: pg.version,
          database: "postgres (the only one: TS_DATABASE, TS_DATABASE_ERRORS, TS_USER unused)",
          connections: "one query at a time; the service uses a pool of 1",
        });
      }
    }
  } catch (e) {
    for (const stop of stops.reverse()) await stop().catch(() => {});
    throw e;
  }
  return {
    config: running.length > 0 ? Object.freeze({ ...config, mqtt, db, errorsDb }) : config,
    running,
    async stop() {
      for (const stop of stops.reverse()) {
        await stop().catch((e) => log("warn", "cannot stop an embedded part", { error: e }));
      }
      stops.length = 0;
    },
  };
}

/** `mqtt://host:port` → host and port. */
function brokerAddress(url: string): { host: string; port: number } {
  const u = new URL(url);
  return { host: u.hostname, port: Number(u.port || 1883) };
}

function unbracket(host: string): string {
  return host.startsWith("[") && host.endsWith("]") ? host.slice(1, -1) : host;
}

/** An aedes broker on `host:port` (sessions and queued messages in memory). */
export async function startBroker(
  host: string,
  port: number,
): Promise<{ address: string; stop: () => Promise<void> }> {
  const broker = await Aedes.createBroker();
  const server: Server = createServer(broker.handle);
  await listen(server, port, unbracket(host));
  return {
    address: `${host}:${port}`,
    stop: async () => {
      await new Promise<void>((done) => broker.close(() => done()));
      await new Promise<void>((done) => server.close(() => done()));
    },
  };
}

function listen(server: Server, port: number, host: string): Promise<void> {
  return new Promise((done, fail) => {
    server.once("error", fail);
    server.listen(port, host, () => {
      server.off("error", fail);
      done();
    });
  });
}

/** Most clients served at once (the service, plus a demo, psql or a test). */
const MAX_CLIENTS = 8;

/**
 * PGlite on `dataDir`, served on `host:port` with the PostgreSQL wire
 * protocol. The session is set up as lib/db.ts asks in its startup packet
 * (PGlite ignores startup parameters): `search_path` pinned to pg_catalog,
 * UTC. All clients share that one session.
 */
export async function startDatabase(
  dataDir: string,
  host: string,
  port: number,
): Promise<{ address: string; version: string; stop: () => Promise<void> }> {
  await Deno.mkdir(dataDir, { recursive: true });
  const db = await PGlite.create(dataDir);
  try {
    await db.exec(`SET search_path TO pg_catalog; SET TimeZone TO 'UTC';
      SET application_name TO 'sif-stream-broker (embedded)'`);
    const version = (await db.query<{ v: string }>("SELECT pg_catalog.version() AS v")).rows[0]!.v;
    const server = new PGLiteSocketServer({ db, host, port, maxConnections: MAX_CLIENTS });
    // The stock queue lets one client's extended-protocol messages interleave
    // with another's (unnamed portal lost, see tests/embedded_test.ts).
    (server as unknown as { queryQueue: SessionQueue }).queryQueue = new SessionQueue(db);
    await server.start();
    return {
      address: `${host}:${port}`,
      version: version.split(" on ")[0] ?? version,
      stop: async () => {
        await server.stop();
        await db.close();
      },
    };
  } catch (e) {
    await db.close().catch(() => {});
    throw e;
  }
}

interface Pending {
  readonly handler: number;
  readonly message: Uint8Array;
  readonly onData: (data: Uint8Array) => void;
  readonly resolve: (bytes: number) => void;
  readonly reject: (err: unknown) => void;
}

/** Sync: ends an extended-protocol sequence (and an aborted one). */
const SYNC = new Uint8Array([0x53, 0, 0, 0, 4]);

/**
 * Replaces pglite-socket's query queue (same four methods): one client owns
 * the single PGlite session from its first message until the end of a unit
 * (Sync, simple Query, Terminate, startup) outside a transaction block, so
 * clients never see each other's unnamed statements, portals or transactions.
 */
export class SessionQueue {
  #queue: Pending[] = [];
  #owner: number | null = null;
  #busy = false;

  constructor(private readonly db: PGlite) {}

  enqueue(handler: number, message: Uint8Array, onData: (d: Uint8Array) => void): Promise<number> {
    return new Promise((resolve, reject) => {
      this.#queue.push({ handler, message, onData, resolve, reject });
      void this.#drain();
    });
  }

  getQueueLength(): number {
    return this.#queue.length;
  }

  clearQueueForHandler(handler: number): void {
    const mine = this.#queue.filter((p) => p.handler === handler);
    this.#queue = this.#queue.filter((p) => p.handler !== handler);
    for (const p of mine) p.reject(new Error("client disconnected"));
  }

  /** A client left while owning the session: end its sequence and transaction. */
  async clearTransactionIfNeeded(handler: number): Promise<void> {
    if (this.#owner !== handler) return;
    await this.db.runExclusive(() => this.db.execProtocolRaw(SYNC));
    if (this.db.isInTransaction()) await this.db.exec("ROLLBACK");
    this.#owner = null;
    void this.#drain();
  }

  async #drain(): Promise<void> {
    if (this.#busy) return;
    this.#busy = true;
    try {
      for (;;) {
        const at = this.#owner === null
          ? 0
          : this.#queue.findIndex((p) => p.handler === this.#owner);
        if (at < 0 || at >= this.#queue.length) return;
        const [p] = this.#queue.splice(at, 1);
        this.#owner = p!.handler;
        let bytes = 0;
        try {
          await this.db.runExclusive(() =>
            this.db.execProtocolRawStream(p!.message, {
              onRawData: (data) => {
                bytes += data.length;
                p!.onData(data);
              },
            })
          );
        } catch (e) {
          p!.reject(e);
          continue;
        }
        if (endsUnit(p!.message) && !this.db.isInTransaction()) this.#owner = null;
        p!.resolve(bytes);
      }
    } finally {
      this.#busy = false;
    }
  }
}

/** Sync, Query, Terminate, or the startup packet (no type byte). */
function endsUnit(message: Uint8Array): boolean {
  const t = message[0];
  return t === 0x53 || t === 0x51 || t === 0x58 || t === 0;
}

/**
 * The local spool: every message is appended here (durable on disk) before it
 * is acknowledged to the broker, and the writer drains it in order. SQLite in
 * WAL mode through `node:sqlite`; the database outlives crashes and restarts.
 */

import { DatabaseSync, type StatementSync } from "node:sqlite";
import { join } from "node:path";

export interface SpoolEntry {
  readonly seq: number;
  readonly topic: string;
  readonly payload: Uint8Array;
  /** Receive time, milliseconds since the epoch. */
  readonly receivedAt: number;
}

export interface SpoolOptions {
  /** `full` also survives power loss; `normal` survives a crash of the process. */
  readonly sync?: "normal" | "full";
}

/**
 * Most payload bytes one read() returns (with at least one message): a batch
 * of 2000 messages of up to 256 MB each (the MQTT limit) must not be read
 * into memory at once.
 */
export const READ_MAX_BYTES = 64 * 1024 * 1024;

export class Spool {
  /** Random id of this spool file; with `seq` it names a message uniquely. */
  readonly epoch: string;
  readonly #db: DatabaseSync;
  readonly #insert: StatementSync;
  readonly #read: StatementSync;
  readonly #sizes: StatementSync;
  readonly #delete: StatementSync;
  readonly #deleted: StatementSync;
  #bytes = 0;
  #count = 0;
  /** Messages staged in the open transaction, and the first one's seq. */
  #staged = 0;
  #stagedFirst = 0;

  private constructor(readonly path: string, options: SpoolOptions) {
    this.#db = new DatabaseSync(path);
    this.#db.exec(`PRAGMA journal_mode = WAL;
      PRAGMA locking_mode = EXCLUSIVE;
      PRAGMA synchronous = ${options.sync === "full" ? "FULL" : "NORMAL"};
      CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
      CREATE TABLE IF NOT EXISTS messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        received_at INTEGER NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL);`);
    this.#db.prepare("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)")
      .run(crypto.randomUUID());
    const row = this.#db.prepare("SELECT value FROM meta WHERE key = 'epoch'").get() as {
      value: string;
    };
    this.epoch = row.value;
    this.#insert = this.#db.prepare(
      "INSERT INTO messages (received_at, topic, payload) VALUES (?, ?, ?)",
    );
    this.#read = this.#db.prepare(
      "SELECT seq, received_at, topic, payload FROM messages WHERE seq > ? AND seq < ? " +
        "ORDER BY seq LIMIT ?",
    );
    // length() of a BLOB column reads no payload (SQLite keeps the size in the record).
    this.#sizes = this.#db.prepare(
      "SELECT length(payload) AS n FROM messages WHERE seq > ? AND seq < ? ORDER BY seq LIMIT ?",
    );
    this.#delete = this.#db.prepare("DELETE FROM messages WHERE seq <= ?");
    this.#deleted = this.#db.prepare(
      "SELECT count(*) AS n, coalesce(sum(length(payload) + length(topic)), 0) AS b " +
        "FROM messages WHERE seq <= ?",
    );
    this.#recount();
  }

  #recount(): void {
    const totals = this.#db.prepare(
      "SELECT count(*) AS n, coalesce(sum(length(payload) + length(topic)), 0) AS b FROM messages",
    ).get() as { n: number; b: number };
    this.#count = totals.n;
    this.#bytes = totals.b;
  }

  /** Opens (or creates) the spool in `dir`. */
  static open(dir: string, options: SpoolOptions = {}): Spool {
    Deno.mkdirSync(dir, { recursive: true });
    const path = join(dir, "spool.sqlite");
    try {
      return new Spool(path, options);
    } catch (e) {
      if (/locked|busy/i.test((e as Error).message)) {
        throw new Error(`spool ${path} is in use by another process (same STATE_DIR?)`);
      }
      throw new Error(`cannot open spool ${path}: ${(e as Error).message}`);
    }
  }

  /** Appends one message durably (with what was staged before it); returns its sequence number. */
  append(topic: string, payload: Uint8Array, receivedAt: number): number {
    const seq = this.stage(topic, payload, receivedAt);
    this.commit();
    return seq;
  }

  /**
   * Appends one message to the open transaction (group commit), starting one
   * when none is open; returns its sequence number. The message is durable,
   * and may be acknowledged, only once `commit()` has returned; until then
   * `read()` does not return it. One transaction for a group of messages
   * costs about as much as one for a single message (`deno task bench:micro`).
   */
  stage(topic: string, payload: Uint8Array, receivedAt: number): number {
    if (this.#staged === 0) this.#db.exec("BEGIN");
    let seq: number;
    try {
      seq = Number(this.#insert.run(receivedAt, topic, payload).lastInsertRowid);
    } catch (e) {
      if (this.#staged === 0) this.#db.exec("ROLLBACK");
      throw e;
    }
    if (this.#staged === 0) this.#stagedFirst = seq;
    const size = payload.length + topic.length;
    this.#staged++;
    this.#count++;
    this.#bytes += size;
    return seq;
  }

  /** Makes the staged messages durable; returns how many there were. Throws on a disk error. */
  commit(): number {
    const n = this.#staged;
    if (n === 0) return 0;
    this.#db.exec("COMMIT");
    this.#staged = 0;
    return n;
  }

  /**
   * Drops the staged messages after a disk error (they were not acknowledged,
   * so the broker sends them again).
   */
  rollback(): void {
    if (this.#staged === 0) return;
    this.#staged = 0;
    try {
      this.#db.exec("ROLLBACK");
    } catch {
      // SQLite already rolled back after the error
    }
    // Deletes made meanwhile were rolled back too: count again.
    this.#recount();
  }

  /** Messages staged and not yet committed. */
  get staged(): number {
    return this.#staged;
  }

  /** Up to `limit` committed messages after `afterSeq`, oldest first, within `maxBytes`. */
  read(afterSeq: number, limit: number, maxBytes = READ_MAX_BYTES): SpoolEntry[] {
    const before = this.#staged === 0 ? Number.MAX_SAFE_INTEGER : this.#stagedFirst;
    // At most `maxBytes` of payloads, but always the first message.
    let take = 0;
    let bytes = 0;
    for (const r of this.#sizes.all(afterSeq, before, limit) as { n: number }[]) {
      if (take > 0 && bytes + r.n > maxBytes) break;
      bytes += r.n;
      take++;
    }
    if (take === 0) return [];
    const rows = this.#read.all(afterSeq, before, take) as {
      seq: number;
      received_at: number;
      topic: string;
      payload: Uint8Array;
    }[];
    return rows.map((r) => ({
      seq: r.seq,
      topic: r.topic,
      payload: r.payload,
      receivedAt: r.received_at,
    }));
  }

  /** Removes every message up to and including `seq` (it is committed). */
  deleteThrough(seq: number): void {
    const gone = this.#deleted.get(seq) as { n: number; b: number };
    this.#delete.run(seq);
    this.#count -= gone.n;
    this.#bytes -= gone.b;
  }

  /** Messages waiting. */
  get count(): number {
    return this.#count;
  }

  /** Approximate bytes waiting (payloads and topics). */
  get bytes(): number {
    return this.#bytes;
  }

  /** Receive time of the oldest waiting message, or null when empty. */
  oldestReceivedAt(): number | null {
    const row = this.#db.prepare("SELECT received_at FROM messages ORDER BY seq LIMIT 1").get() as
      | { received_at: number }
      | undefined;
    return row?.received_at ?? null;
  }

  /** Closes the file; staged messages are dropped (they were not acknowledged). */
  close(): void {
    this.#staged = 0;
    this.#db.close();
  }
}

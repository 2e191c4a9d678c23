/**
 * The writer drains the spool into PostgreSQL: in order, in batches, one
 * transaction per batch that also records the spool position it covers, so a
 * restart never writes a message twice. Transient database errors are retried
 * with capped backoff; a permanent error splits the batch until only the bad
 * messages are left, and those are rejected.
 */

import {
  errorText,
  isSizeDependent,
  isStatementCancel,
  isTransient,
  type Sql,
  type Tx,
} from "./db.ts";
import { qualified } from "./ident.ts";
import { type IrMessage, parseMessage } from "./ir.ts";
import { log } from "./log.ts";
import { reject } from "./rejection.ts";
import type { RejectedMessage, RejectStore } from "./rejects.ts";
import type { Provisioner } from "./provision.ts";
import type { SchemaCache } from "./schema.ts";
import type { Spool, SpoolEntry } from "./spool.ts";
import {
  buildInsert,
  type Cell,
  mergeInto,
  type RowGroup,
  type TableInfo,
  translate,
} from "./translate.ts";

/** The table that records how far each client's spool is committed. */
export const PROGRESS_TABLE = "sif_stream_progress";
/**
 * A message that alone still runs past `statement_timeout` is tried again
 * with backoff (from LONE_CANCEL_BACKOFF_MS, doubling, at most 15 s) for
 * about LONE_CANCEL_WAIT_MS: long enough to outlast a lock held for a while
 * (a lock wait also ends in statement_timeout), short enough that a message
 * too slow to ever fit cannot stop the stream. Then it is rejected as
 * `database rejected the row: canceling statement ...` with its dead letter.
 */
const LONE_CANCEL_WAIT_MS = 60_000;
const LONE_CANCEL_BACKOFF_MS = 500;
/**
 * Distinct INSERT texts sent as named prepared statements. Each table and
 * column set has its own text, and postgres.js and the server keep a named
 * statement for the connection's life: senders with many column subsets
 * would grow both without bound. Texts beyond this run unnamed (parsed each
 * time, a fraction of a millisecond per statement of up to 5000 rows).
 */
export const MAX_PREPARED_INSERTS = 256;
/** Rows per INSERT statement; arrays of this size keep memory and latency small. */
export const ROWS_PER_STATEMENT = 5000;
/**
 * Values (rows x columns) after which a batch takes no more messages; the
 * rest wait for the next batch. Bounds a batch's memory whatever the
 * messages hold (2000 messages of 4 MiB each once needed more than the heap).
 */
export const BATCH_MAX_CELLS = 2_000_000;

/** Hooks for metrics; every field optional. */
export interface WriterEvents {
  batch?(info: { messages: number; rows: number; rejected: number; seconds: number }): void;
  rejected?(reason: string): void;
  database?(ok: boolean): void;
}

export interface WriterOptions {
  readonly spool: Spool;
  readonly sql: Sql;
  /** The errors database; the same object as `sql` when it is the same database. */
  readonly errorsSql: Sql;
  readonly schema: SchemaCache;
  readonly rejects: RejectStore;
  readonly clientId: string;
  readonly batchMaxMessages: number;
  readonly batchMaxWaitMs: number;
  readonly events?: WriterEvents;
  /** Longest wait between retries. */
  readonly maxBackoffMs?: number;
  /** Default LONE_CANCEL_WAIT_MS: retry time for a lone message past statement_timeout. */
  readonly loneCancelWaitMs?: number;
  /** AUTO_CREATE_TABLES: creates a missing app table before its first insert. */
  readonly provision?: Provisioner;
  /** When idle, check the database this often (readiness); default 5 s. */
  readonly checkIntervalMs?: number;
}

/**
 * A spooled message after parsing and translation. `groups` is null once its
 * rows were merged into the batch's groups (they then die young instead of
 * living, and being promoted by the GC, until the batch is written); a split
 * prepares such a message again.
 */
type Prepared =
  | { entry: SpoolEntry; ok: true; groups: RowGroup[] | null; rows: number; table: string }
  | { entry: SpoolEntry; ok: false; rejected: RejectedMessage };

/** A batch's messages, and their rows merged per table and column set. */
interface Batch {
  readonly prepared: Prepared[];
  readonly merged: Map<string, RowGroup>;
  /** Values (rows x columns) in `merged`, for BATCH_MAX_CELLS. */
  cells: number;
}

class Stopped extends Error {}

/**
 * A table of the batch is no longer the relation the schema cache read (it
 * was dropped and made again, or replaced by a view): the transaction was
 * rolled back before COMMIT.
 */
class TableReplaced extends Error {
  constructor(readonly tables: string[]) {
    super(`tables changed while the batch was written: ${tables.join(", ")}`);
  }
}

/** Re-preparations after TableReplaced before the batch is retried with backoff. */
const MAX_REPLACED_RETRIES = 5;

export class Writer {
  #lastSeq = 0;
  /** Ends the current sleep: on new messages (idle sleeps) and on stop (all sleeps). */
  #wake: (() => void) | null = null;
  #wakeOnStop: (() => void) | null = null;
  #stopAt = Infinity;
  #stopping = false;
  #dbOk: boolean | null = null;
  #lastOkAt = 0;
  #running: Promise<void> | null = null;
  /** Called once the current batch's first INSERT is sent, with its last spool position. */
  #onBusy: ((last: number) => void) | null = null;
  readonly #provisionFailed = new Map<string, number>();
  /** INSERT texts that are prepared (MAX_PREPARED_INSERTS). */
  readonly #preparedInserts = new Set<string>();
  readonly #o: WriterOptions;
  readonly #progress: string;

  constructor(options: WriterOptions) {
    this.#o = options;
    this.#progress = qualified(options.schema.schema, PROGRESS_TABLE);
  }

  /** Starts draining in the background; resolves when stopped. */
  start(): Promise<void> {
    this.#running ??= this.#run();
    return this.#running;
  }

  /** Tells the writer that new messages are in the spool. */
  notify(): void {
    this.#wake?.();
  }

  /** True while the last database operation succeeded. */
  get databaseOk(): boolean {
    return this.#dbOk === true;
  }

  /**
   * Writes what is pending, then stops. Gives up at `deadlineMs` from now
   * (the spool keeps the rest). Resolves true when the spool was drained.
   */
  async stop(deadlineMs: number): Promise<boolean> {
    this.#stopping = true;
    this.#stopAt = Date.now() + deadlineMs;
    this.#wake?.();
    this.#wakeOnStop?.();
    await this.start().catch(() => {});
    return this.#o.spool.count === 0;
  }

  async #run(): Promise<void> {
    try {
      await this.#retrying("prepare database", () => this.#init());
      // The next batch, read and prepared while the current one is being written.
      type Ahead = { after: number; entries: SpoolEntry[]; prepared: Promise<Batch> };
      let ahead = null as Ahead | null; // (set in a callback: no narrowing to null)
      for (;;) {
        // Read ahead right after what is committed now, or it is of no use.
        if (ahead && ahead.after !== this.#lastSeq) ahead = null;
        let entries = ahead?.entries ?? this.#o.spool.read(this.#lastSeq, this.#o.batchMaxMessages);
        const prepared = ahead?.prepared;
        ahead = null;
        if (entries.length === 0) {
          if (this.#stopping) return;
          // Idle: a cheap query now and then, so readiness notices a database outage.
          const due = this.#lastOkAt + (this.#o.checkIntervalMs ?? 5000) - Date.now();
          if (due > 0) await this.#sleep(due);
          else await this.#retrying("check database", () => this.#check());
          continue;
        }
        if (entries.length < this.#o.batchMaxMessages && !this.#stopping) {
          // Small batch: give it a moment to fill, bounded by the oldest message's age.
          const wait = entries[0]!.receivedAt + this.#o.batchMaxWaitMs - Date.now();
          if (wait > 0) {
            await this.#sleep(wait, { onlyStopWakes: true });
            entries = this.#o.spool.read(this.#lastSeq, this.#o.batchMaxMessages);
          }
        }
        // After a failure part of the batch may be committed already (a split
        // commits its parts one by one, or a COMMIT went through unseen when
        // the connection broke): read the progress again and write the rest.
        let retry = false;
        // Parsing and translating the next batch (CPU, this thread) overlaps
        // with the database writing this one.
        this.#onBusy = (after) => {
          this.#onBusy = null;
          const next = this.#o.spool.read(after, this.#o.batchMaxMessages);
          if (next.length === 0) return;
          const p = this.#prepareBatch(next);
          p.catch(() => {}); // a failure is met again when the batch is written
          ahead = { after, entries: next, prepared: p };
        };
        await this.#retrying("write batch", async () => {
          if (retry) await this.#skipCommitted();
          retry = true;
          const rest = entries.filter((e) => e.seq > this.#lastSeq);
          if (rest.length > 0) await this.#write(rest, prepared);
        });
        this.#onBusy = null;
      }
    } catch (e) {
      if (!(e instanceof Stopped)) throw e;
    }
  }

  /** Creates the service's tables and skips what a previous run already committed. */
  async #init(): Promise<void> {
    await this.#ensureTables();
    await this.#skipCommitted();
  }

  /** Creates `"errorTable"`, the dead letters and the progress table where missing. */
  async #ensureTables(): Promise<void> {
    const { sql, errorsSql, rejects } = this.#o;
    await raceSafe(() => rejects.ensureTables(errorsSql));
    await raceSafe(() =>
      sql.unsafe(`CREATE TABLE IF NOT EXISTS ${this.#progress} (
      client_id TEXT PRIMARY KEY,
      spool_epoch TEXT NOT NULL,
      last_seq BIGINT NOT NULL,
      updated_at TIMESTAMPTZ NOT NULL DEFAULT now())`)
    );
  }

  /** Moves past (and drops from the spool) what the progress table says is committed. */
  async #skipCommitted(): Promise<void> {
    const { sql, spool, clientId } = this.#o;
    const rows = await sql.unsafe<{ spool_epoch: string; last_seq: string }[]>(
      `SELECT spool_epoch, last_seq FROM ${this.#progress} WHERE client_id = $1`,
      [clientId],
    );
    const row = rows[0];
    if (row && row.spool_epoch === spool.epoch && Number(row.last_seq) > this.#lastSeq) {
      this.#lastSeq = Number(row.last_seq);
      const before = spool.count;
      spool.deleteThrough(this.#lastSeq);
      if (before !== spool.count) {
        log("info", "skipped spooled messages already committed", {
          messages: before - spool.count,
        });
      }
    }
  }

  async #check(): Promise<void> {
    if (this.#stopping) throw new Stopped();
    await this.#o.sql.unsafe("SELECT 1");
  }

  /** Runs `op` until it succeeds, retrying transient errors with capped backoff. */
  async #retrying(what: string, op: () => Promise<void>): Promise<void> {
    for (let attempt = 0;; attempt++) {
      try {
        await op();
        this.#lastOkAt = Date.now();
        this.#setDb(true);
        return;
      } catch (e) {
        if (e instanceof Stopped) throw e;
        const transient = isTransient(e);
        const cap = this.#o.maxBackoffMs ?? 30_000;
        const delay = Math.min(cap, 250 * 2 ** Math.min(attempt, 20)) * (0.5 + Math.random() / 2);
        this.#setDb(false, what, e, delay);
        if (!transient) log("error", `cannot ${what}`, { error: errorText(e), attempt });
        if (this.#stopping && Date.now() + delay > this.#stopAt) throw new Stopped();
        await this.#sleep(delay, { evenIfStopping: true, onlyStopWakes: true });
      }
    }
  }

  #setDb(ok: boolean, what = "", err?: unknown, retryMs = 0): void {
    if (this.#dbOk === ok) return;
    this.#dbOk = ok;
    this.#o.events?.database?.(ok);
    if (ok) log("info", "database available");
    else {
      log("warn", "database unavailable, retrying", {
        during: what,
        error: errorText(err),
        retry_in_ms: Math.round(retryMs),
      });
    }
  }

  /**
   * Sleeps `ms` (Infinity: until woken). New messages end only idle sleeps;
   * batch-fill waits and retry backoff are ended early only by stop().
   */
  #sleep(
    ms: number,
    { evenIfStopping = false, onlyStopWakes = false } = {},
  ): Promise<void> {
    if (this.#stopping && !evenIfStopping) return Promise.resolve();
    return new Promise((resolve) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const done = () => {
        clearTimeout(timer);
        if (this.#wake === done) this.#wake = null;
        if (this.#wakeOnStop === done) this.#wakeOnStop = null;
        resolve();
      };
      if (Number.isFinite(ms)) timer = setTimeout(done, ms);
      if (onlyStopWakes) this.#wakeOnStop = done;
      else this.#wake = done;
    });
  }

  /** Writes `entries`; `ahead` holds the first of them prepared already. */
  async #write(entries: SpoolEntry[], ahead?: Promise<Batch>): Promise<void> {
    const started = performance.now();
    const batch = await this.#prepareBatch(entries, (await ahead?.catch(() => null)) ?? null);
    const { rows, rejected } = await this.#commitOrSplit(batch.prepared, batch.merged);
    this.#o.events?.batch?.({
      messages: batch.prepared.length,
      rows,
      rejected,
      seconds: (performance.now() - started) / 1000,
    });
  }

  /**
   * Prepares `entries` and merges their rows as it goes; continues `from`
   * when that holds the first of them. Stops early at BATCH_MAX_CELLS (the
   * batch is then the first `prepared.length` entries).
   */
  async #prepareBatch(entries: SpoolEntry[], from: Batch | null = null): Promise<Batch> {
    const n = from?.prepared.length ?? 0;
    const reuse = from !== null && n > 0 && n <= entries.length &&
      from.prepared[0]!.entry.seq === entries[0]!.seq &&
      from.prepared[n - 1]!.entry.seq === entries[n - 1]!.seq;
    const batch: Batch = reuse ? from : { prepared: [], merged: new Map(), cells: 0 };
    for (let i = batch.prepared.length; i < entries.length; i++) {
      if (batch.cells >= BATCH_MAX_CELLS) break;
      const p = await this.#prepare(entries[i]!);
      if (p.ok) {
        for (const g of p.groups!) {
          batch.cells += g.times.length * (3 + g.columns.length);
          const into = batch.merged.get(g.key);
          if (into) mergeInto(into, g);
          else batch.merged.set(g.key, g); // the message's own group becomes the batch's
        }
        p.groups = null;
        batch.prepared.push(p);
      } else batch.prepared.push(p);
    }
    return batch;
  }

  async #prepare(entry: SpoolEntry): Promise<Prepared> {
    const parsed = parseMessage(entry.payload);
    if (!parsed.ok) return this.#rejected(entry, parsed.rejection);
    const { schema } = this.#o;
    const table = parsed.message.appId;
    // A miss is trusted only when the catalog was read after the message arrived.
    let info = await schema.get(table, entry.receivedAt);
    if (info === null && this.#o.provision) info = await this.#provision(parsed.message);
    let t = translate(parsed.message, info);
    // Any rejection may come from a table that changed after it was cached (a
    // column added, retyped or widened; a table that became an app table): it
    // is trusted only against a catalog read after the message arrived.
    if (!t.ok) t = translate(parsed.message, await schema.refresh(table, entry.receivedAt));
    if (!t.ok) return this.#rejected(entry, t.rejection);
    return { entry, ok: true, groups: t.groups, rows: t.rows, table };
  }

  /**
   * Creates the missing table `msg` names. A permanent failure (no CREATE
   * privilege, say) leaves it missing, so the message is rejected as
   * `invalid app`; the table is not tried again for a minute.
   */
  async #provision(msg: IrMessage): Promise<TableInfo | null> {
    const table = msg.appId;
    if ((this.#provisionFailed.get(table) ?? 0) > Date.now()) return null;
    try {
      const done = await this.#o.provision!.ensureTable(msg);
      if (!done.ok) throw new Error(done.reason);
    } catch (e) {
      if (isTransient(e)) throw e;
      this.#provisionFailed.set(table, Date.now() + 60_000);
      log("warn", "cannot create app table", { app_id: table, error: errorText(e) });
    }
    this.#o.schema.invalidate(table);
    return await this.#o.schema.get(table);
  }

  #rejected(entry: SpoolEntry, rejection: RejectedMessage["rejection"]): Prepared {
    return {
      entry,
      ok: false,
      rejected: {
        rejection,
        topic: entry.topic,
        payload: entry.payload,
        receivedAt: entry.receivedAt,
        seq: entry.seq,
      },
    };
  }

  /** Commits `prepared`; on a permanent error, halves it until the bad messages are alone. */
  async #commitOrSplit(
    prepared: Prepared[],
    merged?: Map<string, RowGroup>,
  ): Promise<{ rows: number; rejected: number }> {
    try {
      return await this.#commitChecked(prepared, merged);
    } catch (firstError) {
      let e = firstError;
      // A table that keeps changing is not the data's fault: retried whole.
      if (e instanceof Stopped || e instanceof TableReplaced) throw e;
      // Out of locks or past statement_timeout: halve the batch, not retry it
      // whole forever. A lone message that is still out of locks waits for the
      // server like any transient error; a lone one that keeps timing out is
      // rejected below, after about LONE_CANCEL_WAIT_MS of retries.
      if (isSizeDependent(e)) {
        if (prepared.length === 1 && !isStatementCancel(e)) throw e;
      } else if (isTransient(e)) throw e;
      // The rows were merged away: prepare the messages again to split them.
      const full: Prepared[] = [];
      for (const p of prepared) full.push(p.ok && !p.groups ? await this.#prepare(p.entry) : p);
      prepared = full;
      if (prepared.length > 1) {
        const mid = prepared.length >> 1;
        const a = await this.#commitOrSplit(prepared.slice(0, mid));
        const b = await this.#commitOrSplit(prepared.slice(mid));
        return { rows: a.rows + b.rows, rejected: a.rejected + b.rejected };
      }
      const one = prepared[0]!;
      // A table of the service's own dropped while running (else the writer
      // would retry forever): create it again. An app table's is harmless.
      const undefinedTable = (e as { code?: unknown }).code === "42P01";
      if (undefinedTable) await this.#ensureTables();
      if (!one.ok) {
        if (undefinedTable) return await this.#commitChecked([one]);
        return await this.#recordAnyway(one, e);
      }
      // The table may have changed under the cache: look again, once.
      this.#o.schema.invalidate(one.table);
      const again = await this.#prepare(one.entry);
      if (again.ok) {
        const done = await this.#commitAlone(again);
        if ("rows" in done) return done;
        e = done.error;
      }
      const parsed = parseMessage(one.entry.payload);
      const appId = parsed.ok ? parsed.message.appId : "";
      const device = parsed.ok ? parsed.message.readings[0]?.device ?? "" : "";
      const final = again.ok
        ? this.#rejected(
          one.entry,
          reject(`database rejected the row: ${errorText(e)}`, appId, device),
        )
        : again;
      return await this.#commitChecked([final]);
    }
  }

  /**
   * Commits one message on its own; a permanent error comes back as a value
   * (the caller rejects the message). A statement_timeout is retried with
   * backoff for about LONE_CANCEL_WAIT_MS first: a lock wait ends that way too.
   */
  async #commitAlone(
    one: Prepared,
  ): Promise<{ rows: number; rejected: number } | { error: unknown }> {
    const budget = this.#o.loneCancelWaitMs ?? LONE_CANCEL_WAIT_MS;
    let waited = 0;
    for (let attempt = 1;; attempt++) {
      try {
        return await this.#commitChecked([one]);
      } catch (e) {
        if (e instanceof Stopped || e instanceof TableReplaced) throw e;
        const cancelled = isStatementCancel(e);
        if (isTransient(e) && !cancelled) throw e;
        if (!cancelled || waited >= budget) return { error: e };
        const delay = Math.min(LONE_CANCEL_BACKOFF_MS * 2 ** (attempt - 1), 15_000);
        waited += delay;
        log("warn", "a message alone was cancelled (statement_timeout); trying again", {
          app_id: one.ok ? one.table : "",
          error: errorText(e),
          retry_in_ms: delay,
        });
        await this.#sleep(delay, { evenIfStopping: true, onlyStopWakes: true });
      }
    }
  }

  /** Names in `merged` that no longer resolve to the oid the cache read. */
  async #replacedTables(tx: Tx, merged: Map<string, RowGroup>): Promise<string[]> {
    const oids = new Map<string, string>();
    for (const g of merged.values()) if (g.table.oid) oids.set(g.table.table, g.table.oid);
    if (oids.size === 0) return [];
    const query = tx.unsafe<{ name: string }[]>(
      `SELECT e.name FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::oid[]))
               AS e(name, oid)
        WHERE pg_catalog.to_regclass(pg_catalog.quote_ident($3) || '.' ||
                pg_catalog.quote_ident(e.name))::oid IS DISTINCT FROM e.oid`,
      [
        tx.typed(arrayLiteral([...oids.keys()]) as never, 0),
        tx.typed(arrayLiteral([...oids.values()]) as never, 0),
        this.#o.schema.schema,
      ] as never[],
      { prepare: true },
    ).execute();
    return (await query).map((r) => r.name);
  }

  /** Whether to send `text` as a named prepared statement (MAX_PREPARED_INSERTS). */
  #mayPrepare(text: string): boolean {
    if (this.#preparedInserts.has(text)) return true;
    if (this.#preparedInserts.size >= MAX_PREPARED_INSERTS) return false;
    this.#preparedInserts.add(text);
    return true;
  }

  /**
   * Recording `one`'s rejection failed with a permanent error (an existing
   * `"errorTable"` with narrower columns or a CHECK, say). Retrying would
   * stop the writer for good: keep the dead letter alone, or as a last resort
   * log the message and move past it.
   */
  async #recordAnyway(one: Prepared & { ok: false }, e: unknown) {
    const { rejection, topic, seq } = one.rejected;
    const fields = { app_id: rejection.appId, device: rejection.device, topic, seq };
    log("error", 'cannot record the rejection in "errorTable"; dead letter only', {
      ...fields,
      rejection: rejection.reason,
      error: errorText(e),
    });
    try {
      return await this.#commitChecked([one], undefined, "deadLetter");
    } catch (e2) {
      if (isTransient(e2) || e2 instanceof Stopped) throw e2;
      log("error", "cannot record the rejected message at all; moving past it", {
        ...fields,
        rejection: rejection.reason,
        error: errorText(e2),
        payload_bytes: one.rejected.payload.length,
      });
      return await this.#commitChecked([one], undefined, "none");
    }
  }

  /**
   * #commit, again with a fresh look at the catalog when a table turned out
   * to be another relation than the cached one (see TableReplaced).
   */
  async #commitChecked(
    prepared: Prepared[],
    given?: Map<string, RowGroup>,
    record: "all" | "deadLetter" | "none" = "all",
  ): Promise<{ rows: number; rejected: number }> {
    for (let attempt = 1;; attempt++) {
      try {
        return await this.#commit(prepared, given, record);
      } catch (e) {
        if (!(e instanceof TableReplaced)) throw e;
        for (const t of e.tables) this.#o.schema.invalidate(t);
        // Still changing: the batch is retried with backoff (never rejected for it).
        if (attempt > MAX_REPLACED_RETRIES) throw e;
        log("info", "app table changed under the cache; reading it again", {
          app_id: e.tables.join(","),
        });
        const fresh: Prepared[] = [];
        for (const p of prepared) fresh.push(p.ok ? await this.#prepare(p.entry) : p);
        prepared = fresh;
        given = undefined;
      }
    }
  }

  /**
   * Commits `prepared`, whose rows are `merged` already when given; `record`
   * says where rejections go (see #recordAnyway).
   */
  async #commit(
    prepared: Prepared[],
    given?: Map<string, RowGroup>,
    record: "all" | "deadLetter" | "none" = "all",
  ): Promise<{ rows: number; rejected: number }> {
    const { sql, errorsSql, rejects, spool, clientId } = this.#o;
    const merged = given ?? new Map<string, RowGroup>();
    const rejected: RejectedMessage[] = [];
    let rows = 0;
    for (const p of prepared) {
      if (!p.ok) {
        rejected.push(p.rejected);
        continue;
      }
      rows += p.rows;
      if (given) continue;
      for (const g of p.groups!) {
        const into = merged.get(g.key);
        if (into) mergeInto(into, g);
        else merged.set(g.key, copyGroup(g));
      }
    }
    const last = prepared[prepared.length - 1]!.entry.seq;
    const separateErrors = errorsSql !== sql;
    // In a separate errors database the dead letters are keyed by spool
    // position, so recording them again after a failed commit is a no-op.
    const toRecord = record === "none" ? [] : rejected;
    const options = { errorTable: record === "all" };
    if (separateErrors) await rejects.record(errorsSql, toRecord, options);
    await sql.begin((tx: Tx) => {
      // All statements are sent at once (pipelined): no round trip waits for
      // this thread between them. The first error fails the transaction.
      const sent: Promise<unknown>[] = [];
      for (const group of merged.values()) {
        for (const part of chunks(group, ROWS_PER_STATEMENT)) {
          const stmt = buildInsert(part);
          // Each array travels as one array literal, untyped (oid 0): the statement's
          // casts decide. (postgres.js would declare an array by its first element,
          // so [true, ...] became `bool` and `$n::bool[]` failed; and its own
          // serializer costs this thread about three times as much.)
          const values = stmt.values.map((v) => tx.typed(arrayLiteral(v as Cell[]) as never, 0));
          const prepare = this.#mayPrepare(stmt.text);
          sent.push(tx.unsafe(stmt.text, values as never[], { prepare }).execute());
        }
      }
      if (!separateErrors) sent.push(rejects.record(tx, toRecord, options));
      sent.push(
        tx.unsafe(
          `INSERT INTO ${this.#progress} (client_id, spool_epoch, last_seq, updated_at)
           VALUES ($1, $2, $3, now())
           ON CONFLICT (client_id) DO UPDATE
             SET spool_epoch = EXCLUDED.spool_epoch, last_seq = EXCLUDED.last_seq,
                 updated_at = EXCLUDED.updated_at`,
          [clientId, spool.epoch, last],
          { prepare: true },
        ).execute(),
      );
      // Sent after the inserts, which hold their tables' locks until COMMIT:
      // each name must still mean the relation the cache read, or the rows
      // went somewhere else (a view in its place, say). Rolled back then.
      const check = this.#replacedTables(tx, merged);
      sent.push(check); // (so a failed transaction does not leave it unhandled)
      this.#onBusy?.(last);
      return Promise.all(sent).then(async () => {
        const replaced = await check;
        if (replaced.length > 0) throw new TableReplaced(replaced);
      });
    });
    spool.deleteThrough(last);
    this.#lastSeq = last;
    for (const r of rejected) {
      const { rejection } = r;
      this.#o.events?.rejected?.(rejection.reason);
      log("warn", "message rejected", {
        app_id: rejection.appId,
        device: rejection.device,
        topic: r.topic,
        error: rejection.reason,
      });
    }
    return { rows, rejected: rejected.length };
  }
}

/**
 * Runs a `CREATE ... IF NOT EXISTS` again when another instance created the
 * same object at the same moment (PostgreSQL then reports a duplicate instead
 * of skipping), as happens when scaled-out instances start together.
 */
async function raceSafe(create: () => Promise<unknown>): Promise<void> {
  try {
    await create();
  } catch (e) {
    const code = (e as { code?: unknown }).code;
    if (code !== "23505" && code !== "42P07" && code !== "42710") throw e;
    await create();
  }
}

/** Characters that must be escaped inside a double-quoted array element. */
const ARRAY_SPECIAL = /["\\]/;

/**
 * The PostgreSQL array literal of `values` (`{"a","b\\"c",NULL,1.5,t}`), sent
 * as one bind parameter. Strings are always quoted (so `NULL`, braces,
 * commas and spaces stay text), with `\\` and `"` escaped; null is NULL.
 * The common cases (all plain strings, all numbers) are one native join:
 * no garbage per element.
 */
export function arrayLiteral(values: readonly Cell[]): string {
  let strings = 0, numbers = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (typeof v === "string") {
      if (ARRAY_SPECIAL.test(v)) return slowArrayLiteral(values);
      strings++;
    } else if (typeof v === "number") numbers++;
    else return slowArrayLiteral(values);
  }
  if (strings === values.length) return strings === 0 ? "{}" : '{"' + values.join('","') + '"}';
  if (numbers === values.length) return "{" + values.join(",") + "}";
  return slowArrayLiteral(values);
}

function slowArrayLiteral(values: readonly Cell[]): string {
  let out = "{";
  for (let i = 0; i < values.length; i++) {
    if (i > 0) out += ",";
    const v = values[i];
    if (v === null || v === undefined) out += "NULL";
    else if (typeof v === "string") {
      out += ARRAY_SPECIAL.test(v) ? '"' + v.replace(/["\\]/g, "\\$&") + '"' : '"' + v + '"';
    } else if (typeof v === "boolean") out += v ? "t" : "f";
    else out += String(v);
  }
  return out + "}";
}

function copyGroup(g: RowGroup): RowGroup {
  return {
    ...g,
    times: [...g.times],
    metrics: [...g.metrics],
    values: [...g.values],
    cells: g.cells.map((c) => [...c]),
  };
}

/** Splits a group into parts of at most `size` rows. */
function* chunks(g: RowGroup, size: number): Generator<RowGroup> {
  if (g.times.length <= size) {
    yield g;
    return;
  }
  for (let i = 0; i < g.times.length; i += size) {
    yield {
      ...g,
      times: g.times.slice(i, i + size),
      metrics: g.metrics.slice(i, i + size),
      values: g.values.slice(i, i + size),
      cells: g.cells.map((c) => c.slice(i, i + size)),
    };
  }
}

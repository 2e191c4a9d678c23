/**
 * Where rejected messages go: a row in `"errorTable"` that the platform shows
 * its users (upserted on `unique_error_src`), and the raw message in a
 * dead-letter table, so nothing accepted is ever lost and it can be replayed.
 */

import { qualified } from "./ident.ts";
import { safeText } from "./ir.ts";
import type { Sql, Tx } from "./db.ts";
import type { Rejection } from "./rejection.ts";

/** The dead-letter table's name, in the configured schema of the errors database. */
export const DEAD_LETTER_TABLE = "sif_dead_letter";

/** A rejected message with what is needed to replay it. */
export interface RejectedMessage {
  readonly rejection: Rejection;
  readonly topic: string;
  readonly payload: Uint8Array;
  readonly receivedAt: number;
  /** The spool position: with `source`, makes a replayed dead letter a no-op. */
  readonly seq: number;
}

export class RejectStore {
  readonly #errorTable: string;
  readonly #deadLetter: string;

  constructor(readonly schema: string, readonly source: string) {
    this.#errorTable = qualified(schema, "errorTable");
    this.#deadLetter = qualified(schema, DEAD_LETTER_TABLE);
  }

  /** Creates `"errorTable"` and the dead-letter table when they are missing. */
  async ensureTables(sql: Sql): Promise<void> {
    await sql.unsafe(`CREATE TABLE IF NOT EXISTS ${this.#errorTable} (
      app_id VARCHAR(128) NOT NULL,
      error TEXT NOT NULL,
      device VARCHAR(128) NOT NULL DEFAULT '',
      "timestamp" TIMESTAMPTZ NOT NULL DEFAULT now(),
      CONSTRAINT unique_error_src UNIQUE (app_id, error, device))`);
    await sql.unsafe(`CREATE TABLE IF NOT EXISTS ${this.#deadLetter} (
      id BIGSERIAL PRIMARY KEY,
      received_at TIMESTAMPTZ NOT NULL,
      rejected_at TIMESTAMPTZ NOT NULL DEFAULT now(),
      topic TEXT NOT NULL,
      app_id TEXT NOT NULL,
      device TEXT NOT NULL,
      error TEXT NOT NULL,
      payload BYTEA NOT NULL,
      source TEXT NOT NULL,
      source_seq BIGINT NOT NULL,
      UNIQUE (source, source_seq))`);
  }

  /**
   * Records rejected messages inside the caller's transaction; with
   * `errorTable: false` only their dead letters (an `"errorTable"` that
   * refuses the row, such as an older one with narrower columns).
   */
  async record(
    tx: Tx | Sql,
    items: readonly RejectedMessage[],
    { errorTable = true } = {},
  ): Promise<void> {
    if (items.length === 0) return;
    if (errorTable) await this.#recordErrors(tx, items);
    for (const m of items) await this.#recordDeadLetter(tx, m);
  }

  async #recordErrors(tx: Tx | Sql, items: readonly RejectedMessage[]): Promise<void> {
    // One upsert row per distinct (app_id, error, device): a statement may not
    // update the same row twice.
    const distinct = new Map<string, [string, string, string]>();
    for (const { rejection: r } of items) {
      const row: [string, string, string] = [
        safeText(r.appId),
        safeText(r.reason, 1000),
        safeText(r.device),
      ];
      distinct.set(row.join("\0"), row);
    }
    const rows = [...distinct.values()];
    await tx.unsafe(
      `INSERT INTO ${this.#errorTable} (app_id, error, device, "timestamp")
       SELECT a, e, d, now() FROM unnest($1::text[], $2::text[], $3::text[]) AS u(a, e, d)
       ON CONFLICT (app_id, error, device) DO UPDATE SET "timestamp" = EXCLUDED."timestamp"`,
      [rows.map((r) => r[0]), rows.map((r) => r[1]), rows.map((r) => r[2])],
      { prepare: true },
    );
  }

  async #recordDeadLetter(tx: Tx | Sql, m: RejectedMessage): Promise<void> {
    await tx.unsafe(
      `INSERT INTO ${this.#deadLetter}
           (received_at, topic, app_id, device, error, payload, source, source_seq)
         VALUES (to_timestamp($1::float8 / 1000), $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (source, source_seq) DO NOTHING`,
      [
        m.receivedAt,
        safeText(m.topic, 1024),
        safeText(m.rejection.appId),
        safeText(m.rejection.device),
        safeText(m.rejection.reason, 1000),
        m.payload,
        this.source,
        m.seq,
      ] as never[],
      { prepare: true },
    );
  }
}

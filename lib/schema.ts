/**
 * What app tables look like, read from the catalog and cached, so column and
 * type errors are found before a statement is sent. A miss (unknown table or
 * column) is trusted only when the catalog was read after the message arrived:
 * the table or column may have been created right before the message was sent.
 * So a flood of messages for a missing table costs one catalog read per batch.
 */

import type { Sql } from "./db.ts";
import type { ColumnInfo, ColumnKind, TableInfo } from "./translate.ts";

const KINDS: Record<string, ColumnKind> = {
  float8: "number",
  float4: "number",
  int2: "number",
  int4: "number",
  int8: "number",
  numeric: "number",
  varchar: "text",
  text: "text",
  bpchar: "text",
  bool: "boolean",
  timestamptz: "timestamp",
  timestamp: "timestamp",
};

/** Integer column types and the values they take (after rounding). */
const INT_RANGES: Record<string, { type: string; min: number; max: number }> = {
  int2: { type: "smallint", min: -32768, max: 32767 },
  int4: { type: "integer", min: -2147483648, max: 2147483647 },
  int8: { type: "bigint", min: -9223372036854775808, max: 9223372036854775807 },
};

/** Most tables remembered; a flood of made-up app ids cannot grow memory past it. */
const MAX_ENTRIES = 10_000;

interface Entry {
  info: TableInfo | null;
  readAt: number;
}

export class SchemaCache {
  readonly #entries = new Map<string, Entry>();

  constructor(
    private readonly sql: Sql,
    readonly schema: string,
    /** Without `notBefore`: reuse a miss younger than this (default 0: read again). */
    private readonly minRefreshMs = 0,
    private readonly now: () => number = Date.now,
  ) {}

  /**
   * The table's columns, or null when it does not exist; cached. A cached "does
   * not exist" is reused only when it was read after `notBefore` (ms since the
   * epoch; pass the message's receive time).
   */
  async get(table: string, notBefore?: number): Promise<TableInfo | null> {
    const hit = this.#entries.get(table);
    if (hit && (hit.info !== null || this.#fresh(hit, notBefore))) return hit.info;
    return await this.#read(table);
  }

  /** Re-reads the table (a column is missing) unless it was read after `notBefore`. */
  async refresh(table: string, notBefore?: number): Promise<TableInfo | null> {
    const hit = this.#entries.get(table);
    if (hit && this.#fresh(hit, notBefore)) return hit.info;
    return await this.#read(table);
  }

  #fresh(hit: Entry, notBefore: number | undefined): boolean {
    return notBefore === undefined
      ? this.now() - hit.readAt < this.minRefreshMs
      : hit.readAt > notBefore;
  }

  /** Forgets a table (after a statement failed on it). */
  invalidate(table: string): void {
    this.#entries.delete(table);
  }

  async #read(table: string): Promise<TableInfo | null> {
    const readAt = this.now(); // the catalog as of the query's start
    const rows = await this.sql.unsafe<
      { name: string; type: string; typmod: number; oid: string }[]
    >(
      `SELECT a.attname AS name, t.typname AS type, a.atttypmod AS typmod, c.oid::text AS oid
         FROM pg_catalog.pg_attribute a
         JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
        WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
          AND a.attnum > 0 AND NOT a.attisdropped`,
      [this.schema, table],
      { prepare: true },
    );
    let info: TableInfo | null = null;
    if (rows.length > 0) {
      const columns = new Map<string, ColumnInfo>();
      for (const r of rows) {
        const kind = KINDS[r.type] ?? "other";
        const sized = (r.type === "varchar" || r.type === "bpchar") && r.typmod > 4;
        const intRange = INT_RANGES[r.type];
        columns.set(r.name, {
          kind,
          maxChars: sized ? r.typmod - 4 : null,
          ...(intRange ? { intRange } : {}),
        });
      }
      info = { schema: this.schema, table, oid: rows[0]!.oid, columns };
    }
    // Unknown names come from senders: keep at most MAX_ENTRIES, oldest out first.
    this.#entries.delete(table);
    if (this.#entries.size >= MAX_ENTRIES) {
      this.#entries.delete(this.#entries.keys().next().value!);
    }
    this.#entries.set(table, { info, readAt });
    return info;
  }
}

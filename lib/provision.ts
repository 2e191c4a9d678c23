/**
 * AUTO_CREATE_TABLES: creates a missing app table the way the ingest-broker
 * does, from the first message that names it: `time`, `metric`, `value`,
 * one DOUBLE PRECISION column per numeric metadata key, one VARCHAR(128) per
 * other metadata key and per string metric. Where TimescaleDB is installed
 * the table becomes a hypertable, compressed after 7 days, segmented by
 * `metric` and the text metadata columns.
 *
 * Existing tables are never altered: a later message with a new metadata key
 * is rejected as `invalid metadata`, as it is in production. That error is
 * part of the user contract (SPEC section 4), the ingest-broker owns the
 * schema, and columns added from untrusted keys would grow a table without
 * bound (and each ALTER locks a busy, compressed hypertable).
 *
 * DDL runs in one transaction under an advisory lock and re-checks inside
 * it, so instances racing on the same table create it once.
 */

import type { Sql, Tx } from "./db.ts";
import { identifierProblem, qualified, quoteIdent } from "./ident.ts";
import type { IrMessage } from "./ir.ts";
import { log } from "./log.ts";

/** Advisory lock key that serializes this service's DDL across instances ("sifddl"). */
export const DDL_LOCK_KEY = 0x7369_6664_646c;
/** Chunks older than this are compressed. */
export const COMPRESS_AFTER = "7 days";

export type ColumnType = "DOUBLE PRECISION" | "VARCHAR(128)";

/** An extra column of a new app table. */
export interface ColumnSpec {
  readonly name: string;
  readonly type: ColumnType;
  /** A metadata column (a tag such as site or floor), not a string metric's column. */
  readonly metadata: boolean;
}

/**
 * The extra columns a new table needs for `msg` (every reading), sorted by
 * name. A metadata key is DOUBLE PRECISION when its values are numbers
 * (nulls aside) and VARCHAR(128) otherwise (strings, booleans, only nulls);
 * a string metric's column is VARCHAR(128) and wins over a metadata key of
 * the same name, as it does on insert.
 */
export function columnsFor(msg: IrMessage): ColumnSpec[] {
  const kinds = new Map<string, "number" | "text" | "unknown">();
  const metrics = new Set<string>();
  for (const r of msg.readings) {
    for (const [name, value] of r.metadata) {
      const prev = kinds.get(name) ?? "unknown";
      const next = value === null
        ? prev
        : typeof value === "number" && prev !== "text"
        ? "number"
        : "text";
      kinds.set(name, next);
    }
    for (const [name, value] of r.payload) {
      if (typeof value !== "string") continue;
      kinds.set(name, "text");
      metrics.add(name);
    }
  }
  return [...kinds.entries()]
    .map(([name, kind]): ColumnSpec => ({
      name,
      type: kind === "number" ? "DOUBLE PRECISION" : "VARCHAR(128)",
      metadata: !metrics.has(name),
    }))
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

/** Why the names cannot be used (same rules as inserts), or null. */
export function namesProblem(schema: string, table: string, columns: readonly ColumnSpec[]) {
  for (const [what, name] of [["schema", schema], ["table", table]] as const) {
    const p = identifierProblem(name);
    if (p) return `${what} name ${p}`;
  }
  for (const c of columns) {
    const p = identifierProblem(c.name);
    if (p) return `column name ${p}`;
    if (c.name === "time" || c.name === "metric" || c.name === "value") {
      return `column "${c.name}" is reserved`;
    }
  }
  return null;
}

/** `CREATE TABLE IF NOT EXISTS` for an app table (identifiers quoted, schema-qualified). */
export function createTableSql(
  schema: string,
  table: string,
  columns: readonly ColumnSpec[],
): string {
  const lines = [
    "time TIMESTAMPTZ NOT NULL",
    "metric VARCHAR(128) NOT NULL",
    "value DOUBLE PRECISION NOT NULL",
    ...columns.map((c) => `${quoteIdent(c.name)} ${c.type}`),
  ];
  return `CREATE TABLE IF NOT EXISTS ${qualified(schema, table)} (\n  ${lines.join(",\n  ")}\n)`;
}

/** A statement with bind parameters. */
export interface Statement {
  readonly text: string;
  readonly values: readonly string[];
}

/**
 * The TimescaleDB statements for a new table, with the extension's functions
 * qualified by `extSchema` (the service's search_path is pg_catalog).
 */
export function timescaleSql(
  extSchema: string,
  schema: string,
  table: string,
  columns: readonly ColumnSpec[],
): Statement[] {
  const ts = quoteIdent(extSchema);
  const target = qualified(schema, table);
  const tags = columns.filter((c) => c.metadata && c.type === "VARCHAR(128)").map((c) => c.name);
  const segmentBy = ["metric", ...tags].map(quoteIdent).join(", ");
  return [
    {
      text:
        `SELECT ${ts}.create_hypertable($1::pg_catalog.regclass, 'time', if_not_exists => TRUE)`,
      values: [target],
    },
    {
      // Storage options take no parameters: the column list is a quoted literal.
      text: `ALTER TABLE ${target} SET (timescaledb.compress, ` +
        `timescaledb.compress_segmentby = ${literal(segmentBy)}, ` +
        `timescaledb.compress_orderby = 'time DESC')`,
      values: [],
    },
    {
      text: `SELECT ${ts}.add_compression_policy($1::pg_catalog.regclass, ` +
        `INTERVAL '${COMPRESS_AFTER}', if_not_exists => TRUE)`,
      values: [target],
    },
  ];
}

/** An escape-string literal: the same meaning whatever standard_conforming_strings says. */
export function literal(s: string): string {
  return "E'" + s.replaceAll("\\", "\\\\").replaceAll("'", "''") + "'";
}

/** What `ensureTable` did. */
export type Provisioned =
  | { readonly ok: true; readonly created: boolean; readonly timescale: boolean }
  | { readonly ok: false; readonly reason: string };

/** Creates missing app tables in `schema` (see the module doc). */
export class Provisioner {
  constructor(private readonly sql: Sql, readonly schema: string) {}

  /**
   * Creates the table `msg` names when no relation of that name exists.
   * Database errors are thrown (the caller tells transient from permanent);
   * names that cannot be used come back as a reason.
   */
  async ensureTable(msg: IrMessage): Promise<Provisioned> {
    const table = msg.appId;
    const columns = columnsFor(msg);
    const problem = namesProblem(this.schema, table, columns);
    if (problem) return { ok: false, reason: problem };
    const result = await this.sql.begin(async (tx: Tx) => {
      await tx.unsafe("SELECT pg_catalog.pg_advisory_xact_lock($1::int8)", [String(DDL_LOCK_KEY)]);
      // Re-check under the lock: another instance may have just created it.
      if (await exists(tx, this.schema, table)) return { created: false, timescale: false };
      await tx.unsafe(createTableSql(this.schema, table, columns));
      const ext = await tx.unsafe<{ schema: string }[]>(
        `SELECT n.nspname AS schema FROM pg_catalog.pg_extension e
           JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
          WHERE e.extname = 'timescaledb'`,
      );
      const extSchema = ext[0]?.schema;
      if (extSchema !== undefined) {
        for (const s of timescaleSql(extSchema, this.schema, table, columns)) {
          await tx.unsafe(s.text, s.values as string[]);
        }
      }
      return { created: true, timescale: extSchema !== undefined };
    });
    if (result.created) {
      log("info", "created app table (AUTO_CREATE_TABLES)", {
        table: `${this.schema}.${table}`,
        columns: columns.map((c) => `${c.name} ${c.type}`),
        hypertable: result.timescale,
      });
    }
    return { ok: true, ...result };
  }
}

async function exists(tx: Tx, schema: string, table: string): Promise<boolean> {
  const rows = await tx.unsafe(
    `SELECT 1 FROM pg_catalog.pg_class c
       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname = $1 AND c.relname = $2`,
    [schema, table],
  );
  return rows.length > 0;
}

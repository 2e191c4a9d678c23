/**
 * IR + what the target table looks like → rows grouped for parameterized
 * inserts, or a rejection with the user's error string. Pure: no I/O.
 *
 * Values only ever travel as bind parameters; identifiers are validated
 * (lib/ir.ts) and double-quoted; the table is always schema-qualified.
 */

import { qualified, quoteIdent } from "./ident.ts";
import type { IrMessage, Scalar } from "./ir.ts";
import { Reasons, reject, type Rejection } from "./rejection.ts";

/** How a column's values are sent. */
export type ColumnKind = "number" | "text" | "boolean" | "timestamp" | "other";

export interface ColumnInfo {
  readonly kind: ColumnKind;
  /** Character limit of `varchar(n)` / `char(n)` columns, else null. */
  readonly maxChars: number | null;
  /**
   * Integer columns (smallint, integer, bigint): the values PostgreSQL
   * accepts (it rounds fractions). They hold identifiers and counts digit for
   * digit, so a JSON integer beyond 2^53, which lost digits in JSON.parse, is
   * refused rather than stored rounded (`numeric` and `double precision` take
   * it as the measurement it is).
   */
  readonly intRange?: { readonly type: string; readonly min: number; readonly max: number };
}

/** A table as found in the catalog. */
export interface TableInfo {
  readonly schema: string;
  readonly table: string;
  /**
   * The relation's oid when read from the catalog: the writer checks, inside
   * the transaction, that the name still means this relation.
   */
  readonly oid?: string;
  readonly columns: ReadonlyMap<string, ColumnInfo>;
}

/** A value bound for an extra (metadata or string-metric) column. */
export type Cell = string | number | boolean | null;

/** Rows of one table that share one column set: one statement's worth. */
export interface RowGroup {
  /** Identifies table + column set; groups with equal keys can be merged. */
  readonly key: string;
  readonly table: TableInfo;
  /** Extra columns after time, metric, value. */
  readonly columns: readonly string[];
  readonly times: string[];
  readonly metrics: string[];
  readonly values: number[];
  /** One array per extra column, parallel to `times`. */
  readonly cells: Cell[][];
}

/**
 * Most values (rows x columns, `time`, `metric` and `value` included) one
 * message may produce. Metadata is repeated in every row of its reading, so
 * a 4 MiB message with 300 metadata keys and 440,000 metrics asked for 133
 * million values: 4 GB of memory and a minute of CPU, enough to crash the
 * service (and again on every restart, from the spool). Real messages are
 * far below it, and so is a 4 MiB message of metrics without metadata.
 */
export const MAX_CELLS_PER_MESSAGE = 2_000_000;

export type Translation =
  | { readonly ok: true; readonly groups: RowGroup[]; readonly rows: number }
  | { readonly ok: false; readonly rejection: Rejection; readonly missingColumn: boolean };

/** True when the table has the app-table core columns, so it may be written. */
export function isAppTable(info: TableInfo): boolean {
  const c = info.columns;
  return c.get("time")?.kind === "timestamp" && c.get("metric")?.kind === "text" &&
    c.get("value")?.kind === "number";
}

/**
 * Turns one message into row groups for `table` (null when it does not
 * exist). All rows of the message are accepted or none: any problem rejects
 * the whole message. `missingColumn`: the message names a column `table`
 * lacks. Any rejection but a malformed message may change with a fresher
 * `table`; the writer re-reads the catalog once before it trusts one.
 */
export function translate(msg: IrMessage, table: TableInfo | null): Translation {
  const appId = msg.appId;
  if (table === null || !isAppTable(table)) {
    // Attributed to the first reading's device, so the user can tell which sender it was.
    const device = msg.readings[0]?.device ?? "";
    return {
      ok: false,
      rejection: reject(Reasons.invalidApp, appId, device),
      missingColumn: false,
    };
  }
  const metricLimit = table.columns.get("metric")!.maxChars;
  const valueCol = table.columns.get("value")!;
  // Only an integer value column can refuse a number (double precision takes any).
  const checkValue = valueCol.intRange !== undefined;
  const groups = new Map<string, RowGroup>();
  let rows = 0;
  let total = 0; // values so far (see MAX_CELLS_PER_MESSAGE)
  for (const reading of msg.readings) {
    const fail = (reason: string, missingColumn = false): Translation => ({
      ok: false,
      rejection: reject(reason, appId, reading.device),
      missingColumn,
    });
    // Metadata cells shared by every row of this reading.
    const metaNames: string[] = [];
    const metaCells: Cell[] = [];
    for (const [name, value] of reading.metadata) {
      const col = table.columns.get(name);
      if (!col) return fail(Reasons.invalidMetadata, true);
      const cell = cellFor(value, col, name);
      if (typeof cell === "object" && cell !== null) return fail(cell.reason);
      metaNames.push(name);
      metaCells.push(cell);
    }
    for (const [metric, value] of reading.payload) {
      if (value === null) continue;
      if (metricLimit !== null && charLength(metric) > metricLimit) {
        return fail(`metric name too long (max ${metricLimit} characters)`);
      }
      let names = metaNames;
      let cells = metaCells;
      let numeric: number;
      if (typeof value === "number") {
        if (checkValue) {
          const cell = cellFor(value, valueCol, "value");
          if (typeof cell === "object" && cell !== null) return fail(cell.reason);
        }
        numeric = value;
      } else if (typeof value === "boolean") numeric = value ? 1 : 0;
      else {
        // A string metric: value 0, the text in the column named after the metric.
        const col = table.columns.get(metric);
        if (!col) return fail(Reasons.invalidMetadata, true);
        // A number column gives Reasons.stringForNumber; other kinds say what they expect.
        const cell = cellFor(value, col, metric);
        if (typeof cell === "object" && cell !== null) return fail(cell.reason);
        const at = metaNames.indexOf(metric);
        if (at >= 0) {
          cells = metaCells.slice();
          cells[at] = cell; // the metric's string wins over a metadata key of the same name
        } else {
          names = [...metaNames, metric];
          cells = [...metaCells, cell];
        }
        numeric = 0;
      }
      total += 3 + names.length;
      if (total > MAX_CELLS_PER_MESSAGE) {
        return fail(`message too large (over ${MAX_CELLS_PER_MESSAGE} values: rows x columns)`);
      }
      addRow(groups, table, names, reading.time, metric, numeric, cells);
      rows++;
    }
  }
  return { ok: true, groups: [...groups.values()], rows };
}

/** Converts one value for `col`, or says why it does not fit. */
function cellFor(value: Scalar, col: ColumnInfo, name: string): Cell | { reason: string } {
  if (value === null) return null;
  switch (col.kind) {
    case "number":
      if (typeof value === "number") {
        const r = col.intRange;
        if (r) {
          if (!exactInteger(value)) return { reason: inexact(name, false) };
          if (value < r.min - 0.5 || value >= r.max + 0.5) {
            return { reason: `value out of range for column "${name}" (${r.type})` };
          }
        }
        return value;
      }
      if (typeof value === "string") return { reason: Reasons.stringForNumber };
      return { reason: Reasons.booleanForNumber };
    case "text": {
      if (typeof value === "number" && !exactInteger(value)) return { reason: inexact(name) };
      const text = typeof value === "string" ? value : String(value);
      if (col.maxChars !== null && charLength(text) > col.maxChars) {
        return { reason: `value too long for column "${name}" (max ${col.maxChars} characters)` };
      }
      return text;
    }
    case "boolean":
      if (typeof value === "boolean") return value;
      return { reason: `unexpected ${typeof value} (expected boolean)` };
    default:
      return { reason: `unsupported column type for "${name}"` };
  }
}

/** False for an integer beyond 2^53, whose JSON digits a double cannot keep. */
function exactInteger(n: number): boolean {
  return !Number.isInteger(n) || Number.isSafeInteger(n);
}

function inexact(name: string, asString = true): string {
  return `number beyond 2^53 cannot be stored exactly in column "${name}"` +
    (asString ? " (send it as a string)" : "");
}

/** Length in characters (code points), as PostgreSQL counts for varchar(n). */
function charLength(s: string): number {
  if (s.length <= 1 || !/[\uD800-\uDFFF]/.test(s)) return s.length;
  let n = 0;
  for (const _ of s) n++;
  return n;
}

function addRow(
  groups: Map<string, RowGroup>,
  table: TableInfo,
  names: readonly string[],
  time: string,
  metric: string,
  value: number,
  cells: readonly Cell[],
): void {
  // Sort columns so that equal column sets share one statement text.
  const order = names.map((_, i) => i).sort((a, b) => cmp(names[a]!, names[b]!));
  const sorted = order.map((i) => names[i]!);
  const key = groupKey(table, sorted);
  let group = groups.get(key);
  if (!group) {
    group = {
      key,
      table,
      columns: sorted,
      times: [],
      metrics: [],
      values: [],
      cells: sorted.map(() => []),
    };
    groups.set(key, group);
  }
  group.times.push(time);
  group.metrics.push(metric);
  group.values.push(value);
  for (let j = 0; j < order.length; j++) group.cells[j]!.push(cells[order[j]!]!);
}

function cmp(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** The merge key of a table and a sorted column set (NUL cannot occur in names). */
export function groupKey(table: TableInfo, columns: readonly string[]): string {
  return [table.schema, table.table, ...columns].join("\0");
}

/** Appends `src`'s rows to `dst` (same key). */
export function mergeInto(dst: RowGroup, src: RowGroup): void {
  append(dst.times, src.times);
  append(dst.metrics, src.metrics);
  append(dst.values, src.values);
  for (let j = 0; j < dst.cells.length; j++) append(dst.cells[j]!, src.cells[j]!);
}

/** `dst.push(...src)` without spreading: a spread of ~150,000+ items overflows the stack. */
function append<T>(dst: T[], src: readonly T[]): void {
  for (let i = 0; i < src.length; i++) dst.push(src[i]!);
}

/** SQL text and bind values for one statement. */
export interface Statement {
  readonly text: string;
  readonly values: unknown[];
}

const ARRAY_TYPE: Record<ColumnKind, string> = {
  number: "float8[]",
  text: "text[]",
  boolean: "bool[]",
  timestamp: "text[]",
  other: "text[]",
};

/**
 * One INSERT for a whole group: each column travels as one array parameter
 * and `unnest` turns them into rows, so the parameter count is the column
 * count (never near the protocol's 65,535 limit) and the SQL text is stable
 * for a column set, which keeps it prepared.
 */
export function buildInsert(group: RowGroup): Statement {
  const { table, columns } = group;
  const names = ["time", "metric", "value", ...columns].map(quoteIdent);
  const types = ["text[]", "text[]", "float8[]"];
  for (const c of columns) types.push(ARRAY_TYPE[table.columns.get(c)!.kind]);
  const params = types.map((t, i) => `$${i + 1}::${t}`);
  const aliases = names.map((_, i) => `c${i}`);
  const select = aliases.map((a, i) => (i === 0 ? `${a}::timestamptz` : a));
  const text = `INSERT INTO ${qualified(table.schema, table.table)} (${names.join(", ")}) ` +
    `SELECT ${select.join(", ")} FROM unnest(${params.join(", ")}) AS u(${aliases.join(", ")})`;
  return { text, values: [group.times, group.metrics, group.values, ...group.cells] };
}

/**
 * PostgreSQL connections (postgres.js) built from the typed config. postgres.js
 * ignores `PGSSLMODE` and `sslrootcert`, so the TLS options are mapped here.
 */

import { checkServerIdentity, type PeerCertificate } from "node:tls";
import postgres from "postgres";
import type { DbConfig } from "./config.ts";
import { log } from "./log.ts";

export type Sql = postgres.Sql;
export type Tx = postgres.TransactionSql;

/** The TLS options for node:tls that match libpq's `sslmode`. */
export function tlsOptions(cfg: DbConfig): false | Record<string, unknown> {
  switch (cfg.sslMode) {
    case "disable":
      return false;
    case "require":
      // Encrypted but not verified, as libpq does without a root certificate.
      return cfg.ca
        ? { ca: cfg.ca, rejectUnauthorized: true, checkServerIdentity: () => undefined }
        : { rejectUnauthorized: false };
    case "verify-ca":
      return { ca: cfg.ca, rejectUnauthorized: true, checkServerIdentity: () => undefined };
    case "verify-full":
      // postgres.js sends no servername for an IP host, and node:tls then checks the
      // certificate against "localhost" instead: check against the host we dial.
      return {
        ca: cfg.ca,
        rejectUnauthorized: true,
        checkServerIdentity: (_name: string, cert: PeerCertificate) =>
          checkServerIdentity(cfg.host, cert),
      };
  }
}

/** Opens a lazy connection pool. `search_path` is pinned so nothing resolves elsewhere. */
export function connect(cfg: DbConfig, max = cfg.poolSize ?? 2): Sql {
  guardClosedSocketWrite();
  return postgres({
    host: cfg.host,
    port: cfg.port,
    user: cfg.user,
    pass: cfg.password,
    database: cfg.database,
    ssl: tlsOptions(cfg) as postgres.Options<Record<string, never>>["ssl"],
    max,
    connect_timeout: 10,
    idle_timeout: 0,
    max_lifetime: 60 * 60,
    prepare: true,
    onnotice: () => {},
    connection: {
      application_name: "sif-stream-broker",
      TimeZone: "UTC",
      search_path: "pg_catalog",
    },
  });
}

/** `user@host:port/database (tls mode)`: what the log says it connects to. */
export function describe(cfg: DbConfig): string {
  return `${cfg.user}@${cfg.host}:${cfg.port}/${cfg.database} (sslmode ${cfg.sslMode})`;
}

/** SQLSTATE classes worth retrying: connection, resources, operator, locks, system. */
const TRANSIENT_CLASSES = new Set(["08", "53", "57", "58", "40", "55", "25", "HV"]);
const TRANSIENT_CODES = new Set([
  "CONNECTION_CLOSED",
  "CONNECTION_ENDED",
  "CONNECTION_DESTROYED",
  "CONNECT_TIMEOUT",
  "ECONNREFUSED",
  "ECONNRESET",
  "ETIMEDOUT",
  "EPIPE",
  "ENOTFOUND",
  "EAI_AGAIN",
  "EHOSTUNREACH",
  "ENETUNREACH",
]);

/**
 * SQLSTATEs that a smaller batch may avoid, so the writer splits the batch
 * instead of retrying it whole forever: the shared lock table is full (53200:
 * one transaction touched too many tables and indexes), a configured limit
 * (53400), or a statement ran into `statement_timeout` (57014).
 */
const SIZE_DEPENDENT_CODES = new Set(["53200", "53400", "57014"]);

/** True for a database error that a smaller batch may avoid (see SIZE_DEPENDENT_CODES). */
export function isSizeDependent(err: unknown): boolean {
  return err instanceof postgres.PostgresError && SIZE_DEPENDENT_CODES.has(err.code);
}

/** True when a statement was cancelled, by `statement_timeout` or by an operator (57014). */
export function isStatementCancel(err: unknown): boolean {
  return err instanceof postgres.PostgresError && err.code === "57014";
}

/**
 * True when a database error may go away by itself (so the batch is retried),
 * false when it is about the data (so the message is rejected). Unknown
 * non-database errors count as transient only when they look like I/O.
 */
export function isTransient(err: unknown): boolean {
  if (!(err instanceof Error)) return false;
  const code = (err as { code?: unknown }).code;
  if (err instanceof postgres.PostgresError) {
    return TRANSIENT_CLASSES.has(String(code).slice(0, 2));
  }
  if (typeof code === "string" && (TRANSIENT_CODES.has(code) || code.startsWith("ERR_TLS"))) {
    return true;
  }
  return /connect|socket|closed|timeout|TLS|certificate/i.test(err.message);
}

/** A short, safe description of a database error for logs and "errorTable". */
export function errorText(err: unknown): string {
  if (err instanceof postgres.PostgresError) return `${err.message} (SQLSTATE ${err.code})`;
  if (err instanceof Error) {
    const code = (err as { code?: unknown }).code;
    return typeof code === "string" && !err.message.includes(code)
      ? `${err.message} (${code})`
      : err.message;
  }
  return String(err);
}

let guarded = false;

/**
 * postgres.js 3.4.9 queues small writes with setImmediate; when the server
 * closes the connection first, that write runs on a null socket and throws
 * outside any promise (porsager/postgres#1154, #1208; `bench --outage` and
 * fault_test "fault 1" hit it), which would end the process. The queries of
 * that connection were already rejected with CONNECTION_CLOSED, so the writer
 * retries them: this one error is dropped, with a log line.
 */
function guardClosedSocketWrite(): void {
  if (guarded) return;
  guarded = true;
  globalThis.addEventListener("error", (event) => {
    const e = event.error;
    if (
      e instanceof TypeError && e.message.includes("(reading 'write')") &&
      /nextWrite[\s\S]*postgres/.test(e.stack ?? "")
    ) {
      event.preventDefault();
      log("warn", "write on a closed database connection ignored (postgres.js)");
    }
  });
}

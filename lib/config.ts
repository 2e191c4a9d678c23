/**
 * Configuration: the environment first, then a `.env` file (working directory,
 * or beside the executable) for what the environment does not set. Read once
 * into a frozen, typed object; no other module reads the environment.
 */

import dotenv from "dotenv";
import { dirname, join } from "node:path";
import { hostname } from "node:os";

export type SslMode = "disable" | "require" | "verify-ca" | "verify-full";

export interface DbConfig {
  readonly host: string;
  readonly port: number;
  readonly user: string;
  readonly password: string | undefined;
  readonly database: string;
  readonly sslMode: SslMode;
  /** PEM text of the CA (read at start-up), when `PGSSLROOTCERT` is set. */
  readonly ca: string | undefined;
  readonly caPath: string | undefined;
  /** False when TS_HOST was unset and the development default is used. */
  readonly explicit: boolean;
  /** Connections in the pool (default 2); 1 for the embedded database (lib/embedded.ts). */
  readonly poolSize?: number;
}

export interface MqttConfig {
  /** `mqtt://host:port` or `mqtts://host:port`. */
  readonly url: string;
  readonly topic: string;
  readonly clientId: string;
  readonly username: string | undefined;
  readonly password: string | undefined;
  readonly ca: string | undefined;
  readonly cert: string | undefined;
  readonly key: string | undefined;
  readonly shareGroup: string | undefined;
  /** False when INGEST_STREAM was unset and the development default is used. */
  readonly explicit: boolean;
  /** 5 (MQTT 5, default) or 4 (MQTT 3.1.1, for the embedded broker, which lacks 5). */
  readonly protocolVersion?: 4 | 5;
}

export interface Config {
  readonly env: "DEVELOPMENT" | "PRODUCTION";
  readonly mqtt: MqttConfig;
  readonly db: DbConfig;
  /** Database holding "errorTable" and the dead letters. */
  readonly errorsDb: DbConfig;
  readonly schema: string;
  readonly stateDir: string;
  readonly spoolMaxBytes: number;
  readonly batchMaxMessages: number;
  readonly batchMaxWaitMs: number;
  readonly logLevel: "debug" | "info" | "warn" | "error";
  /** `normal` survives a crash of the process; `full` also a power loss. */
  readonly spoolSync: "normal" | "full";
  /** Health, readiness and metrics; port 0 turns the HTTP server off. */
  readonly httpHost: string;
  readonly httpPort: number;
  /** Create missing app tables (development default), see lib/provision.ts. */
  readonly autoCreateTables: boolean;
  /** Where the settings came from, for the start-up log line. */
  readonly envFile: string | undefined;
}

/** Thrown with every problem found, one per line, each naming its setting. */
export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(problems.join("\n"));
    this.name = "ConfigError";
  }
}

/** Finds and parses the `.env` file; returns its variables and path. */
export function readEnvFile(
  candidates: string[] = defaultEnvFiles(),
): { vars: Record<string, string>; path: string | undefined } {
  for (const path of candidates) {
    let text: string;
    try {
      text = Deno.readTextFileSync(path);
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) continue;
      throw new ConfigError([`cannot read ${path}: ${(e as Error).message}`]);
    }
    return { vars: dotenv.parse(text), path };
  }
  return { vars: {}, path: undefined };
}

function defaultEnvFiles(): string[] {
  const files = [join(Deno.cwd(), ".env")];
  // In a compiled binary, also look beside the executable.
  if (Deno.build.standalone) files.push(join(dirname(Deno.execPath()), ".env"));
  return files;
}

/**
 * Builds the configuration from `env` (the process environment merged over
 * the `.env` file) and the command line. Fails with every problem at once.
 */
export function loadConfig(
  env: Record<string, string | undefined>,
  args: readonly string[] = [],
  envFile?: string,
): Config {
  const problems: string[] = [];
  const get = (name: string): string | undefined => {
    const v = env[name]?.trim();
    return v === "" ? undefined : v;
  };
  const envName = (get("ENV") ?? "DEVELOPMENT").toUpperCase();
  if (envName !== "DEVELOPMENT" && envName !== "PRODUCTION") {
    problems.push(`ENV must be DEVELOPMENT or PRODUCTION (got "${envName}")`);
  }
  const production = envName === "PRODUCTION";
  const required = (name: string, devDefault: string): string => {
    const v = get(name);
    if (v !== undefined) return v;
    if (production) problems.push(`${name} is required when ENV=PRODUCTION`);
    return devDefault;
  };
  const int = (name: string, fallback: number, min: number, max: number): number => {
    const raw = get(name);
    if (raw === undefined) return fallback;
    const n = Number(raw);
    if (!Number.isInteger(n) || n < min || n > max) {
      problems.push(`${name} must be an integer from ${min} to ${max} (got "${raw}")`);
      return fallback;
    }
    return n;
  };
  const bool = (name: string, fallback: boolean): boolean => {
    const raw = get(name)?.toLowerCase();
    if (raw === undefined) return fallback;
    if (["1", "true", "yes", "on"].includes(raw)) return true;
    if (["0", "false", "no", "off"].includes(raw)) return false;
    problems.push(`${name} must be true or false (got "${raw}")`);
    return fallback;
  };
  const file = (name: string): string | undefined => {
    const path = get(name);
    if (path === undefined) return undefined;
    try {
      return Deno.readTextFileSync(path);
    } catch (e) {
      problems.push(`${name}: cannot read ${path}: ${(e as Error).message}`);
      return undefined;
    }
  };

  /** A PEM file that must hold `what` (caught here: a later handshake error says less). */
  const pem = (name: string, what: "CERTIFICATE" | "PRIVATE KEY"): string | undefined => {
    const text = file(name);
    const marker = what === "CERTIFICATE" ? "-----BEGIN CERTIFICATE-----" : "PRIVATE KEY-----";
    if (text !== undefined && !text.includes(marker)) {
      problems.push(`${name}: ${get(name)} holds no PEM ${what.toLowerCase()} ("${marker}")`);
    }
    return text;
  };

  // MQTT
  const positional = args.filter((a) => !a.startsWith("-"));
  if (positional.length > 1) problems.push("at most one argument (the channel) is accepted");
  const channel = positional[0];
  let topic = get("MQTT_TOPIC") ?? "ingest/stream/#";
  if (channel !== undefined) {
    if (!/^[A-Za-z0-9_-]+$/.test(channel)) problems.push(`invalid channel "${channel}"`);
    topic = `ingest/stream/${channel}`;
  }
  const shareGroup = get("INGEST_SHARE_GROUP");
  // DEV_MQTT_PORT moves the development default (localhost:1883), as TS_PORT
  // does for the database; tests use it to find nothing on the default.
  const devBroker = `localhost:${int("DEV_MQTT_PORT", 1883, 1, 65535)}`;
  const mqttUrl = brokerUrl(required("INGEST_STREAM", devBroker), problems);
  const caFile = pem("MQTT_CA", "CERTIFICATE");
  const cert = pem("MQTT_CERT", "CERTIFICATE");
  const key = pem("MQTT_KEY", "PRIVATE KEY");
  if (!get("MQTT_CERT") !== !get("MQTT_KEY")) {
    problems.push("MQTT_CERT and MQTT_KEY go together: set both or neither");
  }
  const mqtt: MqttConfig = {
    url: caFile && mqttUrl.startsWith("mqtt://") ? mqttUrl.replace("mqtt://", "mqtts://") : mqttUrl,
    topic: shareGroup ? `$share/${shareGroup}/${topic}` : topic,
    clientId: get("MQTT_CLIENT_ID") ?? `sif-stream-broker-${safeHostname()}`,
    username: get("MQTT_USERNAME"),
    password: get("MQTT_PASSWORD"),
    ca: caFile,
    cert,
    key,
    shareGroup,
    explicit: get("INGEST_STREAM") !== undefined,
    protocolVersion: 5,
  };

  // PostgreSQL
  const caPath = get("PGSSLROOTCERT");
  const ca = pem("PGSSLROOTCERT", "CERTIFICATE");
  const sslRaw = (get("PGSSLMODE") ?? (caPath ? "verify-full" : production ? "" : "disable"))
    .toLowerCase();
  let sslMode: SslMode = "disable";
  if (["disable", "require", "verify-ca", "verify-full"].includes(sslRaw)) {
    sslMode = sslRaw as SslMode;
  } else if (sslRaw === "") {
    problems.push("PGSSLROOTCERT (or PGSSLMODE) is required when ENV=PRODUCTION");
  } else {
    problems.push(`PGSSLMODE must be disable, require, verify-ca or verify-full (got "${sslRaw}")`);
  }
  if ((sslMode === "verify-ca" || sslMode === "verify-full") && !caPath) {
    problems.push(`PGSSLMODE=${sslMode} needs PGSSLROOTCERT (the CA certificate)`);
  }
  const db: DbConfig = {
    host: required("TS_HOST", "127.0.0.1"),
    port: int("TS_PORT", 5432, 1, 65535),
    user: required("TS_USER", "postgres"),
    password: get("TS_PASSWD"),
    database: required("TS_DATABASE", "postgres"),
    sslMode,
    ca,
    caPath,
    explicit: get("TS_HOST") !== undefined,
  };
  const errorsDb: DbConfig = { ...db, database: get("TS_DATABASE_ERRORS") ?? db.database };

  const schema = get("TS_SCHEMA") ?? "public";
  const level = (get("LOG_LEVEL") ?? "info").toLowerCase();
  if (!["debug", "info", "warn", "error"].includes(level)) {
    problems.push(`LOG_LEVEL must be debug, info, warn or error (got "${level}")`);
  }
  const config: Config = {
    env: production ? "PRODUCTION" : "DEVELOPMENT",
    mqtt,
    db,
    errorsDb,
    schema,
    stateDir: get("STATE_DIR") ?? get("STATE_DIRECTORY") ?? (production ? "" : "./data"),
    spoolMaxBytes: int("SPOOL_MAX_BYTES", 1024 ** 3, 1024 * 1024, Number.MAX_SAFE_INTEGER),
    batchMaxMessages: int("BATCH_MAX_MESSAGES", 2000, 1, 100_000),
    batchMaxWaitMs: int("BATCH_MAX_WAIT_MS", 20, 0, 60_000),
    logLevel: level as Config["logLevel"],
    spoolSync: bool("SPOOL_SYNC_FULL", false) ? "full" : "normal",
    httpHost: get("HTTP_HOST") ?? "127.0.0.1",
    httpPort: int("HTTP_PORT", 9464, 0, 65535),
    autoCreateTables: bool("AUTO_CREATE_TABLES", !production),
    envFile,
  };
  if (config.stateDir === "") problems.push("STATE_DIR is required when ENV=PRODUCTION");
  if (problems.length > 0) throw new ConfigError(problems);
  return Object.freeze(config);
}

/** `host`, `host:port`, `mqtt://host:port` or `mqtts://host:port` → URL. */
function brokerUrl(raw: string, problems: string[]): string {
  const m = /^(?:(mqtts?):\/\/)?(\[[^\]]+\]|[^:/\s]+)(?::(\d+))?\/?$/.exec(raw);
  if (!m) {
    // Never echo credentials someone put into the address.
    const shown = raw.replace(/^((?:[a-z]+:\/\/)?)[^@/\s]*@/i, "$1***@");
    const hint = shown === raw ? "" : "; credentials go in MQTT_USERNAME and MQTT_PASSWORD";
    problems.push(
      `INGEST_STREAM must be host, host:port or mqtt(s)://host:port (got "${shown}")${hint}`,
    );
    return "mqtt://localhost:1883";
  }
  const scheme = m[1] ?? "mqtt";
  const port = m[3] ?? (scheme === "mqtts" ? "8883" : "1883");
  return `${scheme}://${m[2]}:${port}`;
}

function safeHostname(): string {
  try {
    return hostname().replace(/[^A-Za-z0-9_-]/g, "-");
  } catch {
    return "local";
  }
}

/** The merged environment: process variables win over the `.env` file. */
export function mergedEnv(fileVars: Record<string, string>): Record<string, string | undefined> {
  return { ...fileVars, ...Deno.env.toObject() };
}

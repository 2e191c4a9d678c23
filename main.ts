/**
 * sif-stream-broker: IR messages from MQTT into PostgreSQL/TimescaleDB.
 * Loads the configuration, wires the parts and owns the lifecycle.
 */

import { ConfigError, loadConfig, mergedEnv, readEnvFile } from "./lib/config.ts";
import { describe } from "./lib/db.ts";
import { log, setLogLevel } from "./lib/log.ts";
import { startService } from "./lib/service.ts";
import { VERSION } from "./lib/version.ts";

/** How long shutdown may spend writing what is pending. */
const SHUTDOWN_DEADLINE_MS = 20_000;

async function main(args: string[]): Promise<number> {
  if (args.includes("--version")) {
    console.log(`sif-stream-broker ${VERSION}`);
    return 0;
  }
  if (args.includes("--help") || args.includes("-h")) {
    console.log(HELP);
    return 0;
  }
  let config;
  try {
    const file = readEnvFile();
    config = loadConfig(mergedEnv(file.vars), args, file.path);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    for (const problem of e.problems) log("error", "configuration: " + problem);
    return 2;
  }
  setLogLevel(config.logLevel);
  log("info", "starting", {
    version: VERSION,
    env: config.env,
    env_file: config.envFile ?? null,
    broker: config.mqtt.url,
    topic: config.mqtt.topic,
    database: describe(config.db),
    errors_database: config.errorsDb.database,
    state_dir: config.stateDir,
  });

  // Development only: an embedded broker and database where none is configured or running.
  // Loaded only then: production never evaluates them.
  let embedded = { config, stop: () => Promise.resolve() };
  if (config.env === "DEVELOPMENT") {
    try {
      const { startEmbedded } = await import("./lib/embedded.ts");
      embedded = await startEmbedded(config);
    } catch (e) {
      log("error", "cannot start the embedded broker or database", { error: e });
      return 1;
    }
  }
  let service;
  try {
    service = startService(embedded.config);
  } catch (e) {
    log("error", "cannot start", { error: e });
    await embedded.stop();
    return 1;
  }
  let stopRequested: (() => void) | null = null;
  const stopped = new Promise<void>((resolve) => (stopRequested = resolve));

  let firstSignalAt = 0;
  const onSignal = (name: Deno.Signal) => () => {
    // A task runner or systemd's control group may deliver the same signal
    // twice at once; only a second signal a moment later means "exit now".
    if (firstSignalAt && Date.now() - firstSignalAt < 1000) return;
    if (firstSignalAt) {
      log("warn", "second signal: exiting now, the spool keeps what is pending", { signal: name });
      Deno.exit(130);
    }
    firstSignalAt = Date.now();
    log("info", "stopping", { signal: name });
    stopRequested?.();
  };
  Deno.addSignalListener("SIGTERM", onSignal("SIGTERM"));
  Deno.addSignalListener("SIGINT", onSignal("SIGINT"));

  const fatal = await Promise.race([stopped.then(() => null), service.fatal]);
  const { drained, pending } = await service.stop(SHUTDOWN_DEADLINE_MS);
  await embedded.stop();
  log(drained ? "info" : "warn", "stopped", { pending_in_spool: pending });
  return fatal ? 1 : 0;
}

const HELP = `sif-stream-broker ${VERSION}: IR messages from MQTT into PostgreSQL/TimescaleDB

Usage: sif-stream-broker [channel]
  channel     subscribe to ingest/stream/<channel> only (default: ingest/stream/#)
  --help      this text
  --version   the version

Settings come from the environment, then from .env in the working directory
(or beside the executable). See .env.example for all of them:
  ENV                  DEVELOPMENT (default) or PRODUCTION
  INGEST_STREAM        MQTT broker: host, host:port, mqtt://host:port, mqtts://host:port
  TS_HOST TS_PORT TS_USER TS_PASSWD TS_DATABASE   PostgreSQL connection
  TS_DATABASE_ERRORS   database holding "errorTable" (default TS_DATABASE)
  PGSSLROOTCERT        CA certificate for TLS to PostgreSQL (sslmode verify-full)
  PGSSLMODE            disable | require | verify-ca | verify-full
  STATE_DIR            folder of the local spool (default ./data in development;
                       under systemd, StateDirectory= sets STATE_DIRECTORY)
  MQTT_USERNAME MQTT_PASSWORD   broker credentials
  MQTT_CA MQTT_CERT MQTT_KEY    TLS to the broker: CA, client certificate and key (PEM)
  MQTT_CLIENT_ID       stable client id (the broker keeps its session while away)
  INGEST_SHARE_GROUP   subscribe via $share/<group>/<topic>: instances split the stream
  HTTP_HOST HTTP_PORT  /healthz /readyz /metrics (default 127.0.0.1:9464; port 0 = off)
  MQTT_TOPIC           topic filter (default ingest/stream/#)
  TS_SCHEMA            schema of the app tables (default public)
  SPOOL_MAX_BYTES      stop acknowledging beyond this spool size (default 1 GiB)
  SPOOL_SYNC_FULL      true: fsync every spool append (survives power loss; slower)
  BATCH_MAX_MESSAGES BATCH_MAX_WAIT_MS   batch size and fill time (default 2000, 20 ms)
  AUTO_CREATE_TABLES   create a missing app table (default: on in development only)
  LOG_LEVEL            debug | info (default) | warn | error; JSON lines on stdout`;

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}

/**
 * The operations endpoint: `/healthz` (the process answers), `/readyz` (broker
 * connected and database reachable) and `/metrics` (Prometheus text). Bound
 * to a configurable address, 127.0.0.1 by default; nothing here is secret but
 * nothing here is for the public either.
 */

import { log } from "./log.ts";

/** What the endpoint asks the service. */
export interface HttpSources {
  /** Readiness and the checks behind it, e.g. `{ mqtt: true, database: false }`. */
  ready(): { ready: boolean; checks: Record<string, boolean> };
  metrics(): Promise<{ contentType: string; body: string }>;
}

export interface OpsServer {
  /** The port actually bound. */
  readonly port: number;
  close(): Promise<void>;
}

/** Thrown when the address cannot be bound; the message names the settings. */
export class HttpBindError extends Error {
  override name = "HttpBindError";
}

const NO_STORE = { "cache-control": "no-store" };

/** Starts the server; throws `HttpBindError` when the address is taken or not allowed. */
export function startHttp(hostname: string, port: number, sources: HttpSources): OpsServer {
  let server: Deno.HttpServer<Deno.NetAddr>;
  try {
    server = Deno.serve({
      hostname,
      port,
      onListen: () => {},
      onError: (e) => {
        log("error", "http handler failed", { error: e });
        return new Response("internal error\n", { status: 500, headers: NO_STORE });
      },
    }, (req) => handle(req, sources));
  } catch (e) {
    throw new HttpBindError(
      `cannot listen on ${hostname}:${port} (HTTP_HOST, HTTP_PORT; 0 turns it off): ` +
        (e as Error).message,
    );
  }
  const bound = server.addr.port;
  log("info", "http listening", { address: `http://${hostname}:${bound}`, paths: PATHS });
  let closing: Promise<void> | null = null;
  return {
    port: bound,
    close: () => closing ??= server.shutdown(),
  };
}

const PATHS = ["/healthz", "/readyz", "/metrics"];

async function handle(req: Request, sources: HttpSources): Promise<Response> {
  const path = new URL(req.url).pathname;
  if (!PATHS.includes(path)) return text(404, "not found\n");
  if (req.method !== "GET" && req.method !== "HEAD") {
    return new Response("method not allowed\n", {
      status: 405,
      headers: { ...NO_STORE, allow: "GET, HEAD" },
    });
  }
  switch (path) {
    case "/healthz":
      return json(200, { status: "ok" });
    case "/readyz": {
      const { ready, checks } = sources.ready();
      return json(ready ? 200 : 503, { ready, ...checks });
    }
    default: {
      const { contentType, body } = await sources.metrics();
      return new Response(body, { headers: { ...NO_STORE, "content-type": contentType } });
    }
  }
}

function text(status: number, body: string): Response {
  return new Response(body, {
    status,
    headers: { ...NO_STORE, "content-type": "text/plain; charset=utf-8" },
  });
}

function json(status: number, body: unknown): Response {
  return new Response(JSON.stringify(body) + "\n", {
    status,
    headers: { ...NO_STORE, "content-type": "application/json" },
  });
}

/**
 * Process helpers for the benchmark: child processes whose stdout is read as
 * lines, and what /proc says about memory and CPU time of a process.
 */

import { TextLineStream } from "./lines.ts";

/** Clock ticks per second of /proc/<pid>/stat times (USER_HZ, 100 on Linux). */
const TICKS_PER_SECOND = 100;

/** Memory of a process from /proc/<pid>/status, in MiB; null when it is gone. */
export function memory(pid: number): { rss: number; peak: number } | null {
  let text: string;
  try {
    text = Deno.readTextFileSync(`/proc/${pid}/status`);
  } catch {
    return null;
  }
  const kb = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, "m").exec(text)?.[1]);
  return { rss: kb("VmRSS") / 1024, peak: kb("VmHWM") / 1024 };
}

/**
 * CPU seconds (user + system) used so far by a process (all threads), or by
 * one thread when `tid` is given; null when it is gone.
 */
export function cpuSeconds(pid: number, tid?: number): number | null {
  try {
    const path = tid === undefined ? `/proc/${pid}/stat` : `/proc/${pid}/task/${tid}/stat`;
    const stat = Deno.readTextFileSync(path);
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // Fields 14 and 15 (utime, stime); the slice starts at field 3.
    return (Number(fields[11]) + Number(fields[12])) / TICKS_PER_SECOND;
  } catch {
    return null;
  }
}

/** Pids of processes whose command line contains `needle`. */
export function pidsWithCommandLine(needle: string): number[] {
  const pids: number[] = [];
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const cmd = Deno.readTextFileSync(`/proc/${e.name}/cmdline`).replaceAll("\0", " ");
      if (cmd.includes(needle)) pids.push(Number(e.name));
    } catch {
      // gone meanwhile
    }
  }
  return pids;
}

export interface ChildOptions {
  readonly args: string[];
  readonly env: Record<string, string>;
  readonly cwd?: string;
  /** Every stdout and stderr line is appended here. */
  readonly logFile: string;
  /** Called with each stdout line. */
  readonly onLine?: (line: string) => void;
}

/**
 * A child process started through `setpriv --pdeathsig TERM`, so that it
 * cannot outlive the benchmark; setpriv execs, so `pid` is the program's.
 */
export class Child {
  readonly pid: number;
  readonly status: Promise<Deno.CommandStatus>;
  readonly #proc: Deno.ChildProcess;
  readonly #waiters = new Set<{ test: (line: string) => boolean; resolve: (l: string) => void }>();
  readonly #done: Promise<void>;
  #exited = false;

  constructor(readonly name: string, cmd: string, o: ChildOptions) {
    this.#proc = new Deno.Command("/usr/bin/setpriv", {
      args: ["--pdeathsig", "TERM", "--", cmd, ...o.args],
      env: o.env,
      clearEnv: true,
      cwd: o.cwd,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.pid = this.#proc.pid;
    const file = Deno.openSync(o.logFile, { create: true, append: true });
    const encoder = new TextEncoder();
    const pipe = async (stream: ReadableStream<Uint8Array>, isStdout: boolean) => {
      const lines = stream.pipeThrough(new TextDecoderStream()).pipeThrough(new TextLineStream());
      for await (const line of lines) {
        file.writeSync(encoder.encode(line + "\n"));
        if (!isStdout) continue;
        o.onLine?.(line);
        for (const w of this.#waiters) {
          if (w.test(line)) {
            this.#waiters.delete(w);
            w.resolve(line);
          }
        }
      }
    };
    this.#done = Promise.all([pipe(this.#proc.stdout, true), pipe(this.#proc.stderr, false)])
      .then(() => file.close(), () => file.close());
    this.status = this.#proc.status.then(async (s) => {
      this.#exited = true;
      await this.#done;
      return s;
    });
  }

  get running(): boolean {
    return !this.#exited;
  }

  /** Resolves with the first stdout line from now on that passes `test`; rejects on timeout or exit. */
  waitForLine(test: (line: string) => boolean, timeoutMs: number): Promise<string> {
    return new Promise((resolve, reject) => {
      const w = { test, resolve: (l: string) => (clearTimeout(timer), resolve(l)) };
      const timer = setTimeout(() => {
        this.#waiters.delete(w);
        reject(new Error(`${this.name}: no expected output within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#waiters.add(w);
      this.status.then((s) => {
        if (!this.#waiters.delete(w)) return;
        clearTimeout(timer);
        reject(new Error(`${this.name} exited (code ${s.code}) before the expected output`));
      });
    });
  }

  kill(signal: Deno.Signal = "SIGTERM"): void {
    if (this.#exited) return;
    try {
      this.#proc.kill(signal);
    } catch {
      // already gone
    }
  }

  /** SIGTERM, then SIGKILL after `graceMs`; resolves with the exit status. */
  async stop(graceMs = 30_000): Promise<Deno.CommandStatus> {
    this.kill("SIGTERM");
    const timer = setTimeout(() => this.kill("SIGKILL"), graceMs);
    try {
      return await this.status;
    } finally {
      clearTimeout(timer);
    }
  }
}

/**
 * Resident memory of a process by mapping (MiB, largest first): `[heap]` is
 * malloc's main arena, `[anon]` anonymous mappings (the V8 heap, other malloc
 * arenas, thread stacks), the rest are files. For finding what grows.
 */
export function residentByMapping(pid: number): Array<[string, number]> {
  let text: string;
  try {
    text = Deno.readTextFileSync(`/proc/${pid}/smaps`);
  } catch {
    return [];
  }
  const sizes = new Map<string, number>();
  let name = "";
  for (const line of text.split("\n")) {
    const head = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (head) name = head[1] || "[anon]";
    else if (line.startsWith("Rss:")) {
      const kb = Number(/(\d+)/.exec(line)?.[1] ?? 0);
      sizes.set(name, (sizes.get(name) ?? 0) + kb / 1024);
    }
  }
  return [...sizes].sort((a, b) => b[1] - a[1]);
}

/** Local ports of the TCP connections process `pid` holds (from /proc/net/tcp and its fds). */
export function localTcpPorts(pid: number): number[] {
  const inodes = new Set<string>();
  try {
    for (const e of Deno.readDirSync(`/proc/${pid}/fd`)) {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(Deno.readLinkSync(`/proc/${pid}/fd/${e.name}`));
        if (m) inodes.add(m[1]!);
      } catch {
        // closed meanwhile
      }
    }
  } catch {
    return [];
  }
  const ports: number[] = [];
  for (const file of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    let text = "";
    try {
      text = Deno.readTextFileSync(file);
    } catch {
      continue;
    }
    for (const line of text.split("\n").slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length > 9 && inodes.has(f[9]!)) ports.push(parseInt(f[1]!.split(":")[1]!, 16));
    }
  }
  return ports;
}

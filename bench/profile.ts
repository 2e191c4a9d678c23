/** Reading V8 `.cpuprofile` files (written by `deno run --cpu-prof`): where the time went. */

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}

export interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

export interface Share {
  name: string;
  percent: number;
}

/** Self time per function, and per source file, as a share of all samples, largest first. */
export function topFunctions(p: CpuProfile, limit: number): Share[] {
  const self = new Map<number, number>();
  let total = 0;
  for (let i = 0; i < p.samples.length; i++) {
    const dt = p.timeDeltas[i] ?? 0;
    self.set(p.samples[i]!, (self.get(p.samples[i]!) ?? 0) + dt);
    total += dt;
  }
  const byFunction = new Map<string, number>();
  const byFile = new Map<string, number>();
  for (const n of p.nodes) {
    const t = self.get(n.id) ?? 0;
    if (t === 0) continue;
    const f = n.callFrame;
    const file = shortUrl(f.url);
    const key = `${f.functionName || "(anonymous)"} ${file}${f.url ? `:${f.lineNumber + 1}` : ""}`;
    byFunction.set(key, (byFunction.get(key) ?? 0) + t);
    const fileKey = `[file] ${file || f.functionName}`;
    byFile.set(fileKey, (byFile.get(fileKey) ?? 0) + t);
  }
  const sorted = (m: Map<string, number>, n: number) =>
    [...m].sort((a, b) => b[1] - a[1]).slice(0, n)
      .map(([name, t]) => ({ name, percent: (100 * t) / total }));
  return [...sorted(byFunction, limit), ...sorted(byFile, 12)];
}

function shortUrl(url: string): string {
  const npm = /registry\.npmjs\.org\/([^/]+)\/[^/]+\/(.*)$/.exec(url);
  if (npm) return `${npm[1]}/${npm[2]}`;
  const local = /\/work\/main\/(.*)$/.exec(url);
  if (local) return local[1]!;
  return url.replace(/^ext:/, "");
}

// Sandbox probe guest (TypeScript): every operation tries to reach something outside
// the sandbox and reports what happened as JSON instead of throwing, so a host test
// can assert that nothing got out. Built twice by conflux-build:
//   escape-ts.wasm — the normal build (no wasi:http import): the host accepts it;
//   http-ts.wasm   — built with --allow-http (imports wasi:http): the host must refuse
//                    it at upload.
// `boom`/`throw_value` check that an unexpected exception traps the component.

type Outcome = { ok: true; [k: string]: unknown } | { ok: false; error: string };

const g = globalThis as Record<string, any>;

function message(e: unknown): string {
  return e instanceof Error ? `${e.name}: ${e.message}` : String(e);
}

function attempt(body: () => Record<string, unknown>): Outcome {
  try {
    return { ok: true, ...body() };
  } catch (e) {
    return { ok: false, error: message(e) };
  }
}

function isThenable(v: unknown): v is PromiseLike<unknown> {
  return typeof v === "object" && v !== null && typeof (v as { then?: unknown }).then === "function";
}

export default class Escape {
  static args = { read_file: "string", connect: "string", fetch: "string", alloc_mb: "integer" } as const;

  /** Tries to read a file by every file API the JS runtime might offer. */
  read_file(path: string): Outcome {
    return attempt(() => {
      if (typeof g.require === "function") return { content: String(g.require("fs").readFileSync(path, "utf8")), via: "require('fs')" };
      if (g.process?.binding) return { content: String(g.process.binding("fs")), via: "process.binding" };
      if (g.Deno?.readTextFileSync) return { content: g.Deno.readTextFileSync(path), via: "Deno" };
      if (g.std?.loadFile) return { content: g.std.loadFile(path), via: "std.loadFile" };
      throw new Error("no filesystem API in this JS runtime (no require, process, Deno, std)");
    });
  }

  /** The environment variables the guest sees (expected: none). */
  env(): Record<string, string> {
    const env = g.process?.env;
    return env && typeof env === "object" ? { ...env } : {};
  }

  /**
   * Tries to reach `addr` (host:port) over the network. The JS runtime's only network
   * API is `fetch`; in a build without the http feature it is a stub that TRAPS when
   * called, so this reports without calling it (see `fetch` for the call itself).
   */
  connect(addr: string): Outcome {
    const apis = ["fetch", "WebSocket", "XMLHttpRequest", "Deno", "process"].filter((n) => typeof g[n] !== "undefined");
    return {
      ok: false,
      error: `no socket API in this JS runtime (present: ${apis.join(", ") || "none"}); not connecting to ${addr}; ` +
        "fetch has no wasi:http behind it in this build (calling it traps: see the `fetch` operation)",
    };
  }

  /** Calls fetch("http://addr/") for real. In escape-ts.wasm (no wasi:http) this traps. */
  fetch(addr: string): Outcome {
    return attempt(() => {
      if (typeof g.fetch !== "function") throw new Error("fetch is not defined");
      const r: unknown = g.fetch(`http://${addr}/`);
      if (isThenable(r)) {
        // Operations are synchronous, so the request can never complete within the turn.
        (r as Promise<unknown>).then(undefined, () => undefined);
        throw new Error("fetch returned a pending Promise; no response within the turn");
      }
      return { response: String(r) };
    });
  }

  /** Lists the root directory / preopened directories (expected: error or []). */
  preopens(): Outcome {
    return attempt(() => {
      if (typeof g.require === "function") return { entries: g.require("fs").readdirSync("/") };
      if (g.Deno?.readDirSync) return { entries: [...g.Deno.readDirSync("/")].map((e: { name: string }) => e.name) };
      throw new Error("no directory API in this JS runtime");
    });
  }

  /** The global names the JS runtime exposes (to review the API surface). */
  globals(): string[] {
    return Object.getOwnPropertyNames(globalThis).sort();
  }

  /** Clock and randomness as the guest sees them (host-provided WASI). */
  clock(): { dateNow: number; random: number } {
    return { dateNow: Date.now(), random: Math.random() };
  }

  /** Allocates `n` MiB and touches it (to probe the host's memory limit). Returns n. */
  alloc_mb(n: number): number {
    const chunks: Uint8Array[] = [];
    for (let i = 0; i < n; i++) {
      const c = new Uint8Array(1 << 20);
      c.fill(i & 0xff);
      chunks.push(c);
    }
    return chunks.length;
  }

  /** Never returns (to probe the host's fuel/epoch deadline). */
  spin(): never {
    for (;;) {
      /* burn */
    }
  }

  /** An unexpected exception: the component must print it and trap. */
  boom(): never {
    throw new TypeError("boom: an unexpected exception");
  }

  /** An unexpected non-Error throw: also a trap. */
  throw_value(): never {
    throw "a thrown string";
  }
}

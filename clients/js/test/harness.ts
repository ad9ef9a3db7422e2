// Real servers for the client's tests: `pushcluster standalone`, or a fleet
// of a real nats-server with logic, comets and a job, all on 127.0.0.1
// with ephemeral ports and temporary directories.

import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, connect as tcpConnect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
// dist/test -> the repository root.
export const repo = resolve(here, "../../../..");

export function pushclusterBinary(): string {
  return process.env.PUSHCLUSTER_BIN ?? join(repo, "target/debug/pushcluster");
}

export function natsServerBinary(): string {
  return process.env.NATS_SERVER_BIN ?? "nats-server";
}

/** A free loopback port, for a server that must come back on the same one. */
export async function reservePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address ? address.port : 0;
      server.close(() => resolvePort(port));
    });
  });
}

type Config = Record<string, unknown>;

function merge(base: Config, extra: Config): Config {
  const out: Config = { ...base };
  for (const [key, value] of Object.entries(extra)) {
    const current = out[key];
    out[key] =
      value && typeof value === "object" && !Array.isArray(value) && current && typeof current === "object"
        ? merge(current as Config, value as Config)
        : value;
  }
  return out;
}

/** One pushcluster process; its listening addresses come from its JSON log. */
export class Process {
  readonly addrs = new Map<string, string>();
  private exited: Promise<number | null>;

  private constructor(
    private readonly child: ChildProcess,
    private readonly dir: string,
  ) {
    this.exited = new Promise((resolveExit) => child.on("exit", (code) => resolveExit(code)));
  }

  static async start(command: string, config: Config, ready: string): Promise<Process> {
    const dir = mkdtempSync(join(tmpdir(), "pushcluster-js-"));
    const path = join(dir, "pushcluster.yaml");
    // JSON is YAML.
    writeFileSync(path, JSON.stringify(config));
    const child = spawn(pushclusterBinary(), ["--log-format", "json", command, "--config", path], {
      stdio: ["ignore", "pipe", "inherit"],
    });
    const process_ = new Process(child, dir);
    await new Promise<void>((resolveReady, reject) => {
      const timer = setTimeout(() => reject(new Error(`pushcluster ${command} not ready in 30 s`)), 30_000);
      child.on("exit", (code) => reject(new Error(`pushcluster ${command} exited with ${code}`)));
      const lines = createInterface({ input: child.stdout! });
      lines.on("line", (line) => {
        let event: { fields?: { message?: string; name?: string; addr?: string } };
        try {
          event = JSON.parse(line);
        } catch {
          return;
        }
        const fields = event.fields ?? {};
        if (fields.message === "listening" && fields.name && fields.addr) {
          process_.addrs.set(fields.name, fields.addr);
        } else if (fields.message === ready) {
          clearTimeout(timer);
          resolveReady();
        }
      });
    });
    return process_;
  }

  addr(name: string): string {
    const addr = this.addrs.get(name);
    if (!addr) {
      throw new Error(`no ${name} address`);
    }
    return addr;
  }

  /** Sends a signal and waits for the exit. */
  async stop(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill(signal);
      await this.exited;
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

const LOOPBACK = "127.0.0.1:0";

/** `pushcluster standalone` with `extra` merged over a loopback config. */
export async function startStandalone(extra: Config = {}): Promise<Process> {
  const base: Config = {
    admin: { bind: LOOPBACK },
    comet: {
      id: "comet-js",
      tcp: { bind: [LOOPBACK] },
      websocket: { bind: [LOOPBACK] },
      grpc: { bind: LOOPBACK },
      online_report_interval: "100ms",
      drain: "500ms",
    },
    logic: { http: { bind: LOOPBACK }, grpc: { bind: LOOPBACK } },
  };
  return Process.start("standalone", merge(base, extra), "pushcluster standalone ready");
}

/** A real nats-server with JetStream. */
export class Nats {
  private constructor(
    private readonly child: ChildProcess,
    private readonly dir: string,
    readonly url: string,
  ) {}

  static async start(): Promise<Nats> {
    const port = await reservePort();
    const dir = mkdtempSync(join(tmpdir(), "pushcluster-js-nats-"));
    const child = spawn(natsServerBinary(), ["-js", "-a", "127.0.0.1", "-p", String(port), "-sd", dir], {
      stdio: "ignore",
    });
    const deadline = Date.now() + 20_000;
    for (;;) {
      const up = await new Promise<boolean>((resolveUp) => {
        const socket = tcpConnect(port, "127.0.0.1", () => {
          socket.destroy();
          resolveUp(true);
        });
        socket.on("error", () => resolveUp(false));
      });
      if (up) {
        break;
      }
      if (Date.now() > deadline) {
        child.kill("SIGKILL");
        throw new Error("nats-server did not start");
      }
      await sleep(50);
    }
    return new Nats(child, dir, `nats://127.0.0.1:${port}`);
  }

  async stop(): Promise<void> {
    this.child.kill("SIGTERM");
    await new Promise((resolveExit) => this.child.on("exit", resolveExit));
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** NATS, one logic, two comets and one job. */
export class Fleet {
  private constructor(
    readonly nats: Nats,
    readonly logic: Process,
    readonly comets: Process[],
    readonly job: Process,
    private readonly cometConfigs: Config[],
  ) {}

  static async start(): Promise<Fleet> {
    const nats = await Nats.start();
    const base: Config = {
      admin: { bind: LOOPBACK },
      nats: { url: nats.url, partitions: 4, lease_ttl: "2s", request_timeout: "2s" },
      logic: {
        http: { bind: LOOPBACK },
        grpc: { bind: LOOPBACK },
        auth: { mode: "none" },
        api: { allow_unauthenticated: true },
      },
      comet: {
        tcp: { bind: [LOOPBACK] },
        websocket: { bind: [LOOPBACK] },
        online_report_interval: "500ms",
        drain: "500ms",
      },
      job: { delivery: { timeout: "2s", retry_for: "10s", backoff_base: "50ms", backoff_max: "500ms" } },
      discovery: { kind: "static" },
    };
    const logic = await Process.start("logic", base, "logic ready");
    const ids = ["comet-a", "comet-b"];
    const cometConfigs: Config[] = [];
    for (const id of ids) {
      cometConfigs.push(
        merge(base, {
          comet: { id, grpc: { bind: `127.0.0.1:${await reservePort()}` } },
          discovery: { logics: [logic.addr("logic.grpc")] },
        }),
      );
    }
    const comets = await Promise.all(cometConfigs.map((c) => Process.start("comet", c, "accepting clients")));
    const job = await Process.start(
      "job",
      merge(base, {
        discovery: {
          comets: ids.map((id, i) => ({ id, addr: (cometConfigs[i] as { comet: { grpc: { bind: string } } }).comet.grpc.bind })),
        },
      }),
      "job ready",
    );
    return new Fleet(nats, logic, comets, job, cometConfigs);
  }

  async restartComet(i: number): Promise<void> {
    await this.comets[i]?.stop();
    this.comets[i] = await Process.start("comet", this.cometConfigs[i] as Config, "accepting clients");
  }

  async stop(): Promise<void> {
    for (const process_ of [...this.comets, this.job, this.logic]) {
      await process_.stop();
    }
    await this.nats.stop();
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolveSleep) => setTimeout(resolveSleep, ms));
}

/** A room push through logic's HTTP API (`room` is `type://id`). */
export async function pushRoom(logicHttp: string, room: string, body: string): Promise<void> {
  const [type, id] = room.split("://");
  await push(logicHttp, `room?operation=1000&type=${type}&room=${encodeURIComponent(id ?? "")}`, room, body);
}

/** A push to a user (goim's `/goim/push/mids`), op 1000. */
export async function pushMid(logicHttp: string, mid: number, body: string): Promise<void> {
  await push(logicHttp, `mids?operation=1000&mids=${mid}`, `mid ${mid}`, body);
}

async function push(logicHttp: string, route: string, room: string, body: string): Promise<void> {
  for (;;) {
    const response = await fetch(`http://${logicHttp}/goim/push/${route}`, { method: "POST", body });
    if (response.status === 429) {
      await sleep(200);
      continue;
    }
    const answer = (await response.json()) as { code: number };
    if (response.status !== 200 || answer.code !== 0) {
      throw new Error(`push ${room}: ${response.status} ${JSON.stringify(answer)}`);
    }
    return;
  }
}

/** Resolves when `check` holds, polling; rejects after `ms`. */
export async function until(what: string, check: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}`);
    }
    await sleep(10);
  }
}

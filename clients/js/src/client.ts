// A goim v2 WebSocket client for pushcluster: auth, heartbeats, reconnect
// with jittered backoff across the nodes logic hands out, and resume with
// positions so a reconnect loses nothing (docs/recovery.md).

import { Op, type Frame, type Position, bodyText, decodeMessage, encodeFrame } from "./protocol.js";

/** The WebSocket constructor to use (the global one by default; `ws` works). */
export type WebSocketConstructor = new (url: string) => WebSocketLike;

/** The part of the WebSocket API the client needs. */
export interface WebSocketLike {
  binaryType: string;
  readyState: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code?: number; reason?: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
}

export interface ReconnectOptions {
  /** First delay (default 500 ms). */
  baseMs?: number;
  /** Largest delay (default 30 s). */
  maxMs?: number;
  /** Growth per failed attempt (default 2). */
  factor?: number;
  /** ± this fraction of random spread, so clients do not come back in step (default 0.5). */
  jitter?: number;
}

export interface PushClientOptions {
  /** WebSocket endpoints (`ws://host:3102/sub`), tried in turn. */
  urls?: string[];
  /**
   * Logic's HTTP base (`http://host:3111`): before each connection the
   * endpoints are read from `/goim/nodes/weighted` (falling back to `urls`).
   * goim answers `platform: "web"` (the default) with host names
   * (`comet id` + `logic.node.host_domain`), other platforms with addresses.
   */
  nodesUrl?: string;
  /** With `nodesUrl`: connect with `wss://` to the nodes' WSS port. */
  secure?: boolean;
  /** The room to join (`live://1000`); empty: none. goim's one room, moved by `changeRoom`. */
  room?: string;
  /** Rooms to be in besides `room` (pushcluster; `join` adds more). */
  rooms?: string[];
  mid?: number;
  /** Connection key; empty: the server makes one. */
  key?: string;
  /** JWT for `logic.auth.mode: jwt`; a function is asked on every connection. */
  token?: string | (() => string | Promise<string>);
  platform?: string;
  /** Ops of key/mid pushes and broadcasts to receive. */
  accepts?: number[];
  /** Receive positions and resume after reconnects (default true). */
  resume?: boolean;
  /** Heartbeat interval (default 30 s); a heartbeat unanswered by the next one closes the connection. */
  heartbeatMs?: number;
  reconnect?: ReconnectOptions;
  /** The WebSocket implementation (default: the global `WebSocket`). */
  WebSocket?: WebSocketConstructor;
}

/** A pushed message. */
export interface PushMessage {
  op: number;
  body: Uint8Array;
  /**
   * Where it sits, for a client with positions: the room it was pushed to,
   * or the direct stream of a push to the user (`@mid:<mid>`) or to the
   * connection's key (`@key:<key>`).
   */
  room?: string;
  position?: Position;
  /** Written from history after a (re)join, before the resume event. */
  replayed: boolean;
  text(): string;
  json<T = unknown>(): T;
}

/** The server's answer to `send`. */
export interface SendAnswer {
  /** The message's id in the upstream stream, once stored. */
  id?: string;
  /** Why not: too_large, rate_limited, unavailable (send again later), disconnected. */
  error?: string;
}

/** The server's answer to `join` or `leave`. */
export interface RoomAnswer {
  room: string;
  ok: boolean;
  /**
   * When not ok: limit, forbidden, invalid (join); not_member (leave);
   * disconnected (the connection ended before the answer).
   */
  reason?: string;
}

/** What the server said after the client joined a room or resumed a direct stream. */
export interface ResumeInfo {
  /** The room, or the direct stream (`@mid:<mid>`, `@key:<key>`). */
  room: string;
  /** Everything missed since the position sent was replayed. */
  recovered: boolean;
  /** Why not, when not: fresh, epoch_changed, expired, too_many, too_large, disabled, unavailable. */
  reason: string;
  epoch: string;
  offset: number;
  replayed: number;
}

export interface PushClientEvents {
  /** Connected and authenticated. */
  open: { url: string };
  message: PushMessage;
  /**
   * After each join of a room (connect or changeRoom), and for the user's
   * direct stream at each connect: before that room's or stream's live
   * messages.
   */
  resume: ResumeInfo;
  heartbeat: { online: number };
  roomChanged: { room: string };
  /** The connection ended; `reconnectInMs` unless closed by `close()`. */
  close: { code?: number; reason?: string; reconnectInMs?: number };
  error: Error;
}

type Listener<T> = (event: T) => void;

/** A goim client that keeps one connection up until `close()`. */
export class PushClient {
  private readonly options: PushClientOptions;
  private readonly listeners = new Map<keyof PushClientEvents, Set<Listener<never>>>();
  private readonly positions = new Map<string, Position>();
  /** Rooms besides `room`, joined again after each reconnect. */
  private readonly extraRooms = new Set<string>();
  /** `send` calls waiting for their op-5 answer, by seq. */
  private readonly sending = new Map<number, (answer: SendAnswer) => void>();
  /** `join`/`leave` calls waiting for their reply, by room. */
  private readonly pending = new Map<string, { op: number; resolve: (answer: RoomAnswer) => void }[]>();
  private socket: WebSocketLike | null = null;
  private room: string;
  private stopped = true;
  private attempts = 0;
  private urlIndex = 0;
  private seq = 1;
  /** Rooms and direct streams whose resume reply has not come yet. */
  private readonly joining = new Set<string>();
  private heartbeatTimer: ReturnType<typeof setInterval> | null = null;
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private awaitingHeartbeat = false;
  private authenticated = false;

  constructor(options: PushClientOptions) {
    if (!options.urls?.length && !options.nodesUrl) {
      throw new Error("PushClient needs urls or nodesUrl");
    }
    this.options = options;
    this.room = options.room ?? "";
    for (const room of options.rooms ?? []) {
      this.extraRooms.add(room);
    }
  }

  on<E extends keyof PushClientEvents>(event: E, listener: Listener<PushClientEvents[E]>): () => void {
    let set = this.listeners.get(event);
    if (!set) {
      set = new Set();
      this.listeners.set(event, set);
    }
    set.add(listener as Listener<never>);
    return () => set.delete(listener as Listener<never>);
  }

  private emit<E extends keyof PushClientEvents>(event: E, value: PushClientEvents[E]): void {
    for (const listener of this.listeners.get(event) ?? []) {
      try {
        (listener as Listener<PushClientEvents[E]>)(value);
      } catch (error) {
        if (event !== "error") {
          this.emit("error", error instanceof Error ? error : new Error(String(error)));
        }
      }
    }
  }

  /** The last position seen in `room` (what a reconnect resumes from). */
  position(room: string = this.room): Position | undefined {
    return this.positions.get(room);
  }

  /** The room the client is in (or joining). */
  get currentRoom(): string {
    return this.room;
  }

  /** Whether the connection is up and authenticated. */
  get connected(): boolean {
    return this.socket !== null && this.authenticated;
  }

  /** Starts connecting; the client reconnects by itself until `close()`. */
  connect(): void {
    if (!this.stopped) {
      return;
    }
    this.stopped = false;
    void this.open();
  }

  /** Closes the connection for good. */
  close(): void {
    this.stopped = true;
    if (this.reconnectTimer) {
      clearTimeout(this.reconnectTimer);
      this.reconnectTimer = null;
    }
    this.teardown();
  }

  /** Drops the connection and reconnects (resuming), e.g. after a network change. */
  reconnect(): void {
    this.socket?.close();
  }

  /** Leaves the current room for `room` (empty: none), resuming it if a position is known. */
  changeRoom(room: string): void {
    this.room = room;
    if (!this.socket || !this.authenticated) {
      return;
    }
    if (this.resumeEnabled && room) {
      const since = this.positions.get(room);
      this.joining.add(room);
      this.write(Op.ChangeRoom, JSON.stringify(since ? { room, since } : { room }));
    } else {
      this.write(Op.ChangeRoom, room);
    }
  }

  /** The rooms besides `currentRoom` the client is in (or will join on connecting). */
  get rooms(): string[] {
    return [...this.extraRooms];
  }

  /**
   * Joins one more room (pushcluster's op 22), resuming it if a position is
   * known; resolves with the server's answer. Needs a connection: rejects
   * when there is none. Joined rooms are joined again after reconnects.
   */
  join(room: string): Promise<RoomAnswer> {
    const since = this.resumeEnabled ? this.positions.get(room) : undefined;
    const body = since ? JSON.stringify({ room, since }) : room;
    if (this.resumeEnabled && !this.extraRooms.has(room) && room !== this.room) {
      this.joining.add(room);
    }
    return this.ask(Op.Join, Op.JoinReply, room, body);
  }

  /**
   * Sends a message to the business backend (op 4, with `upstream` on):
   * resolves with `{id}` once the server stored it, or `{error}` —
   * `unavailable` and `disconnected` may be sent again (the backend then
   * sees it at least once). Needs a connection: rejects when there is none.
   */
  send(message: string): Promise<SendAnswer> {
    if (!this.connected) {
      return Promise.reject(new Error("not connected: cannot send"));
    }
    return new Promise((resolve) => {
      const seq = this.write(Op.SendMsg, message);
      this.sending.set(seq, resolve);
    });
  }

  /** Leaves a room (pushcluster's op 24); resolves with the server's answer. */
  leave(room: string): Promise<RoomAnswer> {
    return this.ask(Op.Leave, Op.LeaveReply, room, room);
  }

  private ask(op: number, replyOp: number, room: string, body: string): Promise<RoomAnswer> {
    if (!this.connected) {
      return Promise.reject(new Error(`not connected: cannot ${op === Op.Join ? "join" : "leave"} ${room}`));
    }
    return new Promise((resolve) => {
      const waiting = this.pending.get(room) ?? [];
      waiting.push({ op: replyOp, resolve });
      this.pending.set(room, waiting);
      this.write(op, body);
    });
  }

  private answered(op: number, answer: RoomAnswer): void {
    if (op === Op.JoinReply && answer.ok && answer.room !== this.room) {
      this.extraRooms.add(answer.room);
    }
    if (op === Op.LeaveReply) {
      this.extraRooms.delete(answer.room);
      if (answer.room === this.room) {
        this.room = "";
      }
    }
    if (!answer.ok) {
      this.joining.delete(answer.room);
    }
    const waiting = this.pending.get(answer.room) ?? [];
    const at = waiting.findIndex((entry) => entry.op === op);
    if (at >= 0) {
      const [entry] = waiting.splice(at, 1);
      entry?.resolve(answer);
    }
    if (waiting.length === 0) {
      this.pending.delete(answer.room);
    }
  }

  /** Adds ops to the ones key/mid pushes and broadcasts are received for. */
  subscribe(ops: number[]): void {
    this.write(Op.Sub, ops.join(","));
  }

  unsubscribe(ops: number[]): void {
    this.write(Op.Unsub, ops.join(","));
  }

  private get resumeEnabled(): boolean {
    return this.options.resume ?? true;
  }

  /** Writes a frame; its seq. */
  private write(op: number, body: string): number {
    const seq = this.seq++;
    if (this.socket && this.socket.readyState === 1) {
      this.socket.send(encodeFrame(op, seq, body));
    }
    return seq;
  }

  private async endpoints(): Promise<string[]> {
    const fallback = this.options.urls ?? [];
    if (!this.options.nodesUrl) {
      return fallback;
    }
    try {
      const platform = encodeURIComponent(this.options.platform ?? "web");
      const response = await fetch(`${this.options.nodesUrl}/goim/nodes/weighted?platform=${platform}`);
      const answer = (await response.json()) as {
        data?: { nodes?: string[]; domain?: string; ws_port?: number; wss_port?: number };
      };
      const data = answer.data ?? {};
      const hosts = data.nodes?.length ? data.nodes : data.domain ? [data.domain] : [];
      const port = this.options.secure ? data.wss_port : data.ws_port;
      const scheme = this.options.secure ? "wss" : "ws";
      const urls = hosts.map((host) => `${scheme}://${host}:${port}/sub`);
      return urls.length ? urls : fallback;
    } catch (error) {
      this.emit("error", new Error(`nodes from ${this.options.nodesUrl}: ${String(error)}`));
      return fallback;
    }
  }

  private async open(): Promise<void> {
    const urls = await this.endpoints();
    if (this.stopped) {
      return;
    }
    if (!urls.length) {
      this.scheduleReconnect({ reason: "no endpoints" });
      return;
    }
    const url = urls[this.urlIndex++ % urls.length] as string;
    let token: string | undefined;
    try {
      token = typeof this.options.token === "function" ? await this.options.token() : this.options.token;
    } catch (error) {
      this.emit("error", new Error(`token: ${String(error)}`));
      this.scheduleReconnect({ reason: "no token" });
      return;
    }
    const Socket = this.options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!Socket) {
      throw new Error("no WebSocket implementation: pass options.WebSocket (e.g. from the ws package)");
    }
    let socket: WebSocketLike;
    try {
      socket = new Socket(url);
    } catch (error) {
      this.emit("error", new Error(`connect ${url}: ${String(error)}`));
      this.scheduleReconnect({ reason: "connect failed" });
      return;
    }
    this.socket = socket;
    this.authenticated = false;
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      const auth: Record<string, unknown> = {
        mid: this.options.mid ?? 0,
        key: this.options.key ?? "",
        room_id: this.room,
        platform: this.options.platform ?? "web",
        accepts: this.options.accepts ?? [],
      };
      if (this.extraRooms.size > 0) {
        auth.rooms = [...this.extraRooms];
      }
      if (token) {
        auth.token = token;
      }
      if (this.resumeEnabled) {
        auth.positions = true;
        // The room's position, and the user's and key's direct streams
        // (`@mid:<mid>`, `@key:<key>`): the server resumes the ones that
        // are this connection's own and ignores the rest.
        const since: Record<string, Position> = {};
        for (const [name, position] of this.positions) {
          if (name === this.room || this.extraRooms.has(name) || name.startsWith("@")) {
            since[name] = position;
          }
        }
        if (Object.keys(since).length > 0) {
          auth.since = since;
        }
        this.joining.clear();
        for (const room of [this.room, ...this.extraRooms]) {
          if (room) {
            this.joining.add(room);
          }
        }
        const mid = this.options.mid ?? 0;
        if (mid !== 0) {
          this.joining.add(`@mid:${mid}`);
        }
        // A key's stream is resumed only when named in `since`.
        const keyStream = `@key:${this.options.key ?? ""}`;
        if (keyStream in since) {
          this.joining.add(keyStream);
        }
      }
      this.seq = 1;
      this.write(Op.Auth, JSON.stringify(auth));
    };
    socket.onmessage = (event) => this.receive(url, event.data);
    socket.onerror = () => {
      // The close event follows; it reconnects.
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) {
        return;
      }
      this.teardown();
      if (this.stopped) {
        this.emit("close", { code: event.code, reason: event.reason });
      } else {
        this.scheduleReconnect({ code: event.code, reason: event.reason });
      }
    };
  }

  private receive(url: string, data: unknown): void {
    if (!(data instanceof ArrayBuffer)) {
      this.emit("error", new Error("a text WebSocket message: goim frames are binary"));
      return;
    }
    let frames: Frame[];
    try {
      frames = decodeMessage(new Uint8Array(data));
    } catch (error) {
      this.emit("error", error instanceof Error ? error : new Error(String(error)));
      return;
    }
    for (const frame of frames) {
      this.dispatch(url, frame);
    }
  }

  private dispatch(url: string, frame: Frame): void {
    switch (frame.op) {
      case Op.AuthReply:
        this.authenticated = true;
        this.attempts = 0;
        this.startHeartbeat();
        this.emit("open", { url });
        return;
      case Op.HeartbeatReply: {
        this.awaitingHeartbeat = false;
        const online = frame.body.length >= 4 ? new DataView(frame.body.buffer, frame.body.byteOffset).getInt32(0) : 0;
        this.emit("heartbeat", { online });
        return;
      }
      case Op.ChangeRoomReply:
        this.emit("roomChanged", { room: bodyText(frame) });
        return;
      case Op.SubReply:
      case Op.UnsubReply:
        return;
      case Op.SendMsgReply: {
        const resolve = this.sending.get(frame.seq);
        this.sending.delete(frame.seq);
        let answer: SendAnswer;
        try {
          answer = JSON.parse(bodyText(frame)) as SendAnswer;
        } catch {
          answer = { error: "unreadable answer" };
        }
        resolve?.(answer);
        return;
      }
      case Op.JoinReply:
      case Op.LeaveReply: {
        try {
          this.answered(frame.op, JSON.parse(bodyText(frame)) as RoomAnswer);
        } catch (error) {
          this.emit("error", new Error(`unreadable room answer: ${String(error)}`));
        }
        return;
      }
      case Op.ResumeReply: {
        const info = JSON.parse(bodyText(frame)) as ResumeInfo;
        this.positions.set(info.room, { epoch: info.epoch, offset: info.offset });
        this.joining.delete(info.room);
        this.emit("resume", info);
        return;
      }
      default: {
        if (frame.room && frame.position) {
          this.positions.set(frame.room, frame.position);
        }
        const body = frame.body;
        this.emit("message", {
          op: frame.op,
          body,
          room: frame.room,
          position: frame.position,
          replayed: frame.room !== undefined && frame.position !== undefined && this.joining.has(frame.room),
          text: () => bodyText(frame),
          json: <T>() => JSON.parse(bodyText(frame)) as T,
        });
      }
    }
  }

  private startHeartbeat(): void {
    this.stopHeartbeat();
    this.awaitingHeartbeat = false;
    const beat = () => {
      if (this.awaitingHeartbeat) {
        // No answer for a whole interval: the connection is dead.
        this.socket?.close();
        return;
      }
      this.awaitingHeartbeat = true;
      this.write(Op.Heartbeat, "");
    };
    beat();
    this.heartbeatTimer = setInterval(beat, this.options.heartbeatMs ?? 30_000);
  }

  private stopHeartbeat(): void {
    if (this.heartbeatTimer) {
      clearInterval(this.heartbeatTimer);
      this.heartbeatTimer = null;
    }
  }

  private teardown(): void {
    this.stopHeartbeat();
    const socket = this.socket;
    this.socket = null;
    this.authenticated = false;
    this.joining.clear();
    // Unanswered joins and leaves: the connection is gone.
    for (const [room, waiting] of this.pending) {
      for (const entry of waiting) {
        entry.resolve({ room, ok: false, reason: "disconnected" });
      }
    }
    this.pending.clear();
    for (const resolve of this.sending.values()) {
      resolve({ error: "disconnected" });
    }
    this.sending.clear();
    if (socket) {
      socket.onopen = null;
      socket.onmessage = null;
      socket.onclose = null;
      socket.onerror = null;
      if (socket.readyState === 0 || socket.readyState === 1) {
        socket.close();
      }
    }
  }

  private scheduleReconnect(why: { code?: number; reason?: string }): void {
    const options = this.options.reconnect ?? {};
    const base = options.baseMs ?? 500;
    const max = options.maxMs ?? 30_000;
    const factor = options.factor ?? 2;
    const jitter = options.jitter ?? 0.5;
    const delay = Math.min(max, base * factor ** this.attempts);
    const spread = delay * jitter * (Math.random() * 2 - 1);
    const reconnectInMs = Math.max(0, Math.round(delay + spread));
    this.attempts += 1;
    this.emit("close", { ...why, reconnectInMs });
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      if (!this.stopped) {
        void this.open();
      }
    }, reconnectInMs);
  }
}

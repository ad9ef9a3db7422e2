// goim v2's binary frames as a WebSocket client sends and reads them
// (docs/goim-compatibility.md), with pushcluster's positioned frames.

/** Operation codes the client uses. Application ops are any other int32. */
export const Op = {
  Heartbeat: 2,
  HeartbeatReply: 3,
  SendMsg: 4,
  SendMsgReply: 5,
  Auth: 7,
  AuthReply: 8,
  Raw: 9,
  ChangeRoom: 12,
  ChangeRoomReply: 13,
  Sub: 14,
  SubReply: 15,
  Unsub: 16,
  UnsubReply: 17,
  ResumeReply: 20,
  Join: 22,
  JoinReply: 23,
  Leave: 24,
  LeaveReply: 25,
} as const;

export const HEADER_LEN = 16;

/** Where a room message sits in its room's history. */
export interface Position {
  /** The history it belongs to (a u64, as a decimal string). */
  epoch: string;
  /** Increases with every message of the room. */
  offset: number;
}

/** One decoded frame. */
export interface Frame {
  op: number;
  seq: number;
  body: Uint8Array;
  /** For positioned room messages: the room and the position. */
  room?: string;
  position?: Position;
}

const utf8 = new TextEncoder();

/** Encodes a client frame (ver 1). */
export function encodeFrame(op: number, seq: number, body: Uint8Array | string = ""): Uint8Array {
  const payload = typeof body === "string" ? utf8.encode(body) : body;
  const frame = new Uint8Array(HEADER_LEN + payload.length);
  const view = new DataView(frame.buffer);
  view.setInt32(0, frame.length);
  view.setInt16(4, HEADER_LEN);
  view.setInt16(6, 1);
  view.setInt32(8, op);
  view.setInt32(12, seq);
  frame.set(payload, HEADER_LEN);
  return frame;
}

/** Thrown for bytes that are not a goim frame. */
export class FrameError extends Error {
  override name = "FrameError";
}

const text = new TextDecoder();

/** Decodes the frame at `offset` of `data`; returns it and its length. */
function decodeAt(data: Uint8Array, offset: number): [Frame, number] {
  if (data.length - offset < HEADER_LEN) {
    throw new FrameError(`a frame needs ${HEADER_LEN} bytes, ${data.length - offset} left`);
  }
  const view = new DataView(data.buffer, data.byteOffset + offset, data.length - offset);
  const packLen = view.getInt32(0);
  const headerLen = view.getInt16(4);
  if (headerLen < HEADER_LEN || packLen < headerLen || packLen > data.length - offset) {
    throw new FrameError(`bad frame header: packLen ${packLen}, headerLen ${headerLen}`);
  }
  const frame: Frame = {
    op: view.getInt32(8),
    seq: view.getInt32(12),
    body: data.subarray(offset + headerLen, offset + packLen),
  };
  if (headerLen >= HEADER_LEN + 18) {
    // Positioned: offset u64, epoch u64, room id length u16, room id.
    const nameLen = view.getUint16(32);
    if (HEADER_LEN + 18 + nameLen > headerLen) {
      throw new FrameError("positioned header shorter than its room id");
    }
    frame.position = {
      offset: Number(view.getBigUint64(16)),
      epoch: view.getBigUint64(24).toString(),
    };
    frame.room = text.decode(data.subarray(offset + 34, offset + 34 + nameLen));
  }
  return [frame, packLen];
}

/**
 * Decodes one WebSocket message: a frame, or for op 9 the frames inside
 * it (goim batches pushes that way).
 */
export function decodeMessage(data: Uint8Array): Frame[] {
  const [outer] = decodeAt(data, 0);
  if (outer.op !== Op.Raw) {
    return [outer];
  }
  const frames: Frame[] = [];
  const inner = outer.body;
  let offset = 0;
  while (offset < inner.length) {
    const [frame, length] = decodeAt(inner, offset);
    frames.push(frame);
    offset += length;
  }
  return frames;
}

/** The body as UTF-8 text. */
export function bodyText(frame: Frame): string {
  return text.decode(frame.body);
}

// @pushcluster/client: a goim v2 WebSocket client with zero-loss resume.
export {
  PushClient,
  type PushClientEvents,
  type PushClientOptions,
  type PushMessage,
  type ReconnectOptions,
  type ResumeInfo,
  type RoomAnswer,
  type SendAnswer,
  type WebSocketConstructor,
  type WebSocketLike,
} from "./client.js";
export { bodyText, decodeMessage, encodeFrame, type Frame, FrameError, Op, type Position } from "./protocol.js";

//! Client connections as a goim client (TCP or WebSocket) or a Pusher
//! client (WebSocket) would open them: connect, authenticate or subscribe,
//! then read pushes and keep the connection alive.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use pushcluster_api::protocol::{
    Frame, FramePosition, decode_positioned_stream, decode_server_stream, op,
};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use pushcluster_api::streams::is_direct;

use crate::spec::{ClientSpec, PUSH_OP, PUSHER_EVENT, ServerKind, Transport, mid_of};

/// Connections opened from one loopback source address: one address has
/// about 28,000 ephemeral ports, and closed ones linger in TIME_WAIT.
pub const PER_SOURCE: usize = 5000;
/// goim heartbeats every 30 s by default (the server allows minutes).
const GOIM_HEARTBEAT: Duration = Duration::from_secs(30);
/// Pusher clients ping when idle for the activity timeout (120 s default).
const PUSHER_PING: Duration = Duration::from_secs(60);
/// Longest a connect plus handshake may take.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(30);

/// The loopback source address of connection `index` (None off loopback).
pub fn source_for(target: SocketAddr, index: usize) -> Option<Ipv4Addr> {
    if !target.ip().is_loopback() {
        return None;
    }
    let block = index / PER_SOURCE;
    // 127.0.0.1 .. 127.0.0.254, then 127.0.1.1 ...
    Some(Ipv4Addr::new(
        127,
        0,
        (block / 254) as u8,
        1 + (block % 254) as u8,
    ))
}

/// Who a connection claims to be.
#[derive(Clone, Debug)]
pub struct Identity {
    pub index: usize,
    pub room: usize,
    /// Room type, key and channel prefix (`--namespace`).
    pub namespace: String,
    /// goim only: its own key (PUSH by key) and mid.
    pub key: String,
    pub mid: u64,
}

impl Identity {
    pub fn new(namespace: &str, index: usize, room: usize) -> Identity {
        Identity {
            index,
            room,
            namespace: namespace.to_string(),
            key: format!("{namespace}-{index}"),
            mid: mid_of(index),
        }
    }
}

pub enum Connection {
    GoimTcp { stream: TcpStream, buf: BytesMut },
    GoimWs(Box<WebSocketStream<TcpStream>>),
    Pusher(Box<WebSocketStream<TcpStream>>),
}

async fn tcp(addr: SocketAddr, source: Option<Ipv4Addr>) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(source) = source {
        socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A position a `--resume` client keeps and sends back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Since {
    pub epoch: u64,
    pub offset: u64,
}

/// Where a `--resume` client is in its room and in its user's direct
/// stream (`@mid:<mid>`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Positions {
    pub room: Option<Since>,
    pub user: Option<Since>,
}

impl Positions {
    pub fn set(&mut self, user: bool, since: Since) {
        if user {
            self.user = Some(since);
        } else {
            self.room = Some(since);
        }
    }
}

/// What a connection reads, for its worker.
pub enum Received<'a> {
    /// A pushed body.
    Body(&'a [u8]),
    /// The position of the body just handed over (`--resume`), in the
    /// room or (`user`) in the user's direct stream.
    Position { user: bool, since: Since },
    /// The op-20 reply after a join of the room or of the user's stream:
    /// whether everything missed was replayed.
    Resumed {
        user: bool,
        recovered: bool,
        since: Since,
    },
}

fn auth_frame(spec: &ClientSpec, identity: &Identity, positions: Positions) -> Bytes {
    let resume = spec.resume;
    let room = format!("{}://{}", identity.namespace, identity.room);
    let mut body = format!(
        r#"{{"mid":{},"key":"{}","room_id":"{room}","platform":"bench","accepts":[{PUSH_OP}]"#,
        identity.mid, identity.key
    );
    if spec.rooms_per_client > 1 {
        let more: Vec<String> = (1..spec.rooms_per_client)
            .map(|j| {
                let other = (identity.room + j) % spec.room_count.max(1);
                format!(r#""{}://{other}""#, identity.namespace)
            })
            .collect();
        body.push_str(&format!(r#","rooms":[{}]"#, more.join(",")));
    }
    if resume {
        body.push_str(r#","positions":true"#);
        let user = format!("@mid:{}", identity.mid);
        let since: Vec<String> = [(room, positions.room), (user, positions.user)]
            .into_iter()
            .filter_map(|(name, since)| {
                let since = since?;
                Some(format!(
                    r#""{name}":{{"epoch":"{}","offset":{}}}"#,
                    since.epoch, since.offset
                ))
            })
            .collect();
        if !since.is_empty() {
            body.push_str(&format!(r#","since":{{{}}}"#, since.join(",")));
        }
    }
    body.push('}');
    Frame {
        ver: 1,
        op: op::AUTH,
        seq: 1,
        body: body.into(),
    }
    .encode()
}

fn heartbeat_frame() -> Bytes {
    Frame {
        ver: 1,
        op: op::HEARTBEAT,
        seq: 2,
        body: Bytes::new(),
    }
    .encode()
}

/// A Pusher protocol message (data is a string for events we publish).
#[derive(Deserialize)]
struct PusherMessage {
    event: String,
    #[serde(default)]
    data: Option<serde_json::Value>,
}

/// The pushed bodies inside one goim frame (op 9 batches carry several),
/// with their positions and resume replies for `--resume` clients.
fn goim_bodies(
    (frame, position): (Frame, Option<FramePosition>),
    on_body: &mut impl FnMut(Received<'_>),
) {
    if frame.op == op::RAW {
        let mut inner = BytesMut::from(&frame.body[..]);
        while let Ok(Some(inner)) = decode_positioned_stream(&mut inner) {
            goim_bodies(inner, on_body);
        }
    } else if frame.op == PUSH_OP {
        if let Some(position) = position {
            on_body(Received::Position {
                user: is_direct(&position.stream),
                since: Since {
                    epoch: position.epoch,
                    offset: position.offset,
                },
            });
        }
        on_body(Received::Body(&frame.body));
    } else if frame.op == op::RESUME_REPLY
        && let Ok(reply) = serde_json::from_slice::<serde_json::Value>(&frame.body)
    {
        let number = |key: &str| {
            reply[key]
                .as_u64()
                .or_else(|| reply[key].as_str().and_then(|s| s.parse().ok()))
                .unwrap_or(0)
        };
        on_body(Received::Resumed {
            user: reply["room"].as_str().is_some_and(is_direct),
            recovered: reply["recovered"].as_bool().unwrap_or(false),
            since: Since {
                epoch: number("epoch"),
                offset: number("offset"),
            },
        });
    }
}

/// Decodes one frame a server sent, positioned or not.
fn decode(buf: &mut BytesMut) -> Option<(Frame, Option<FramePosition>)> {
    decode_positioned_stream(buf).ok().flatten()
}

impl Connection {
    /// Connects and authenticates (goim) or subscribes to the room's
    /// channel (Pusher); bounded by a timeout.
    pub async fn open(
        spec: &ClientSpec,
        identity: &Identity,
        source: Option<Ipv4Addr>,
    ) -> anyhow::Result<Connection> {
        let addr = spec.addrs[identity.index % spec.addrs.len()];
        Connection::open_at(spec, addr, identity, source, Positions::default()).await
    }

    /// Opens to `addr`; a `--resume` client sends its positions.
    pub async fn open_at(
        spec: &ClientSpec,
        addr: SocketAddr,
        identity: &Identity,
        source: Option<Ipv4Addr>,
        since: Positions,
    ) -> anyhow::Result<Connection> {
        tokio::time::timeout(
            HANDSHAKE_LIMIT,
            Connection::handshake(spec, addr, identity, source, since),
        )
        .await
        .context("handshake timed out")?
    }

    async fn handshake(
        spec: &ClientSpec,
        addr: SocketAddr,
        identity: &Identity,
        source: Option<Ipv4Addr>,
        since: Positions,
    ) -> anyhow::Result<Connection> {
        let auth = auth_frame(spec, identity, since);
        let stream = tcp(addr, source)
            .await
            .with_context(|| format!("connect {addr}"))?;
        match (spec.server, spec.transport) {
            (ServerKind::Goim, Transport::Tcp) => {
                let mut stream = stream;
                stream.write_all(&auth).await?;
                let mut buf = BytesMut::with_capacity(256);
                loop {
                    if stream.read_buf(&mut buf).await? == 0 {
                        bail!("closed during auth");
                    }
                    if let Some(reply) = decode_server_stream(&mut buf)?
                        && reply.op == op::AUTH_REPLY
                    {
                        return Ok(Connection::GoimTcp { stream, buf });
                    }
                }
            }
            (ServerKind::Goim, Transport::Ws) => {
                let (mut ws, _) = tokio_tungstenite::client_async_with_config(
                    format!("ws://{addr}/sub"),
                    stream,
                    Some(small_buffers()),
                )
                .await?;
                ws.send(Message::Binary(auth)).await?;
                while let Some(message) = ws.next().await {
                    if let Message::Binary(data) = message? {
                        let mut buf = BytesMut::from(&data[..]);
                        if let Some(reply) = decode_server_stream(&mut buf)?
                            && reply.op == op::AUTH_REPLY
                        {
                            return Ok(Connection::GoimWs(Box::new(ws)));
                        }
                    }
                }
                bail!("closed during auth")
            }
            (ServerKind::Pusher, _) => {
                let url = format!(
                    "ws://{addr}/app/{}?protocol=7&client=pushcluster-bench&version=1.0",
                    spec.pusher_key
                );
                let (mut ws, _) =
                    tokio_tungstenite::client_async_with_config(url, stream, Some(small_buffers()))
                        .await?;
                let mut subscribed = false;
                while let Some(message) = ws.next().await {
                    let Message::Text(text) = message? else {
                        continue;
                    };
                    let message: PusherMessage =
                        serde_json::from_str(&text).context("a Pusher message")?;
                    match message.event.as_str() {
                        "pusher:connection_established" if !subscribed => {
                            let subscribe = serde_json::json!({
                                "event": "pusher:subscribe",
                                "data": {"channel": format!("{}-{}", identity.namespace, identity.room)}
                            });
                            ws.send(Message::Text(subscribe.to_string().into())).await?;
                            subscribed = true;
                        }
                        "pusher_internal:subscription_succeeded" => {
                            return Ok(Connection::Pusher(Box::new(ws)));
                        }
                        "pusher:error" => bail!("pusher error: {text}"),
                        _ => {}
                    }
                }
                bail!("closed before the subscription succeeded")
            }
        }
    }

    /// Reads until the server closes the connection, calling `on_body` with
    /// every pushed message body, and keeps the connection alive.
    pub async fn receive(self, mut on_body: impl FnMut(Received<'_>)) {
        match self {
            Connection::GoimTcp {
                mut stream,
                mut buf,
            } => {
                let beat = heartbeat_frame();
                let mut heartbeat = tokio::time::interval(GOIM_HEARTBEAT);
                heartbeat.tick().await;
                // What came with the auth reply (a resume's replay).
                while let Some(frame) = decode(&mut buf) {
                    goim_bodies(frame, &mut on_body);
                }
                loop {
                    tokio::select! {
                        _ = heartbeat.tick() => {
                            if stream.write_all(&beat).await.is_err() {
                                return;
                            }
                        }
                        read = stream.read_buf(&mut buf) => {
                            if !matches!(read, Ok(n) if n > 0) {
                                return;
                            }
                            while let Some(frame) = decode(&mut buf) {
                                goim_bodies(frame, &mut on_body);
                            }
                            // Do not keep a burst's buffer while idle.
                            if buf.is_empty() && buf.capacity() > 64 * 1024 {
                                buf = BytesMut::with_capacity(4096);
                            }
                        }
                    }
                }
            }
            Connection::GoimWs(mut ws) => {
                let mut heartbeat = tokio::time::interval(GOIM_HEARTBEAT);
                heartbeat.tick().await;
                loop {
                    tokio::select! {
                        _ = heartbeat.tick() => {
                            if ws.send(Message::Binary(heartbeat_frame())).await.is_err() {
                                return;
                            }
                        }
                        message = ws.next() => match message {
                            Some(Ok(Message::Binary(data))) => {
                                let mut buf = BytesMut::from(&data[..]);
                                while let Some(frame) = decode(&mut buf) {
                                    goim_bodies(frame, &mut on_body);
                                }
                            }
                            Some(Ok(_)) => {}
                            _ => return,
                        }
                    }
                }
            }
            Connection::Pusher(mut ws) => {
                let mut ping = tokio::time::interval(PUSHER_PING);
                ping.tick().await;
                let ping_text = r#"{"event":"pusher:ping","data":{}}"#;
                let pong_text = r#"{"event":"pusher:pong","data":{}}"#;
                loop {
                    tokio::select! {
                        _ = ping.tick() => {
                            if ws.send(Message::Text(ping_text.into())).await.is_err() {
                                return;
                            }
                        }
                        message = ws.next() => match message {
                            Some(Ok(Message::Text(text))) => {
                                let Ok(message) = serde_json::from_str::<PusherMessage>(&text) else {
                                    continue;
                                };
                                match (message.event.as_str(), message.data) {
                                    (PUSHER_EVENT, Some(serde_json::Value::String(data))) => {
                                        on_body(Received::Body(data.as_bytes()));
                                    }
                                    ("pusher:ping", _)
                                        if ws.send(Message::Text(pong_text.into())).await.is_err() =>
                                    {
                                        return;
                                    }
                                    _ => {}
                                }
                            }
                            Some(Ok(_)) => {}
                            _ => return,
                        }
                    }
                }
            }
        }
    }

    /// Closes politely (a WebSocket close frame; TCP FIN).
    pub async fn close(self) {
        match self {
            Connection::GoimTcp { mut stream, .. } => {
                let _ = stream.shutdown().await;
            }
            Connection::GoimWs(mut ws) | Connection::Pusher(mut ws) => {
                let _ = SinkExt::close(&mut ws).await;
            }
        }
    }
}

/// tungstenite's default 128 KiB read buffer per connection would make the
/// generator, not the server, the memory hog at 15,000 connections a worker.
fn small_buffers() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    let mut config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
    config.read_buffer_size = 4 * 1024;
    config.write_buffer_size = 0;
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_spread_over_loopback_addresses() {
        let local: SocketAddr = "127.0.0.1:3101".parse().expect("addr");
        assert_eq!(source_for(local, 0), Some(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(
            source_for(local, PER_SOURCE),
            Some(Ipv4Addr::new(127, 0, 0, 2))
        );
        assert_eq!(
            source_for(local, PER_SOURCE * 254),
            Some(Ipv4Addr::new(127, 0, 1, 1))
        );
        let remote: SocketAddr = "10.0.0.1:3101".parse().expect("addr");
        assert_eq!(source_for(remote, 7), None);
    }

    #[test]
    fn op_9_batches_are_unpacked() {
        let mut batch = BytesMut::new();
        for body in ["a", "b"] {
            Frame {
                ver: 1,
                op: PUSH_OP,
                seq: 0,
                body: Bytes::from(body),
            }
            .encode_into(&mut batch);
        }
        let outer = Frame {
            ver: 1,
            op: op::RAW,
            seq: 0,
            body: batch.freeze(),
        };
        let mut seen = Vec::new();
        let mut record = |received: Received<'_>| match received {
            Received::Body(body) => seen.push(String::from_utf8_lossy(body).into_owned()),
            Received::Position { user, since } => seen.push(format!(
                "@{}{}",
                since.offset,
                if user { " user" } else { "" }
            )),
            Received::Resumed { recovered, .. } => seen.push(format!("resumed {recovered}")),
        };
        goim_bodies((outer, None), &mut record);
        // Positioned frames (a --resume client's), then the op-20 reply.
        let mut positioned = BytesMut::new();
        pushcluster_api::protocol::put_positioned_frame(&mut positioned, PUSH_OP, b"c", 7, 1, "r");
        let (frame, position) = decode(&mut positioned).expect("a frame");
        goim_bodies((frame, position), &mut record);
        pushcluster_api::protocol::put_positioned_frame(
            &mut positioned,
            PUSH_OP,
            b"d",
            9,
            1,
            "@mid:3",
        );
        let (frame, position) = decode(&mut positioned).expect("a frame");
        goim_bodies((frame, position), &mut record);
        let reply = Frame::server(
            op::RESUME_REPLY,
            Bytes::from(r#"{"recovered":true,"epoch":"1","offset":7}"#),
        );
        goim_bodies((reply, None), &mut record);
        assert_eq!(seen, ["a", "b", "@7", "c", "@9 user", "d", "resumed true"]);
    }
}

//! goim over WebSocket: upgrade on path `/sub`, then exactly one goim frame
//! per WebSocket message in each direction. Text and binary messages are
//! both accepted from clients; the server sends binary messages.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use pushcluster_api::protocol::{self, Frame, MAX_CLIENT_FRAME};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message, http};

use crate::Comet;
use crate::channel::TransportKind;
use crate::conn::{self, Opening, ReadError, Transport};

/// The only path goim serves WebSocket clients on.
pub(crate) const PATH: &str = "/sub";

/// Small buffers: most connections are idle, and client frames are at most
/// 4112 bytes. The read buffer is every connection's (a heartbeat is a
/// 22-byte WebSocket frame; a larger frame grows it as needed). Writes are
/// buffered up to 8 KiB between flushes.
fn websocket_config() -> WebSocketConfig {
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 128;
    config.write_buffer_size = 8 * 1024;
    config.max_write_buffer_size = usize::MAX;
    config.max_message_size = Some(MAX_CLIENT_FRAME);
    config.max_frame_size = Some(MAX_CLIENT_FRAME);
    config
}

pub(crate) struct WsTransport<S> {
    ws: WebSocketStream<S>,
}

impl<S> Transport for WsTransport<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn kind(&self) -> TransportKind {
        TransportKind::WebSocket
    }

    async fn read_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            // `next` is cancel-safe: partial messages stay in the stream.
            let message = match self.ws.next().await {
                None => return Ok(None),
                Some(Ok(message)) => message,
                Some(Err(error)) => return Err(read_error(error)),
            };
            let payload = match message {
                Message::Binary(payload) => payload,
                Message::Text(text) => Bytes::from(text),
                Message::Close(_) => return Ok(None),
                // Pings are answered by the library; pongs need nothing.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            return protocol::decode_ws_message(payload)
                .map(Some)
                .map_err(ReadError::Frame);
        }
    }

    async fn write(&mut self, frames: &mut VecDeque<Bytes>) -> std::io::Result<u64> {
        let mut written = 0u64;
        while let Some(frame) = frames.pop_front() {
            written += frame.len() as u64;
            self.ws
                .feed(Message::Binary(frame))
                .await
                .map_err(write_error)?;
        }
        self.ws.flush().await.map_err(write_error)?;
        Ok(written)
    }

    async fn shutdown(&mut self) {
        let close = self.ws.close(None);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), close).await;
    }
}

fn read_error(error: tungstenite::Error) -> ReadError {
    match error {
        tungstenite::Error::Capacity(capacity) => ReadError::Oversized(match capacity {
            tungstenite::error::CapacityError::MessageTooLong { size, .. } => size,
            _ => MAX_CLIENT_FRAME + 1,
        }),
        tungstenite::Error::Io(io) => ReadError::Io(io),
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            ReadError::Io(std::io::ErrorKind::ConnectionAborted.into())
        }
        // A client that went away without a close frame (a phone losing
        // its network, a killed process) is not bad input.
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => ReadError::Io(std::io::ErrorKind::ConnectionReset.into()),
        other => ReadError::Protocol(other.to_string()),
    }
}

fn write_error(error: tungstenite::Error) -> std::io::Error {
    match error {
        tungstenite::Error::Io(io) => io,
        other => std::io::Error::other(other.to_string()),
    }
}

fn refuse(status: http::StatusCode, message: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(message.to_string()));
    *response.status_mut() = status;
    response
}

/// WSS: the TLS handshake (within the handshake timeout), then as WS.
pub(crate) fn tls_opening(
    comet: Arc<Comet>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    ip: IpAddr,
    started: Instant,
) -> Opening<WsTransport<tokio_rustls::server::TlsStream<TcpStream>>> {
    Box::pin(async move {
        let deadline = started + comet.config().protocol.handshake_timeout;
        match timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => upgrade(&comet, tls, ip, started).await,
            Ok(Err(error)) => opening_failed(&comet, ip, "tls_failed", Some(error.to_string())),
            Err(_) => opening_failed(&comet, ip, "timeout", None),
        }
    })
}

/// WS: the upgrade (within the handshake timeout).
pub(crate) fn opening<S>(
    comet: Arc<Comet>,
    stream: S,
    ip: IpAddr,
    started: Instant,
) -> Opening<WsTransport<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(async move { upgrade(&comet, stream, ip, started).await })
}

/// Upgrades the socket (within the handshake timeout). The upgrade
/// request's Cookie header goes to logic Connect.
async fn upgrade<S>(
    comet: &Comet,
    stream: S,
    ip: IpAddr,
    started: Instant,
) -> Option<(WsTransport<S>, String)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut cookie = String::new();
    // The callback's signature is tungstenite's, large error type included.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        if request.uri().path() != PATH {
            return Err(refuse(
                http::StatusCode::NOT_FOUND,
                "goim WebSocket clients connect to /sub",
            ));
        }
        if let Some(value) = request.headers().get(http::header::COOKIE) {
            cookie = String::from_utf8_lossy(value.as_bytes()).into_owned();
        }
        Ok(response)
    };
    let deadline = started + comet.config().protocol.handshake_timeout;
    let upgrade =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(websocket_config()));
    match timeout_at(deadline, upgrade).await {
        Ok(Ok(ws)) => Some((WsTransport { ws }, cookie)),
        Ok(Err(error)) => opening_failed(comet, ip, "upgrade_failed", Some(error.to_string())),
        Err(_) => opening_failed(comet, ip, "timeout", None),
    }
}

/// Counts a WebSocket opening that failed, and logs why (a timeout says
/// nothing more than its count).
fn opening_failed<T>(
    comet: &Comet,
    ip: IpAddr,
    reason: &'static str,
    error: Option<String>,
) -> Option<T> {
    comet
        .metrics
        .handshake_failures
        .with_label_values(&["websocket", reason])
        .inc();
    if let Some(error) = error {
        conn::log_refused(TransportKind::WebSocket, ip, reason, &error);
    }
    None
}

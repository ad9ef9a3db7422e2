//! goim over WebSocket: upgrade on path `/sub`, then exactly one goim frame
//! per WebSocket message in each direction. Text and binary messages are
//! both accepted from clients; the server sends binary messages.
//!
//! tungstenite parses the upgrade request, builds the 101 answer and parses
//! and formats frame headers. The message loop around them is ours, shaped
//! like the TCP transport: tokio-tungstenite's `WebSocketStream` keeps a read
//! buffer, a write buffer and two waker records alive for every connection
//! (about 800 bytes of an idle connection's 2.8 KB, docs/benchmarks.md),
//! while this transport holds a 14-byte header and allocates a payload only
//! while a frame is in flight. Writes go out with `writev`: each goim frame
//! after its 2-to-10-byte header, never copied.

use std::collections::VecDeque;
use std::io::{Cursor, IoSlice};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use pushcluster_api::protocol::{self, Frame, MAX_CLIENT_FRAME};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsAcceptor;
use tungstenite::handshake::machine::TryParse;
use tungstenite::handshake::server::{Request, create_response, write_response};
use tungstenite::http;
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

use crate::Comet;
use crate::channel::{CloseReason, TransportKind};
use crate::conn::{self, Opening, ReadError, Transport};

/// The only path goim serves WebSocket clients on.
pub(crate) const PATH: &str = "/sub";

/// The upgrade request, headers included, may be at most this long.
const MAX_REQUEST: usize = 16 * 1024;
/// A client frame's header: 2 bytes, 2 or 8 of length, 4 of mask.
const MAX_CLIENT_HEADER: usize = 14;
/// Every client frame is masked, so its header has at least 6 bytes: reading
/// that many never reads into the payload.
const MIN_CLIENT_HEADER: u8 = 6;
/// A server frame's header (unmasked): at most 10 bytes.
const MAX_SERVER_HEADER: usize = 10;
/// Frames handed to one `writev` call (two slices each).
const FRAMES_PER_WRITE: usize = 32;
/// RFC 6455 §5.5: control frames carry at most 125 bytes.
const MAX_CONTROL_PAYLOAD: u64 = 125;

pub(crate) struct WsTransport<S> {
    stream: S,
    header: [u8; MAX_CLIENT_HEADER],
    header_read: u8,
    header_wanted: u8,
    /// The client sent a close frame; once the answer is out, the
    /// connection is over.
    client_closed: bool,
    close_sent: bool,
    /// Bytes of the first queued frame already written, its header included.
    front_written: usize,
    /// The frame whose payload is being read: its header, payload, bytes read.
    frame: Option<(FrameHeader, Vec<u8>, usize)>,
    /// Allocated only while needed.
    rare: Option<Box<Rare>>,
}

/// What most connections never need, kept out of every connection's task.
#[derive(Default)]
struct Rare {
    /// Bytes the client sent after its upgrade request, read first.
    early: Option<Bytes>,
    /// A fragmented message being put together (goim clients send one
    /// frame per message): whether it is text, and its bytes so far.
    fragments: Option<(bool, Vec<u8>)>,
    /// A pong or close answer to send before anything else, and how much
    /// of it is sent.
    control: Option<(Bytes, usize)>,
}

/// Frees the rare state once nothing is left in it.
fn tidy(rare: &mut Option<Box<Rare>>) {
    if rare
        .as_ref()
        .is_some_and(|r| r.early.is_none() && r.fragments.is_none() && r.control.is_none())
    {
        *rare = None;
    }
}

impl<S> WsTransport<S> {
    fn new(stream: S, early: Option<Bytes>) -> Self {
        WsTransport {
            stream,
            header: [0; MAX_CLIENT_HEADER],
            header_read: 0,
            header_wanted: MIN_CLIENT_HEADER,
            client_closed: false,
            close_sent: false,
            front_written: 0,
            frame: None,
            rare: early.map(|early| {
                Box::new(Rare {
                    early: Some(early),
                    ..Rare::default()
                })
            }),
        }
    }

    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    fn fragments_len(&self) -> Option<usize> {
        self.rare
            .as_ref()
            .and_then(|r| r.fragments.as_ref())
            .map(|f| f.1.len())
    }

    fn mid_frame(&self) -> bool {
        self.header_read > 0 || self.frame.is_some() || self.fragments_len().is_some()
    }
}

fn protocol_error(what: &str) -> ReadError {
    ReadError::Protocol(what.to_string())
}

fn eof() -> ReadError {
    ReadError::Io(std::io::ErrorKind::UnexpectedEof.into())
}

/// Reads into `buf`, from the bytes that came with the upgrade request
/// first.
fn poll_read_some<S: AsyncRead + Unpin>(
    rare: &mut Option<Box<Rare>>,
    stream: &mut S,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Poll<std::io::Result<usize>> {
    if let Some(early) = rare.as_mut().and_then(|r| r.early.as_mut()) {
        let n = early.len().min(buf.len());
        buf[..n].copy_from_slice(&early[..n]);
        early.advance(n);
        if early.is_empty()
            && let Some(r) = rare.as_mut()
        {
            r.early = None;
            tidy(rare);
        }
        return Poll::Ready(Ok(n));
    }
    let mut read = ReadBuf::new(buf);
    ready!(Pin::new(stream).poll_read(cx, &mut read))?;
    Poll::Ready(Ok(read.filled().len()))
}

/// The close frame's payload for why the server closes: an RFC 6455 code
/// and the reason's label (as in `pushcluster_comet_disconnects_total`),
/// so a client can tell a bad frame from a drain.
fn close_payload(reason: CloseReason) -> Vec<u8> {
    let code: u16 = match reason {
        CloseReason::ClientClosed | CloseReason::Replaced => 1000,
        // Going away: reconnect, to another comet.
        CloseReason::Drain => 1001,
        CloseReason::BadFrame => 1002,
        CloseReason::FrameRate | CloseReason::SlowConsumer | CloseReason::HeartbeatTimeout => 1008,
        CloseReason::IoError => 1011,
        // Service restart: reconnect and resume.
        CloseReason::Resync => 1012,
    };
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.label().as_bytes());
    payload
}

/// A server frame (unmasked, final) of `opcode` around `payload`.
fn server_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(MAX_SERVER_HEADER + payload.len());
    let header = FrameHeader {
        opcode,
        ..FrameHeader::default()
    };
    // Writing into a Vec cannot fail.
    let _ = header.format(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// Formats the header of a binary server frame of `len` bytes into `out`;
/// returns its length.
fn binary_header(len: usize, out: &mut [u8; MAX_SERVER_HEADER]) -> usize {
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Binary),
        ..FrameHeader::default()
    };
    let mut cursor = Cursor::new(&mut out[..]);
    // Ten bytes hold any unmasked header.
    let _ = header.format(len as u64, &mut cursor);
    cursor.position() as usize
}

// Poll functions rather than async ones: the state lives in the transport,
// so reads and writes are cancel-safe and add nothing to the connection's
// task but a reference.
impl<S: AsyncRead + AsyncWrite + Unpin> WsTransport<S> {
    /// Sends the pending control frame, if any.
    fn poll_send_control(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            let Some((bytes, sent)) = self.rare.as_mut().and_then(|r| r.control.as_mut()) else {
                return Poll::Ready(Ok(()));
            };
            if *sent < bytes.len() {
                let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &bytes[*sent..]))?;
                if n == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                *sent += n;
                continue;
            }
            ready!(Pin::new(&mut self.stream).poll_flush(cx))?;
            if let Some(rare) = &mut self.rare {
                rare.control = None;
            }
            tidy(&mut self.rare);
        }
    }

    /// Reads the next frame header.
    fn poll_read_header(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(FrameHeader, u64), ReadError>> {
        loop {
            let (read, wanted) = (
                usize::from(self.header_read),
                usize::from(self.header_wanted),
            );
            let n = ready!(poll_read_some(
                &mut self.rare,
                &mut self.stream,
                cx,
                &mut self.header[read..wanted],
            ))?;
            if n == 0 {
                // A WebSocket client says goodbye with a close frame; one
                // that just went (a phone losing its network) is an I/O
                // end, not bad input.
                return Poll::Ready(Err(if self.mid_frame() {
                    eof()
                } else {
                    ReadError::Io(std::io::ErrorKind::ConnectionReset.into())
                }));
            }
            let read = read + n;
            // At most 14: `read` never passes `wanted`.
            self.header_read = read as u8;
            if read < 2 {
                continue;
            }
            if self.header[1] & 0x80 == 0 {
                return Poll::Ready(Err(protocol_error("a client frame is not masked")));
            }
            let needed = 6 + match self.header[1] & 0x7F {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            if read < needed {
                self.header_wanted = needed as u8;
                continue;
            }
            self.header_read = 0;
            self.header_wanted = MIN_CLIENT_HEADER;
            let parsed = FrameHeader::parse(&mut Cursor::new(&self.header[..needed]))
                .map_err(|error| ReadError::Protocol(error.to_string()))?;
            return Poll::Ready(parsed.ok_or_else(|| protocol_error("incomplete frame header")));
        }
    }

    /// Reads frames until a whole message is in: a goim frame. Pings and
    /// closes are answered on the way.
    fn poll_read_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Frame>, ReadError>> {
        loop {
            ready!(self.poll_send_control(cx))?;
            if self.client_closed {
                return Poll::Ready(Ok(None));
            }
            if let Some((_, payload, read)) = &mut self.frame {
                if *read < payload.len() {
                    let n = ready!(poll_read_some(
                        &mut self.rare,
                        &mut self.stream,
                        cx,
                        &mut payload[*read..],
                    ))?;
                    if n == 0 {
                        return Poll::Ready(Err(eof()));
                    }
                    *read += n;
                    continue;
                }
                let Some((header, payload, _)) = self.frame.take() else {
                    continue;
                };
                if let Some(frame) = self.complete(header, payload)? {
                    return Poll::Ready(Ok(Some(frame)));
                }
                continue;
            }
            let (header, len) = ready!(self.poll_read_header(cx))?;
            self.admit(&header, len)?;
            // `admit` bounded the length by the client frame limit.
            let len = usize::try_from(len).unwrap_or(0);
            self.frame = Some((header, vec![0; len], 0));
        }
    }

    /// Checks a frame header before its payload is read.
    fn admit(&self, header: &FrameHeader, len: u64) -> Result<(), ReadError> {
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(protocol_error("reserved bits set without an extension"));
        }
        match header.opcode {
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(protocol_error("reserved opcode"))
            }
            OpCode::Control(_) if !header.is_final || len > MAX_CONTROL_PAYLOAD => Err(
                protocol_error("control frames are single frames of at most 125 bytes"),
            ),
            OpCode::Control(_) => Ok(()),
            OpCode::Data(_) => {
                let so_far = self.fragments_len().unwrap_or(0);
                let total = so_far.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
                if total > MAX_CLIENT_FRAME {
                    return Err(ReadError::Oversized(total));
                }
                Ok(())
            }
        }
    }

    /// Acts on a frame read whole: a finished message is a goim frame; a
    /// ping or close queues its answer.
    fn complete(
        &mut self,
        header: FrameHeader,
        mut payload: Vec<u8>,
    ) -> Result<Option<Frame>, ReadError> {
        if let Some(mask) = header.mask {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= mask[i & 3];
            }
        }
        let (text, message) = match header.opcode {
            OpCode::Data(Data::Text | Data::Binary) if self.fragments_len().is_some() => {
                return Err(protocol_error(
                    "a new message began inside a fragmented one",
                ));
            }
            OpCode::Data(data @ (Data::Text | Data::Binary)) => {
                let text = data == Data::Text;
                if !header.is_final {
                    self.rare().fragments = Some((text, payload));
                    return Ok(None);
                }
                (text, payload)
            }
            OpCode::Data(Data::Continue) => {
                let Some(fragments) = self.rare.as_mut().and_then(|r| r.fragments.as_mut()) else {
                    return Err(protocol_error("a continuation frame without a message"));
                };
                fragments.1.extend_from_slice(&payload);
                if !header.is_final {
                    return Ok(None);
                }
                let whole = self.rare.as_mut().and_then(|r| r.fragments.take());
                tidy(&mut self.rare);
                match whole {
                    Some(whole) => whole,
                    None => return Ok(None),
                }
            }
            OpCode::Control(Control::Ping) => {
                self.rare().control =
                    Some((server_frame(OpCode::Control(Control::Pong), &payload), 0));
                return Ok(None);
            }
            OpCode::Control(Control::Close) => {
                if payload.len() == 1 {
                    return Err(protocol_error("a close frame of one byte"));
                }
                // Answer with the client's code, as RFC 6455 §5.5.1 suggests.
                let code = &payload[..payload.len().min(2)];
                self.rare().control =
                    Some((server_frame(OpCode::Control(Control::Close), code), 0));
                self.close_sent = true;
                self.client_closed = true;
                return Ok(None);
            }
            // Pongs need nothing; reserved opcodes were refused in `admit`.
            OpCode::Control(_) | OpCode::Data(Data::Reserved(_)) => return Ok(None),
        };
        if text && std::str::from_utf8(&message).is_err() {
            return Err(protocol_error("a text message that is not UTF-8"));
        }
        protocol::decode_ws_message(Bytes::from(message))
            .map(Some)
            .map_err(ReadError::Frame)
    }

    /// One `writev` of as many queued frames as fit, each after its header.
    fn poll_write_frames(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut VecDeque<Bytes>,
    ) -> Poll<std::io::Result<usize>> {
        let mut headers = [[0u8; MAX_SERVER_HEADER]; FRAMES_PER_WRITE];
        let mut header_lens = [0usize; FRAMES_PER_WRITE];
        for ((header, len), frame) in headers
            .iter_mut()
            .zip(header_lens.iter_mut())
            .zip(frames.iter())
        {
            *len = binary_header(frame.len(), header);
        }
        let mut slices = [IoSlice::new(&[]); FRAMES_PER_WRITE * 2];
        let mut count = 0;
        for (i, frame) in frames.iter().take(FRAMES_PER_WRITE).enumerate() {
            let skip = if i == 0 { self.front_written } else { 0 };
            let header_len = header_lens[i];
            if skip < header_len {
                slices[count] = IoSlice::new(&headers[i][skip..header_len]);
                count += 1;
            }
            let body_skip = skip.saturating_sub(header_len);
            if body_skip < frame.len() {
                slices[count] = IoSlice::new(&frame[body_skip..]);
                count += 1;
            }
        }
        let n = ready!(Pin::new(&mut self.stream).poll_write_vectored(cx, &slices[..count]))?;
        if n == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
        }
        // What was written covers the slices' frames in order.
        let mut left = n;
        for header_len in header_lens {
            let Some(front) = frames.front() else {
                break;
            };
            let remaining = header_len + front.len() - self.front_written;
            if left >= remaining {
                left -= remaining;
                self.front_written = 0;
                frames.pop_front();
            } else {
                self.front_written += left;
                break;
            }
        }
        Poll::Ready(Ok(n))
    }
}

impl<S> Transport for WsTransport<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn kind(&self) -> TransportKind {
        TransportKind::WebSocket
    }

    async fn read_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        std::future::poll_fn(|cx| self.poll_read_frame(cx)).await
    }

    async fn write(&mut self, frames: &mut VecDeque<Bytes>) -> std::io::Result<u64> {
        // An empty message would not be a goim frame.
        frames.retain(|frame| !frame.is_empty());
        let mut written = 0u64;
        std::future::poll_fn(|cx| {
            // An answer to a ping goes first, never inside another frame.
            ready!(self.poll_send_control(cx))?;
            while !frames.is_empty() {
                written += ready!(self.poll_write_frames(cx, frames))? as u64;
            }
            Pin::new(&mut self.stream).poll_flush(cx)
        })
        .await?;
        Ok(written)
    }

    async fn shutdown(&mut self, reason: Option<CloseReason>) {
        // Boxed: its timer is needed once, at the end, and would otherwise
        // be part of every connection's task for its whole life.
        let close = async {
            let sent = std::future::poll_fn(|cx| self.poll_send_control(cx)).await;
            // A close frame may not go into the middle of another frame.
            if sent.is_ok() && !self.close_sent && self.front_written == 0 {
                self.close_sent = true;
                let payload = reason.map(close_payload).unwrap_or_default();
                self.rare().control =
                    Some((server_frame(OpCode::Control(Control::Close), &payload), 0));
                let _ = std::future::poll_fn(|cx| self.poll_send_control(cx)).await;
            }
            let _ = self.stream.shutdown().await;
        };
        let _ = Box::pin(tokio::time::timeout(
            std::time::Duration::from_secs(1),
            close,
        ))
        .await;
    }
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
    mut stream: S,
    ip: IpAddr,
    started: Instant,
) -> Option<(WsTransport<S>, String)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = started + comet.config().protocol.handshake_timeout;
    match timeout_at(deadline, handshake(&mut stream)).await {
        Ok(Ok((cookie, early))) => Some((WsTransport::new(stream, early), cookie)),
        Ok(Err(error)) => opening_failed(comet, ip, "upgrade_failed", Some(error)),
        Err(_) => opening_failed(comet, ip, "timeout", None),
    }
}

/// Reads the upgrade request and answers it: 101 for a WebSocket request
/// on [`PATH`], an HTTP error otherwise. Returns the Cookie header and any
/// bytes the client sent after its request.
async fn handshake<S>(stream: &mut S) -> Result<(String, Option<Bytes>), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::with_capacity(512);
    let (end, request) = loop {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len());
        }
        let n = stream
            .read_buf(&mut buf)
            .await
            .map_err(|error| error.to_string())?;
        if n == 0 {
            return Err("the client closed before its upgrade request ended".into());
        }
        match Request::try_parse(&buf) {
            Ok(Some(parsed)) => break parsed,
            Ok(None) if buf.len() < MAX_REQUEST => {}
            Ok(None) => {
                refuse(
                    stream,
                    http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "",
                )
                .await;
                return Err(format!("upgrade request longer than {MAX_REQUEST} bytes"));
            }
            Err(error) => {
                refuse(stream, http::StatusCode::BAD_REQUEST, "").await;
                return Err(error.to_string());
            }
        }
    };
    if request.uri().path() != PATH {
        refuse(
            stream,
            http::StatusCode::NOT_FOUND,
            "goim WebSocket clients connect to /sub",
        )
        .await;
        return Err(format!("path {} is not {PATH}", request.uri().path()));
    }
    let response = match create_response(&request) {
        Ok(response) => response,
        Err(error) => {
            refuse(stream, http::StatusCode::BAD_REQUEST, "").await;
            return Err(error.to_string());
        }
    };
    let mut answer = Vec::with_capacity(160);
    write_response(&mut answer, &response).map_err(|error| error.to_string())?;
    stream
        .write_all(&answer)
        .await
        .map_err(|error| error.to_string())?;
    stream.flush().await.map_err(|error| error.to_string())?;
    let cookie = request
        .headers()
        .get(http::header::COOKIE)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        .unwrap_or_default();
    let early = (end < buf.len()).then(|| Bytes::copy_from_slice(&buf[end..]));
    Ok((cookie, early))
}

/// Answers a refused upgrade with `status` and a short text body.
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, status: http::StatusCode, body: &str) {
    let answer = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.flush().await;
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

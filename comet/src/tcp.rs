//! goim over plain TCP: frames back to back on a byte stream.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Buf, Bytes};
use pushcluster_api::config::TcpConfig;
use pushcluster_api::protocol::{Frame, HEADER_LEN, Header};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Comet;
use crate::channel::{CloseReason, TransportKind};
use crate::conn::{self, ReadError, Transport};
use pushcluster_api::log_budget::LogBudget;

/// Slices handed to one `writev` call.
const MAX_IOV: usize = 64;

static ACCEPT_ERROR_LOG: LogBudget = LogBudget::new(1);
static LIMIT_LOG: LogBudget = LogBudget::new(1);

/// The goim TCP framing over a byte stream (a `TcpStream` in the server; an
/// in-memory stream in tests and the fuzz target).
pub(crate) struct TcpTransport<S = TcpStream> {
    stream: S,
    header: [u8; HEADER_LEN],
    header_read: usize,
    /// The header being completed by its body, the body, and bytes read.
    body: Option<(Header, Vec<u8>, usize)>,
}

impl<S> TcpTransport<S> {
    pub(crate) fn new(stream: S) -> Self {
        TcpTransport {
            stream,
            header: [0; HEADER_LEN],
            header_read: 0,
            body: None,
        }
    }

    fn mid_frame(&self) -> bool {
        self.header_read > 0 || self.body.is_some()
    }
}

fn eof() -> ReadError {
    ReadError::Io(std::io::ErrorKind::UnexpectedEof.into())
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for TcpTransport<S> {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    async fn read_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some((header, body, read)) = &mut self.body {
                if *read < body.len() {
                    // `read` is cancel-safe: on cancellation nothing was consumed.
                    let n = self.stream.read(&mut body[*read..]).await?;
                    if n == 0 {
                        return Err(eof());
                    }
                    *read += n;
                    continue;
                }
                let header = *header;
                let body = std::mem::take(body);
                self.body = None;
                return Ok(Some(Frame {
                    ver: header.ver,
                    op: header.op,
                    seq: header.seq,
                    body: Bytes::from(body),
                }));
            }
            let n = self
                .stream
                .read(&mut self.header[self.header_read..])
                .await?;
            if n == 0 {
                return if self.mid_frame() {
                    Err(eof())
                } else {
                    Ok(None)
                };
            }
            self.header_read += n;
            if self.header_read == HEADER_LEN {
                self.header_read = 0;
                let header = Header::parse(&self.header);
                let body_len = header.client_body_len()?;
                self.body = Some((header, vec![0; body_len], 0));
            }
        }
    }

    async fn write(&mut self, frames: &mut VecDeque<Bytes>) -> std::io::Result<u64> {
        // A poll function, not an async block: the slices live only within
        // one poll, so the connection's task does not carry them.
        let mut written = 0u64;
        std::future::poll_fn(|cx| {
            while !frames.is_empty() {
                let mut slices = [IoSlice::new(&[]); MAX_IOV];
                let mut count = 0;
                for (slot, frame) in slices.iter_mut().zip(frames.iter()) {
                    *slot = IoSlice::new(frame);
                    count += 1;
                }
                let mut n = std::task::ready!(
                    Pin::new(&mut self.stream).poll_write_vectored(cx, &slices[..count])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                written += n as u64;
                while n > 0 {
                    let Some(front) = frames.front_mut() else {
                        break;
                    };
                    if n >= front.len() {
                        n -= front.len();
                        frames.pop_front();
                    } else {
                        front.advance(n);
                        n = 0;
                    }
                }
                while frames.front().is_some_and(|f| f.is_empty()) {
                    frames.pop_front();
                }
            }
            Poll::Ready(Ok(written))
        })
        .await
    }

    async fn shutdown(&mut self, _reason: Option<CloseReason>) {
        let _ = self.stream.shutdown().await;
    }
}

/// goim's socket options for client connections.
fn configure(stream: &TcpStream, config: &TcpConfig) {
    let _ = stream.set_nodelay(true);
    let socket = socket2::SockRef::from(stream);
    if config.sndbuf > 0 {
        let _ = socket.set_send_buffer_size(config.sndbuf as usize);
    }
    if config.rcvbuf > 0 {
        let _ = socket.set_recv_buffer_size(config.rcvbuf as usize);
    }
    let _ = socket.set_keepalive(config.keepalive);
}

/// What a listener serves.
#[derive(Clone)]
pub(crate) enum Serve {
    Tcp,
    WebSocket,
    WebSocketTls(tokio_rustls::TlsAcceptor),
}

impl Serve {
    fn kind(&self) -> TransportKind {
        match self {
            Serve::Tcp => TransportKind::Tcp,
            Serve::WebSocket | Serve::WebSocketTls(_) => TransportKind::WebSocket,
        }
    }
}

/// Accepts client sockets until `stop`; each gets its own task.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    comet: Arc<Comet>,
    serve: Serve,
    stop: CancellationToken,
) {
    let kind = serve.kind();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically out of file descriptors: back off instead of spinning.
                comet
                    .metrics
                    .accept_errors
                    .with_label_values(&[kind.label()])
                    .inc();
                if let Some(suppressed) = ACCEPT_ERROR_LOG.allow() {
                    tracing::error!(%error, suppressed, transport = kind.label(), "accept failed");
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let started = Instant::now();
        // Limits are checked before any TLS or WebSocket work: a refused
        // connection costs an accept and a close.
        let admitted = match comet.admission.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(limit) => {
                comet
                    .metrics
                    .limited
                    .with_label_values(&[kind.label(), limit.label()])
                    .inc();
                if let Some(suppressed) = LIMIT_LOG.allow() {
                    tracing::info!(ip = %peer.ip(), limit = limit.label(), suppressed, "connection refused");
                }
                drop(stream);
                continue;
            }
        };
        configure(&stream, &comet.config().tcp);
        let task_comet = comet.clone();
        let ip = peer.ip();
        let admitted = Some(admitted);
        match &serve {
            Serve::Tcp => {
                let opening: conn::Opening<TcpTransport> =
                    Box::pin(async move { Some((TcpTransport::new(stream), String::new())) });
                comet
                    .tasks
                    .spawn(conn::run(task_comet, opening, ip, started, admitted));
            }
            Serve::WebSocket => {
                let opening = crate::ws::opening(task_comet.clone(), stream, ip, started);
                comet
                    .tasks
                    .spawn(conn::run(task_comet, opening, ip, started, admitted));
            }
            Serve::WebSocketTls(acceptor) => {
                let opening = crate::ws::tls_opening(
                    task_comet.clone(),
                    acceptor.clone(),
                    stream,
                    ip,
                    started,
                );
                comet
                    .tasks
                    .spawn(conn::run(task_comet, opening, ip, started, admitted));
            }
        }
    }
}

/// For the fuzz target and tests: runs the server's TCP frame reader over
/// `input`, delivered in reads of the sizes `chunks` cycles through (0 is
/// taken as 1), and returns the frames it decoded and the error that
/// stopped it, if any (`None`: the input ended between frames).
#[doc(hidden)]
pub async fn read_tcp_frames(input: &[u8], chunks: &[u8]) -> (Vec<Frame>, Option<String>) {
    let mut transport = TcpTransport::new(memory::Chunked::new(input, chunks));
    let mut frames = Vec::new();
    loop {
        match transport.read_frame().await {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, None),
            Err(error) => return (frames, Some(error.to_string())),
        }
    }
}

/// An in-memory stream that hands out its input in chosen read sizes.
mod memory {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    pub struct Chunked {
        input: Vec<u8>,
        at: usize,
        chunks: Vec<u8>,
        next: usize,
    }

    impl Chunked {
        pub fn new(input: &[u8], chunks: &[u8]) -> Self {
            Chunked {
                input: input.to_vec(),
                at: 0,
                chunks: chunks.to_vec(),
                next: 0,
            }
        }
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let size = match self.chunks.as_slice() {
                [] => usize::MAX,
                chunks => usize::from(chunks[self.next % chunks.len()]).max(1),
            };
            self.next += 1;
            let at = self.at;
            let n = size.min(buf.remaining()).min(self.input.len() - at);
            buf.put_slice(&self.input[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Chunked {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }
}

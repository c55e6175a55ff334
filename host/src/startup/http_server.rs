//! The HTTP server loop. `axum::serve` has no read deadlines and no
//! connection cap, so a peer holding thousands of half-sent requests kept
//! them (and their sockets) for as long as it liked. Here every connection
//! runs on hyper with two deadlines of its own (the request head must arrive
//! within the header timeout; an idle keep-alive connection is closed after
//! the idle timeout) and holds a permit of a semaphore: over the cap, new
//! connections wait in the kernel's accept queue and are served once others
//! leave; a response its peer stops reading ends the connection after the
//! idle timeout. HTTP/1 only. (The body deadline is a middleware:
//! `api::app`.)
//!
//! Shutdown stops accepting, asks every connection to finish what it is
//! doing, and drops what is left when the drain time is up.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tower::ServiceExt;

/// Deadlines and the connection cap of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest time to receive a request head, from its first byte (or
    /// from the connection's start).
    pub header: Duration,
    /// Longest time a keep-alive connection may sit between requests.
    pub idle: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

/// One listener's connections: the permits that cap them and the signals
/// that end them.
#[derive(Debug)]
pub struct Server {
    limits: Limits,
    permits: Arc<Semaphore>,
    max_permits: u32,
    drain: watch::Sender<bool>,
    close: watch::Sender<bool>,
}

impl Server {
    pub fn new(limits: Limits) -> Arc<Self> {
        let max_permits = limits
            .max_connections
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Arc::new(Self {
            limits,
            permits: Arc::new(Semaphore::new(max_permits)),
            max_permits: u32::try_from(max_permits).unwrap_or(u32::MAX),
            drain: watch::Sender::new(false),
            close: watch::Sender::new(false),
        })
    }

    /// Accepts connections until the drain begins, each with a permit.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, app: Router) {
        let mut drain = self.drain.subscribe();
        loop {
            let permit = tokio::select! {
                permit = self.permits.clone().acquire_owned() => permit,
                _ = drain.wait_for(|d| *d) => return,
            };
            let Ok(permit) = permit else { return };
            let stream = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = drain.wait_for(|d| *d) => return,
            };
            match stream {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(self.clone().connection(stream, app.clone(), permit));
                }
                // Out of file descriptors and the like: wait, do not spin.
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Stops accepting and asks connections to finish; waits for them
    /// until `until`, or until `interrupt` resolves, then drops the rest.
    /// True if every connection finished on its own.
    pub async fn shutdown(&self, until: Instant, interrupt: impl Future<Output = ()>) -> bool {
        self.drain.send_replace(true);
        let all_back = self.permits.acquire_many(self.max_permits);
        let drained = tokio::select! {
            r = tokio::time::timeout_at(until, all_back) => matches!(r, Ok(Ok(_))),
            () = interrupt => false,
        };
        self.close.send_replace(true);
        drained
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        app: Router,
        _permit: OwnedSemaphorePermit,
    ) {
        let clock = Arc::new(ConnClock::new());
        let io = TokioIo::new(Tracked {
            inner: stream,
            clock: clock.clone(),
        });
        let service = clocked(app, clock.clone());
        // HTTP/1 only: one request at a time per connection, so the cap
        // counts requests too. Our clock keeps the head deadline (hyper's
        // restarts when idle).
        let mut builder = http1::Builder::new();
        builder
            .keep_alive(true)
            .header_read_timeout(None::<Duration>);
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        let (mut drain, mut close) = (self.drain.subscribe(), self.close.subscribe());
        let mut draining = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = clock.expired(self.limits) => return,
                _ = drain.wait_for(|d| *d), if !draining => {
                    conn.as_mut().graceful_shutdown();
                    draining = true;
                }
                _ = close.wait_for(|c| *c) => return,
            }
        }
    }
}

/// The app as hyper calls it: each request holds the connection busy
/// until its response body is sent.
fn clocked(
    app: Router,
    clock: Arc<ConnClock>,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = hyper::Response<Guarded>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<hyper::Response<Guarded>, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let (app, guard) = (app.clone(), InFlight::begin(clock.clone()));
        async move {
            let response = app.oneshot(req.map(Body::new)).await;
            response.map(|r| {
                r.map(|body| Guarded {
                    body,
                    _guard: guard,
                })
            })
        }
    })
}

/// How often a connection's deadlines are looked at again.
const CLOCK_TICK: Duration = Duration::from_millis(500);

const IDLE: u8 = 0;
const HEAD: u8 = 1;
const BUSY: u8 = 2;

/// Where a connection is: waiting for a request (idle), receiving a request
/// head, or serving requests; and since when.
#[derive(Debug)]
struct ConnClock {
    start: Instant,
    phase: AtomicU8,
    since_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// When a response write began to wait for the peer (ms since start, plus
    /// one), or 0.
    stalled_ms: AtomicU64,
}

impl ConnClock {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            // The first request head is due within the header timeout.
            phase: AtomicU8::new(HEAD),
            since_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            stalled_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn enter(&self, phase: u8) {
        self.since_ms.store(self.now_ms(), Ordering::Release);
        self.phase.store(phase, Ordering::Release);
    }

    /// Bytes arrived: on an idle connection, a request head begins.
    fn on_read(&self) {
        if self.phase.load(Ordering::Acquire) == IDLE && self.in_flight.load(Ordering::Acquire) == 0
        {
            self.enter(HEAD);
        }
    }

    /// The deadline of the current phase; none while serving.
    fn deadline(&self, limits: Limits) -> Option<Instant> {
        let limit = match self.phase.load(Ordering::Acquire) {
            HEAD => limits.header,
            IDLE => limits.idle,
            _ => return None,
        };
        let since = Duration::from_millis(self.since_ms.load(Ordering::Acquire));
        Some(self.start + since + limit)
    }

    /// Resolves once the connection has overstayed its current phase, or
    /// its peer has not taken a byte of a response for the idle timeout.
    /// The phase can change while this sleeps, so it looks again at least
    /// every [`CLOCK_TICK`].
    async fn expired(&self, limits: Limits) {
        loop {
            let now = Instant::now();
            let deadline = match (self.deadline(limits), self.write_deadline(limits)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match deadline {
                Some(deadline) if deadline <= now => return,
                Some(deadline) => tokio::time::sleep_until(deadline.min(now + CLOCK_TICK)).await,
                None => tokio::time::sleep(CLOCK_TICK).await,
            }
        }
    }

    /// A write that could not go out marks the connection stalled, the
    /// next one that does clears it.
    fn on_write(&self, progressed: bool) {
        if progressed {
            self.stalled_ms.store(0, Ordering::Release);
        } else if self.stalled_ms.load(Ordering::Acquire) == 0 {
            self.stalled_ms
                .store(self.now_ms().saturating_add(1), Ordering::Release);
        }
    }

    /// When a stalled response write gives up: the peer stopped reading.
    fn write_deadline(&self, limits: Limits) -> Option<Instant> {
        match self.stalled_ms.load(Ordering::Acquire) {
            0 => None,
            since => Some(self.start + Duration::from_millis(since - 1) + limits.idle),
        }
    }
}

/// A request being served on a connection; when its response body is done
/// (or dropped) and no other request is in flight, the connection is idle.
#[derive(Debug)]
struct InFlight(Arc<ConnClock>);

impl InFlight {
    fn begin(clock: Arc<ConnClock>) -> Self {
        clock.in_flight.fetch_add(1, Ordering::AcqRel);
        clock.phase.store(BUSY, Ordering::Release);
        Self(clock)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.enter(IDLE);
        }
    }
}

/// A response body that holds its request's `InFlight` until it is sent.
struct Guarded {
    body: Body,
    _guard: InFlight,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The socket, telling the clock when bytes arrive.
struct Tracked {
    inner: TcpStream,
    clock: Arc<ConnClock>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.on_read();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.clock.on_write(polled.is_ready());
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.clock.on_write(polled.is_ready());
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

//! [`serve`]: the admin API's accept loop and connections, the same JSON-lines protocol,
//! limits and timeouts on a Unix socket (Linux, macOS) and on a named pipe (Windows).

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::codec::{FramedRead, FramedWrite, LinesCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

#[cfg(unix)]
use crate::MAX_CLIENTS;
use crate::{Endpoint, IDLE_TIMEOUT, MAX_REQUEST_LEN, Request, Response};

/// What answers the requests: the proxy's view of its forwards and settings.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> Response;
}

impl<F: Fn(Request) -> Response + Send + Sync + 'static> Handler for F {
    fn handle(&self, request: Request) -> Response {
        self(request)
    }
}

/// Why the admin API could not be served. Each is a sentence naming the endpoint.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error(
        "another hostnet-proxy is already serving {0}; stop it first, or pass --admin-socket to use \
         another endpoint"
    )]
    InUse(Endpoint),
    /// The endpoint's directory or path is not safe to use (the sentence says why and what to do).
    #[error("{0}")]
    Unsafe(String),
    #[error("{endpoint} is not an admin endpoint this platform can serve ({why})")]
    Unsupported { endpoint: Endpoint, why: &'static str },
    #[error("cannot serve the admin API at {endpoint}: {source}")]
    Io { endpoint: Endpoint, source: std::io::Error },
}

/// Serves the admin API at `endpoint` until `shutdown`, each connection a task of `tracker`,
/// each request answered by `handler`. Returns once listening (errors come back at once).
pub fn serve<H: Handler>(
    endpoint: &Endpoint,
    handler: H,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), ServeError> {
    platform::serve(endpoint, Arc::new(handler), tracker, shutdown)
}

/// Counts connections turned away while [`MAX_CLIENTS`] are served, and says so now and then.
#[cfg(unix)]
#[derive(Debug, Default)]
struct TurnedAway(u64);

#[cfg(unix)]
impl TurnedAway {
    fn one_more(&mut self) {
        self.0 += 1;
        if self.0.is_power_of_two() {
            tracing::warn!(
                "{MAX_CLIENTS} admin clients are connected: answered one more \"busy\" ({} so far); \
                 a client silent for {IDLE_TIMEOUT:?} is closed",
                self.0
            );
        }
    }
}

/// How long the one-line answer before a hang-up may take (a turned-away, refused or idle
/// connection's). Its buffer is empty, so the write completes as soon as the reactor has seen
/// the socket writable (one turn for a new socket); written without waiting at all
/// (`now_or_never`, `try_write`), it was lost whenever the reactor had not reported the socket
/// writable yet, and the client read a bare hang-up.
const ANSWER_AND_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Writes `answer` as the connection's last line before it is closed, waiting at most
/// [`ANSWER_AND_CLOSE_WAIT`]: best effort, the client may not be reading.
async fn last_word<W: AsyncWrite + Unpin>(w: &mut W, answer: &Response) {
    let line = format!("{}\n", answer.to_line());
    let _ = timeout(ANSWER_AND_CLOSE_WAIT, w.write_all(line.as_bytes())).await;
}

/// Hands an accepted connection to a task of `tracker`, or answers it "busy" when
/// [`MAX_CLIENTS`] are served already.
#[cfg(unix)]
async fn dispatch<S, H>(
    conn: S,
    clients: &Arc<tokio::sync::Semaphore>,
    turned_away: &mut TurnedAway,
    handler: &Arc<H>,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    H: Handler,
{
    let Ok(permit) = clients.clone().try_acquire_owned() else {
        turned_away.one_more();
        let mut conn = conn;
        // The client reads it and retries.
        last_word(&mut conn, &Response::busy()).await;
        return;
    };
    spawn_client(conn, permit, handler, tracker, stop);
}

/// Serves `conn` in a task of `tracker`, holding its place (`permit`) until it ends.
fn spawn_client<S, H>(
    conn: S,
    permit: tokio::sync::OwnedSemaphorePermit,
    handler: &Arc<H>,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    H: Handler,
{
    let (handler, stop) = (handler.clone(), stop.clone());
    tracker.spawn(async move {
        client(conn, move |r| handler.handle(r), stop).await;
        drop(permit);
    });
}

/// The answer to one request line.
fn answer_line(line: &str, handler: &impl Fn(Request) -> Response) -> Response {
    match serde_json::from_str::<Request>(line) {
        Ok(request) => handler(request),
        Err(e) => Response::error(format!("bad request: {e}")),
    }
}

/// Serves one connection: request lines in, answer lines out, until the client hangs up,
/// idles for [`IDLE_TIMEOUT`], or `stop`.
pub(crate) async fn client<S>(conn: S, handler: impl Fn(Request) -> Response, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (r, w) = tokio::io::split(conn);
    let mut lines = FramedRead::new(r, LinesCodec::new_with_max_length(MAX_REQUEST_LEN));
    let mut out = FramedWrite::new(w, LinesCodec::new());
    // One deadline per request, for the whole line: trickling bytes buys no more time than
    // silence, and neither do blank lines.
    let mut deadline = Instant::now() + IDLE_TIMEOUT;
    loop {
        let line = tokio::select! {
            _ = stop.cancelled() => return,
            l = timeout_at(deadline, lines.next()) => l,
        };
        let reply = match line {
            Err(_) => {
                debug!("admin client sent no complete request in {IDLE_TIMEOUT:?}: closing it");
                let notice = Response::error(format!(
                    "no complete request within {IDLE_TIMEOUT:?}: closing the connection"
                ));
                last_word(out.get_mut(), &notice).await;
                return;
            }
            Ok(None) => return,
            Ok(Some(Ok(line))) if line.trim().is_empty() => continue,
            Ok(Some(Ok(line))) => answer_line(&line, &handler),
            Ok(Some(Err(e))) => {
                // Too long or not UTF-8: answer once, then hang up.
                debug!("admin client sent garbage: {e}");
                let reply = Response::error(format!("bad request: {e}")).to_line();
                let _ = timeout(IDLE_TIMEOUT, out.send(reply)).await;
                return;
            }
        };
        let sent = tokio::select! {
            _ = stop.cancelled() => return,
            s = timeout(IDLE_TIMEOUT, out.send(reply.to_line())) => s,
        };
        match sent {
            Ok(Ok(())) => deadline = Instant::now() + IDLE_TIMEOUT,
            Ok(Err(_)) => return,
            Err(_) => return debug!("admin client took no answer in {IDLE_TIMEOUT:?}: closing it"),
        }
    }
}

#[cfg(unix)]
mod platform {
    use std::sync::Arc;

    use tokio::net::UnixListener;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;
    use tracing::{info, warn};

    use super::{Handler, ServeError, TurnedAway, dispatch};
    use crate::unix::{AtPath, euid, make_private, peer_uid, prepare_dir, what_is_at};
    use crate::{Endpoint, MAX_CLIENTS, Response};

    /// Creates the socket (in a checked directory of mode 0700; the socket 0600) and serves it.
    pub(super) fn serve<H: Handler>(
        endpoint: &Endpoint,
        handler: Arc<H>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<(), ServeError> {
        let Endpoint::Socket(path) = endpoint else {
            return Err(ServeError::Unsupported {
                endpoint: endpoint.clone(),
                why: "named pipes are Windows'",
            });
        };
        let io_err = |source| ServeError::Io { endpoint: endpoint.clone(), source };
        prepare_dir(crate::endpoint::socket_dir(path)).map_err(ServeError::Unsafe)?;
        match what_is_at(path).map_err(io_err)? {
            AtPath::Nothing => {}
            AtPath::OurSocket => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ServeError::InUse(endpoint.clone()));
                }
                // Stale, from a process of ours that died.
                std::fs::remove_file(path).map_err(io_err)?;
            }
            AtPath::Other(why) => return Err(ServeError::Unsafe(why)),
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        make_private(path).map_err(io_err)?;
        info!(path = %path.display(), "admin API listening");
        let (stop, tracker2, owned) = (shutdown.clone(), tracker.clone(), path.to_owned());
        tracker.spawn(async move {
            accept_loop(listener, handler, &tracker2, &stop).await;
            let _ = std::fs::remove_file(&owned);
        });
        Ok(())
    }

    /// Serves `listener` until `stop`, at most [`MAX_CLIENTS`] connections at once.
    pub(crate) async fn accept_loop<H: Handler>(
        listener: UnixListener,
        handler: Arc<H>,
        tracker: &TaskTracker,
        stop: &CancellationToken,
    ) {
        let clients = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
        let mut turned_away = TurnedAway::default();
        let me = euid();
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            let mut conn = match accepted {
                Ok((conn, _)) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    warn!("accepting an admin connection failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            // The socket's modes already keep others out; this holds where modes are not
            // enforced. Root may ask (it could anyway).
            match peer_uid(&conn) {
                Ok(uid) if uid == me || uid == 0 => {}
                other => {
                    warn!("refused an admin connection from another user ({other:?})");
                    let refusal =
                        Response::error("this admin API serves only the user running hostnet-proxy");
                    super::last_word(&mut conn, &refusal).await;
                    continue;
                }
            }
            dispatch(conn, &clients, &mut turned_away, &handler, tracker, stop).await;
        }
    }
}

#[cfg(windows)]
mod platform {
    use std::sync::Arc;

    use tokio::net::windows::named_pipe::{ClientOptions, NamedPipeServer, ServerOptions};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;
    use tracing::{info, warn};
    use windows_sys::Win32::Foundation::ERROR_PIPE_BUSY;

    use super::{Handler, ServeError, spawn_client};
    use crate::windows::{SecurityDescriptor, current_user_sid};
    use crate::{Endpoint, IDLE_TIMEOUT, MAX_CLIENTS};

    /// Creates one instance of the pipe `name` with the descriptor `sd`.
    fn instance(name: &str, sd: &SecurityDescriptor, first: bool) -> std::io::Result<NamedPipeServer> {
        let mut attributes = sd.attributes();
        // SAFETY: `attributes` and the descriptor it points to outlive the call, which copies them.
        unsafe {
            ServerOptions::new()
                .first_pipe_instance(first)
                .reject_remote_clients(true)
                .create_with_security_attributes_raw(name, (&raw mut attributes).cast())
        }
    }

    /// Creates the pipe (only the current user's account may open it) and serves it.
    pub(super) fn serve<H: Handler>(
        endpoint: &Endpoint,
        handler: Arc<H>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<(), ServeError> {
        let Endpoint::Pipe(name) = endpoint else {
            return Err(ServeError::Unsupported {
                endpoint: endpoint.clone(),
                why: "Windows serves the admin API on a named pipe, \\\\.\\pipe\\…",
            });
        };
        let io_err = |source| ServeError::Io { endpoint: endpoint.clone(), source };
        let sid = current_user_sid().map_err(io_err)?;
        let sddl = crate::endpoint::pipe_sddl(&sid).map_err(|e| ServeError::Unsafe(e.to_string()))?;
        let sd = SecurityDescriptor::from_sddl(&sddl).map_err(io_err)?;
        // Someone answers there already (first_pipe_instance below is the race-free check; this
        // one also holds where it is not enforced, as under Wine).
        match ClientOptions::new().open(name) {
            Ok(_) => return Err(ServeError::InUse(endpoint.clone())),
            Err(e)
                if e.raw_os_error() == Some(ERROR_PIPE_BUSY as i32)
                    || e.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                return Err(ServeError::InUse(endpoint.clone()));
            }
            Err(_) => {}
        }
        let first = match instance(name, &sd, true) {
            Ok(p) => p,
            // The name exists: another process serves it (first_pipe_instance refuses).
            Err(e) if e.raw_os_error() == Some(5) || e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(ServeError::InUse(endpoint.clone()));
            }
            Err(e) => return Err(io_err(e)),
        };
        info!(pipe = %name, "admin API listening");
        let (stop, tracker2, name) = (shutdown.clone(), tracker.clone(), name.clone());
        tracker.spawn(async move { accept_loop(first, &name, sd, handler, &tracker2, &stop).await });
        Ok(())
    }

    /// Serves the pipe until `stop`, at most [`MAX_CLIENTS`] connections at once. While that
    /// many are served no new instance is made, so clients beyond them (but the one that may
    /// wait on the last instance) get `ERROR_PIPE_BUSY`, which `request` retries like a
    /// "busy" answer.
    async fn accept_loop<H: Handler>(
        mut server: NamedPipeServer,
        name: &str,
        sd: SecurityDescriptor,
        handler: Arc<H>,
        tracker: &TaskTracker,
        stop: &CancellationToken,
    ) {
        let clients = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
        let mut full_since_said = false;
        loop {
            let permit = match clients.clone().try_acquire_owned() {
                Ok(p) => {
                    full_since_said = false;
                    p
                }
                Err(_) => {
                    if !full_since_said {
                        warn!(
                            "{MAX_CLIENTS} admin clients are connected: others wait (pipe busy); a client \
                             silent for {IDLE_TIMEOUT:?} is closed"
                        );
                        full_since_said = true;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        p = clients.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => return,
                        },
                    }
                }
            };
            let connected = tokio::select! {
                _ = stop.cancelled() => return,
                c = server.connect() => c,
            };
            // The next instance waits for the next client while this one is served.
            let next = loop {
                match instance(name, &sd, false) {
                    Ok(p) => break p,
                    Err(e) => {
                        warn!("cannot create another instance of the admin pipe {name}: {e}");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                        }
                    }
                }
            };
            let conn = std::mem::replace(&mut server, next);
            if let Err(e) = connected {
                warn!("accepting an admin connection failed: {e}");
                continue;
            }
            spawn_client(conn, permit, &handler, tracker, stop);
        }
    }
}

#[cfg(not(any(unix, windows)))]
mod platform {
    compile_error!("the admin API is served on Unix sockets or Windows named pipes");
}

#[cfg(all(test, unix, feature = "client"))]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::{UnixListener, UnixStream};

    use super::*;

    fn echo(r: Request) -> Response {
        Response::error(format!("echo {}", serde_json::to_string(&r).unwrap()))
    }

    fn text(r: &serde_json::Value) -> &str {
        r["error"].as_str().unwrap_or_default()
    }

    /// Reads lines until the server hangs up (within 3 idle timeouts, or the test fails);
    /// returns them and when the hang-up came.
    async fn lines_until_closed(r: impl tokio::io::AsyncRead + Unpin) -> (Vec<serde_json::Value>, Instant) {
        let mut got = Vec::new();
        let mut lines = BufReader::new(r).lines();
        let read = async {
            while let Ok(Some(l)) = lines.next_line().await {
                got.push(serde_json::from_str(&l).unwrap());
            }
        };
        timeout(IDLE_TIMEOUT * 3, read).await.expect("the server never hung up");
        (got, Instant::now())
    }

    fn closed_at_idle_timeout(started: Instant, closed: Instant) {
        let took = closed - started;
        assert!(
            took >= IDLE_TIMEOUT && took < IDLE_TIMEOUT + Duration::from_secs(1),
            "closed after {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_told_and_closed_after_the_idle_timeout() {
        let (server, c) = UnixStream::pair().unwrap();
        let started = Instant::now();
        tokio::spawn(client(server, echo, CancellationToken::new()));
        let (got, closed) = lines_until_closed(c).await;
        closed_at_idle_timeout(started, closed);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["ok"], false);
        assert!(text(&got[0]).contains("no complete request"), "{got:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn trickling_bytes_or_blank_lines_buy_no_time() {
        for (first, drip) in [(&b"{\"cmd\":"[..], &b" "[..]), (&b""[..], &b"\n"[..])] {
            let (server, c) = UnixStream::pair().unwrap();
            let (r, mut w) = c.into_split();
            let started = Instant::now();
            tokio::spawn(client(server, echo, CancellationToken::new()));
            tokio::spawn(async move {
                let mut sent = w.write_all(first).await;
                while sent.is_ok() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    sent = w.write_all(drip).await;
                }
            });
            let (got, closed) = lines_until_closed(r).await;
            closed_at_idle_timeout(started, closed);
            assert_eq!(got.len(), 1, "only the closing notice: {got:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_asking_now_and_then_keeps_its_connection() {
        let (server, c) = UnixStream::pair().unwrap();
        let (r, mut w) = c.into_split();
        tokio::spawn(client(server, echo, CancellationToken::new()));
        let mut lines = BufReader::new(r).lines();
        for _ in 0..3 {
            tokio::time::sleep(IDLE_TIMEOUT - Duration::from_secs(1)).await;
            w.write_all(b"{\"cmd\":\"status\"}\n").await.unwrap();
            let answer: serde_json::Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(text(&answer), r#"echo {"cmd":"status"}"#, "{answer}");
        }
        // Then silence: closed one idle timeout after the last answer.
        let started = Instant::now();
        let (got, closed) = lines_until_closed(lines.into_inner()).await;
        closed_at_idle_timeout(started, closed);
        assert_eq!(got.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn bad_lines_are_answered_and_nothing_is_asked_of_the_handler() {
        let (server, c) = UnixStream::pair().unwrap();
        let (r, mut w) = c.into_split();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = asked.clone();
        let handler = move |r| {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            echo(r)
        };
        tokio::spawn(client(server, handler, CancellationToken::new()));
        let mut lines = BufReader::new(r).lines();
        for bad in ["not json", r#"{"cmd":"status","extra":1}"#, r#"{"cmd":"reboot"}"#] {
            w.write_all(format!("{bad}\n").as_bytes()).await.unwrap();
            let answer: serde_json::Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert!(answer["ok"] == false && text(&answer).starts_with("bad request"), "{bad}: {answer}");
            assert_eq!(answer["field"], serde_json::Value::Null);
        }
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    // Real time, not a paused clock: with the clock paused, tokio may jump it forward while
    // the server's writes are still in flight, so its idle timer can start after the client's
    // (seen in CI). Takes IDLE_TIMEOUT and a little.
    #[tokio::test]
    async fn a_client_that_takes_no_answers_is_closed_after_the_idle_timeout() {
        let (server, c) = UnixStream::pair().unwrap();
        let (r, mut w) = c.into_split();
        let big = |_| Response::error("x".repeat(64 * 1024));
        tokio::spawn(client(server, big, CancellationToken::new()));
        // 100 requests, ~6 MiB of answers: far more than the socket holds. Nothing read.
        for _ in 0..100 {
            w.write_all(b"{\"cmd\":\"status\"}\n").await.unwrap();
        }
        tokio::time::sleep(IDLE_TIMEOUT + Duration::from_secs(3)).await;
        // Reading now finds only what fitted before the proxy gave up (the last answer may be
        // cut short), then the hang-up.
        let mut bytes = Vec::new();
        let mut r = r;
        let read = tokio::io::AsyncReadExt::read_to_end(&mut r, &mut bytes);
        timeout(IDLE_TIMEOUT, read).await.expect("the server never hung up").unwrap();
        let answers = bytes.iter().filter(|&&b| b == b'\n').count();
        assert!(answers > 0 && answers < 100, "{answers} answers");
    }

    #[tokio::test(start_paused = true)]
    async fn silent_clients_hold_the_api_for_at_most_the_idle_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
        let (t, s) = (tracker.clone(), stop.clone());
        tokio::spawn(async move { platform::accept_loop(listener, Arc::new(echo), &t, &s).await });
        let started = Instant::now();
        let mut silent = Vec::new();
        for _ in 0..MAX_CLIENTS {
            silent.push(UnixStream::connect(&path).await.unwrap());
        }
        // One more is told "busy" at once, and closed.
        let (got, closed) = lines_until_closed(UnixStream::connect(&path).await.unwrap()).await;
        assert!(closed - started < Duration::from_millis(100));
        assert_eq!(got.len(), 1);
        let busy: Response = serde_json::from_value(got[0].clone()).unwrap();
        assert!(busy.is_busy(), "{got:?}");
        // `request` retries and gets through once the silent ones are closed.
        let endpoint = Endpoint::Socket(path.clone());
        let answer = crate::request(&endpoint, &Request::Status {}).await.unwrap();
        let took = started.elapsed();
        assert_eq!(answer, Response::error(r#"echo {"cmd":"status"}"#));
        assert!(took >= IDLE_TIMEOUT && took < IDLE_TIMEOUT + Duration::from_secs(1), "took {took:?}");
        for c in silent {
            let (got, _) = lines_until_closed(c).await;
            assert!(text(&got[0]).contains("no complete request"), "{got:?}");
        }
        stop.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test(start_paused = true)]
    async fn request_gives_up_on_a_proxy_that_never_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let _listener = UnixListener::bind(&path).unwrap(); // never accepts
        let started = Instant::now();
        let e = crate::request(&Endpoint::Socket(path), &Request::Status {}).await.unwrap_err();
        assert!(matches!(e, crate::ClientError::TimedOut { .. }), "{e}");
        let took = started.elapsed();
        assert!(
            took >= crate::REQUEST_TIMEOUT && took < crate::REQUEST_TIMEOUT + Duration::from_secs(1),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn serve_checks_its_directory_and_answers_requests() {
        let tmp = tempfile::tempdir().unwrap();
        let endpoint = Endpoint::Socket(tmp.path().join("run/hostnet/admin.sock"));
        let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
        serve(&endpoint, echo, &tracker, &stop).unwrap();
        let Endpoint::Socket(path) = &endpoint else { unreachable!() };
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(path), mode(path.parent().unwrap())), (0o600, 0o700));
        let answer = crate::request(&endpoint, &Request::GetSettings {}).await.unwrap();
        assert_eq!(answer, Response::error(r#"echo {"cmd":"get_settings"}"#));
        // A second server on the same socket is refused with a sentence; the first goes on.
        let e = serve(&endpoint, echo, &tracker, &stop).unwrap_err();
        assert!(e.to_string().contains("another hostnet-proxy is already serving"), "{e}");
        assert!(crate::request(&endpoint, &Request::Status {}).await.is_ok());
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        assert!(!path.exists(), "the socket is removed on shutdown");
        // A stale socket of ours (its server died) is replaced.
        drop(std::os::unix::net::UnixListener::bind(path).unwrap());
        let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
        serve(&endpoint, echo, &tracker, &stop).unwrap();
        assert!(crate::request(&endpoint, &Request::Status {}).await.is_ok());
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        // A file that is not our socket is never removed.
        std::fs::write(path, b"precious").unwrap();
        let e = serve(&endpoint, echo, &TaskTracker::new(), &CancellationToken::new()).unwrap_err();
        assert!(e.to_string().contains("leaves it alone"), "{e}");
        assert_eq!(std::fs::read(path).unwrap(), b"precious");
    }

    #[tokio::test]
    async fn nothing_there_is_not_running() {
        let tmp = tempfile::tempdir().unwrap();
        let e = crate::request(&Endpoint::Socket(tmp.path().join("none.sock")), &Request::Status {})
            .await
            .unwrap_err();
        assert!(e.is_not_running(), "{e}");
        assert!(e.to_string().contains("not running") && e.to_string().contains("none.sock"), "{e}");
    }

    /// Needs root: a server running as another user (a forked child that becomes `nobody`
    /// before it binds and listens).
    #[test]
    fn a_server_of_another_user_is_refused_by_the_client() {
        use std::os::unix::fs::PermissionsExt;
        if crate::unix::euid() != 0 {
            eprintln!("skipped: needs root to serve as another user");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = tmp.path().join("admin.sock");
        // SAFETY: a zeroed sockaddr_un is valid; the path fits (checked).
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        assert!(bytes.len() < addr.sun_path.len());
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        // SAFETY: the child calls only async-signal-safe functions, then `_exit`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: async-signal-safe calls on memory prepared before the fork.
            unsafe {
                if libc::setuid(65534) != 0 {
                    libc::_exit(1);
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if libc::bind(fd, (&raw const addr).cast(), len) != 0 || libc::listen(fd, 16) != 0 {
                    libc::_exit(2);
                }
                libc::sleep(30);
                libc::_exit(0);
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !path.exists() {
            assert!(std::time::Instant::now() < deadline, "the child never listened");
            std::thread::sleep(Duration::from_millis(5));
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let result = rt.block_on(crate::request(&Endpoint::Socket(path), &Request::Status {}));
        // SAFETY: our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        let e = result.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, crate::ClientError::NotOurs { .. }), "{msg}");
        assert!(msg.contains("user id 65534") && msg.contains("not by you"), "{msg}");
    }
}

/// The named pipe, for real: run on Windows (or the Windows test build under Wine).
#[cfg(all(test, windows, feature = "client"))]
mod windows_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::MAX_CLIENTS;

    fn echo(r: Request) -> Response {
        Response::error(format!("echo {}", serde_json::to_string(&r).unwrap()))
    }

    #[tokio::test]
    async fn the_pipe_serves_its_user_and_only_one_proxy() {
        let endpoint = Endpoint::Pipe(format!(r"\\.\pipe\hostnet-admin-test-{}", std::process::id()));
        let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
        serve(&endpoint, echo, &tracker, &stop).unwrap();
        for _ in 0..3 {
            let answer = crate::request(&endpoint, &Request::Status {}).await.unwrap();
            assert_eq!(answer, Response::error(r#"echo {"cmd":"status"}"#));
        }
        let e = serve(&endpoint, echo, &tracker, &stop).unwrap_err();
        assert!(e.to_string().contains("another hostnet-proxy is already serving"), "{e}");
        // Many clients at once: each gets its answer (instances are created as they connect).
        let many: Vec<_> = (0..20)
            .map(|_| {
                let endpoint = endpoint.clone();
                tokio::spawn(async move { crate::request(&endpoint, &Request::GetSettings {}).await })
            })
            .collect();
        for c in many {
            assert_eq!(c.await.unwrap().unwrap(), Response::error(r#"echo {"cmd":"get_settings"}"#));
        }
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        let e = crate::request(&endpoint, &Request::Status {}).await.unwrap_err();
        assert!(e.is_not_running(), "{e}");
    }

    /// Real time (about 10 s): pipes are not driven by tokio's paused clock.
    #[tokio::test]
    async fn silent_clients_hold_the_pipe_for_at_most_the_idle_timeout() {
        use tokio::net::windows::named_pipe::ClientOptions;
        let endpoint = Endpoint::Pipe(format!(r"\\.\pipe\hostnet-admin-busy-{}", std::process::id()));
        let Endpoint::Pipe(name) = &endpoint else { unreachable!() };
        let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
        serve(&endpoint, echo, &tracker, &stop).unwrap();
        let started = std::time::Instant::now();
        let mut silent = Vec::new();
        while silent.len() < MAX_CLIENTS {
            match ClientOptions::new().open(name) {
                Ok(c) => silent.push(c),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
        // `request` waits (pipe busy) and gets through once the silent ones are closed.
        let answer = crate::request(&endpoint, &Request::Status {}).await.unwrap();
        let took = started.elapsed();
        assert_eq!(answer, Response::error(r#"echo {"cmd":"status"}"#));
        assert!(took >= IDLE_TIMEOUT && took < IDLE_TIMEOUT * 2, "took {took:?}");
        stop.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[test]
    fn the_default_pipe_is_named_after_this_user() {
        let sid = crate::windows::current_user_sid().unwrap();
        assert!(sid.starts_with("S-1-"), "{sid}");
        let Endpoint::Pipe(name) = crate::endpoint::choose_endpoint(
            crate::endpoint::Os::Windows,
            &crate::endpoint::EndpointInputs { user_sid: Some(sid.clone()), ..Default::default() },
        )
        .unwrap() else {
            panic!("not a pipe")
        };
        assert!(name.ends_with(&sid), "{name}");
        let sd = crate::windows::SecurityDescriptor::from_sddl(&crate::endpoint::pipe_sddl(&sid).unwrap());
        assert!(sd.is_ok(), "{sd:?}");
    }
}

//! The admin API: JSON lines on a Unix socket that only its owner can use (socket 0600 in a
//! 0700 directory). `hostnet-proxy status|enable|disable` and the settings window are its
//! clients.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"set_enabled","enabled":false}`,
//! `{"cmd":"get_settings"}`, `{"cmd":"update_settings","settings":{…}}`; anything else, an
//! unknown field included, is refused. Every answer is one line: `{"ok":true,…}` or
//! `{"ok":false,"error":"…","field":"…"}`.
//!
//! At most [`MAX_CLIENTS`] connections are served at once; one more is answered "busy" and
//! closed, and [`request`] tries again until its deadline. A connection that sends no complete
//! request for [`IDLE_TIMEOUT`] (silent, or trickling a line byte by byte) or does not take an
//! answer within it is closed, so a crowd of silent connections holds the API for at most that
//! long.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hostnet_protocol::{ListenerSet, Proto};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::codec::{FramedRead, FramedWrite, LinesCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::LinkState;
use crate::forward::{ForwardStats, ForwardStatus, Forwards};
use crate::guest_streams::{ToHost, ToHostStats};
use crate::settings::{Settings, SettingsHandle};

/// Longest request line accepted.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// Most admin connections served at once.
pub const MAX_CLIENTS: usize = 64;
/// How long a client has, from connecting or from its last answer, to send one complete
/// request line, and how long it has to take each answer. The CLI and the settings window
/// write their request as soon as they connect and read the answer at once (milliseconds), so
/// 10 s is ample even on a loaded machine — the transport handshake allows the same — while a
/// connection left open and silent, or trickling bytes, frees its place within 10 s.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`request`] keeps trying while the API is busy or slow: a busy API frees a place
/// within [`IDLE_TIMEOUT`], then the request itself takes milliseconds.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(IDLE_TIMEOUT.as_secs() + 5);
/// Longest pause between [`request`]'s tries while the API is busy.
const BUSY_RETRY_MAX: Duration = Duration::from_millis(250);

/// A request. Commands without arguments are empty struct variants, not unit variants:
/// serde ignores `deny_unknown_fields` on unit variants of an internally tagged enum, and
/// `{"cmd":"status","extra":1}` must be refused like any other unknown field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status {},
    SetEnabled { enabled: bool },
    GetSettings {},
    UpdateSettings { settings: Settings },
}

/// What `status` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub enabled: bool,
    /// `connected`, `connecting` or `disconnected`.
    pub agent: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_error: Option<String>,
    pub settings_path: PathBuf,
    /// Problems the user should see (an invalid settings file, say).
    pub errors: Vec<String>,
    pub forwards: Vec<serde_json::Value>,
    /// Limits reached, each a sentence naming the limit and what changes it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<String>,
}

/// What the API serves from.
#[derive(Debug, Clone)]
pub struct Admin {
    pub forwards: Forwards,
    pub settings: SettingsHandle,
    pub link: watch::Receiver<LinkState>,
    pub host: watch::Receiver<Arc<ListenerSet>>,
    pub to_host: ToHost,
    pub to_host_stats: ToHostStats,
}

impl Admin {
    pub fn status(&self) -> Status {
        let settings = self.settings.current();
        let (agent, agent_error) = match &*self.link.borrow() {
            LinkState::Connected { .. } => ("connected", None),
            LinkState::Connecting => ("connecting", None),
            LinkState::Disconnected { error } => ("disconnected", Some(error.clone())),
        };
        let mut forwards: Vec<ForwardStatus> = self.forwards.status();
        let host = self.host.borrow().clone();
        let stats = self.to_host_stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (proto, port) in host.ports() {
            let addrs = host
                .iter()
                .filter(|l| l.proto == proto && l.port == port)
                .map(|l| l.connect_addr())
                .collect();
            let counts = stats.get(&(proto, port)).cloned().unwrap_or_default();
            forwards.push(to_host_status(proto, port, addrs, &counts));
        }
        // Desktop listeners the guest may not reach, and why (the guest→host policy).
        let withheld = self.to_host.withheld.borrow().clone();
        for (l, why) in withheld.iter() {
            forwards.push(ForwardStatus {
                state: "not_offered",
                reason: Some(format!("{}: {why}", std::net::SocketAddr::new(l.addr, l.port))),
                ..to_host_status(l.proto, l.port, Vec::new(), &ForwardStats::default())
            });
        }
        let mut limits = Vec::new();
        let limited: Vec<String> = forwards
            .iter()
            .filter(|f| f.state == "limited")
            .map(|f| format!("{}/{}", f.proto, f.guest_port))
            .collect();
        if let (Some(first), Some(last)) = (limited.first(), limited.last()) {
            limits.push(format!(
                "{} guest port(s) not forwarded over the limits on host ports ({first} … {last}; each forward says which limit)",
                limited.len()
            ));
        }
        let foreign = self.to_host.foreign_refused.load(std::sync::atomic::Ordering::Relaxed);
        if let (true, Some(cid)) = (foreign > 0, self.to_host.guest_cid) {
            limits.push(format!(
                "{foreign} guest→host stream(s) refused from vsock peers other than the VM (CID {cid})"
            ));
        }
        let refused = self.to_host.streams_refused.load(std::sync::atomic::Ordering::Relaxed);
        if refused > 0 {
            limits.push(format!(
                "{refused} guest→host stream(s) closed at once: {} were open, the limit (--max-guest-streams)",
                self.to_host.max_streams
            ));
        }
        Status {
            enabled: settings.enabled,
            agent: agent.to_owned(),
            agent_error,
            settings_path: self.settings.path.clone(),
            errors: self.settings.error().into_iter().collect(),
            forwards: forwards.iter().filter_map(|f| serde_json::to_value(f).ok()).collect(),
            limits,
        }
    }

    fn answer(&self, line: &str) -> serde_json::Value {
        let request: Request = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => return error(format!("bad request: {e}"), None),
        };
        let ok = |v: serde_json::Value| {
            let mut v = v;
            if let Some(o) = v.as_object_mut() {
                o.insert("ok".into(), true.into());
            }
            v
        };
        match request {
            Request::Status {} => ok(serde_json::json!({ "status": self.status() })),
            Request::GetSettings {} => {
                ok(serde_json::json!({ "settings": *self.settings.current(), "path": self.settings.path }))
            }
            Request::SetEnabled { enabled } => match self.settings.update(|s| s.enabled = enabled) {
                Ok(_) => {
                    info!(
                        "host networking {} through the admin API",
                        if enabled { "enabled" } else { "disabled" }
                    );
                    ok(serde_json::json!({ "status": self.status() }))
                }
                Err(e) => error(e.to_string(), e.key()),
            },
            Request::UpdateSettings { settings } => match self.settings.update(|s| *s = settings) {
                Ok(_) => ok(serde_json::json!({ "status": self.status() })),
                Err(e) => error(e.to_string(), e.key()),
            },
        }
    }
}

fn to_host_status(
    proto: Proto,
    port: u16,
    host_addresses: Vec<std::net::IpAddr>,
    counts: &ForwardStats,
) -> ForwardStatus {
    use std::sync::atomic::Ordering::Relaxed;
    ForwardStatus {
        proto,
        direction: "to_host",
        guest_port: port,
        host_port: port,
        state: "forwarding",
        reason: None,
        host_addresses,
        connections_active: counts.active.load(Relaxed),
        connections_total: counts.total.load(Relaxed),
        connections_refused: counts.refused.load(Relaxed),
        bytes_to_guest: counts.bytes.to_peer.load(Relaxed),
        bytes_from_guest: counts.bytes.from_peer.load(Relaxed),
    }
}

fn error(message: String, field: Option<&str>) -> serde_json::Value {
    serde_json::json!({ "ok": false, "error": message, "field": field })
}

/// The platform's place for the admin socket: `/run/hostnet/admin.sock` for root,
/// `$XDG_RUNTIME_DIR/hostnet/admin.sock` for a user, else `/tmp/hostnet-<uid>/admin.sock`.
pub fn default_socket_path() -> PathBuf {
    let uid = nix::unistd::getuid();
    let dir = if uid.is_root() {
        PathBuf::from("/run/hostnet")
    } else if let Some(run) = dirs::runtime_dir() {
        run.join("hostnet")
    } else {
        std::env::temp_dir().join(format!("hostnet-{uid}"))
    };
    dir.join("admin.sock")
}

/// Creates the socket (its directory 0700, the socket 0600) and serves it until `shutdown`.
pub fn serve(path: &Path, api: Admin, tracker: &TaskTracker, shutdown: &CancellationToken) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another hostnet-proxy already serves {}; pass --admin-socket to use another path",
                path.display()
            ),
        ));
    }
    let _ = std::fs::remove_file(path); // stale, from a process that died
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    info!(path = %path.display(), "admin API listening");
    let (stop, tracker2, owned) = (shutdown.clone(), tracker.clone(), path.to_owned());
    tracker.spawn(async move {
        accept_loop(listener, move |line: &str| api.answer(line), &tracker2, &stop).await;
        let _ = std::fs::remove_file(&owned);
    });
    Ok(())
}

/// Serves `listener` until `stop`: each client in a task of `tracker`, each request line
/// answered by `answer`, at most [`MAX_CLIENTS`] at once.
async fn accept_loop<A>(listener: UnixListener, answer: A, tracker: &TaskTracker, stop: &CancellationToken)
where
    A: Fn(&str) -> serde_json::Value + Clone + Send + 'static,
{
    let clients = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    let mut turned_away: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let conn = match accepted {
            Ok((conn, _)) => conn,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                warn!("accepting an admin connection failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = clients.clone().try_acquire_owned() else {
            turned_away += 1;
            if turned_away.is_power_of_two() {
                warn!(
                    "{MAX_CLIENTS} admin clients are connected: answered one more \"busy\" ({turned_away} so far); \
                     a client silent for {IDLE_TIMEOUT:?} is closed"
                );
            }
            // Never blocks (a new socket's send buffer is empty); the client reads it and retries.
            let _ = conn.try_write(format!("{}\n", busy()).as_bytes());
            continue;
        };
        let (answer, stop) = (answer.clone(), stop.clone());
        tracker.spawn(async move {
            client(conn, answer, stop).await;
            drop(permit);
        });
    }
}

async fn client(conn: UnixStream, answer: impl Fn(&str) -> serde_json::Value, stop: CancellationToken) {
    let (r, w) = conn.into_split();
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
                // Best effort, never blocking: the client may not be reading.
                let notice = error(
                    format!("no complete request within {IDLE_TIMEOUT:?}: closing the connection"),
                    None,
                );
                let _ = out.get_ref().try_write(format!("{notice}\n").as_bytes());
                return;
            }
            Ok(None) => return,
            Ok(Some(Ok(line))) if line.trim().is_empty() => continue,
            Ok(Some(Ok(line))) => answer(&line),
            Ok(Some(Err(e))) => {
                // Too long or not UTF-8: answer once, then hang up.
                debug!("admin client sent garbage: {e}");
                let reply = error(format!("bad request: {e}"), None).to_string();
                let _ = timeout(IDLE_TIMEOUT, out.send(reply)).await;
                return;
            }
        };
        let sent = tokio::select! {
            _ = stop.cancelled() => return,
            s = timeout(IDLE_TIMEOUT, out.send(reply.to_string())) => s,
        };
        match sent {
            Ok(Ok(())) => deadline = Instant::now() + IDLE_TIMEOUT,
            Ok(Err(_)) => return,
            Err(_) => return debug!("admin client took no answer in {IDLE_TIMEOUT:?}: closing it"),
        }
    }
}

/// Writes all of `bytes` with `MSG_NOSIGNAL`: a proxy that hung up (busy, or gone) is an error
/// to handle, not a SIGPIPE that kills the command-line client (which keeps SIGPIPE's default
/// disposition so that `| head` ends it quietly).
async fn send_all(conn: &UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    use nix::sys::socket::{MsgFlags, send};
    use std::os::fd::AsRawFd;
    while !bytes.is_empty() {
        let n = conn
            .async_io(tokio::io::Interest::WRITABLE, || {
                send(conn.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
            })
            .await?;
        bytes = bytes.get(n..).unwrap_or_default();
    }
    Ok(())
}

/// The answer to a client beyond [`MAX_CLIENTS`], just before it is closed.
fn busy() -> serde_json::Value {
    let mut v = error(
        format!(
            "the admin API is busy: {MAX_CLIENTS} clients are connected; try again in a moment \
             (a client silent for {IDLE_TIMEOUT:?} is closed)"
        ),
        None,
    );
    if let Some(o) = v.as_object_mut() {
        o.insert("busy".into(), true.into());
    }
    v
}

fn is_busy(answer: &serde_json::Value) -> bool {
    answer.get("busy").and_then(serde_json::Value::as_bool) == Some(true)
}

/// Sends one request to the admin socket at `path` and returns the answer. While the API is
/// busy it tries again, for at most [`REQUEST_TIMEOUT`] in all; a proxy that does not answer
/// by then is an error of kind `TimedOut`.
pub async fn request(path: &Path, req: &Request) -> io::Result<serde_json::Value> {
    let line = serde_json::to_string(req).map_err(io::Error::other)?;
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut pause = Duration::from_millis(10);
    loop {
        let Ok(answer) = timeout_at(deadline, request_once(path, &line)).await else {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the proxy did not answer within {REQUEST_TIMEOUT:?}"),
            ));
        };
        let busy = match &answer {
            Ok(v) => is_busy(v),
            // The socket's accept queue is full: as busy as it gets.
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        };
        if !busy {
            return answer;
        }
        if Instant::now() + pause >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the admin API stayed busy ({MAX_CLIENTS} clients connected) for {REQUEST_TIMEOUT:?}"
                ),
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(BUSY_RETRY_MAX);
    }
}

async fn request_once(path: &Path, line: &str) -> io::Result<serde_json::Value> {
    let conn = UnixStream::connect(path).await?;
    // A busy proxy answers and hangs up without reading, so the write may fail: the answer is
    // still there to read.
    let sent = send_all(&conn, format!("{line}\n").as_bytes()).await;
    let mut lines = FramedRead::new(conn, LinesCodec::new_with_max_length(16 << 20));
    match lines.next().await {
        Some(Ok(line)) => serde_json::from_str(&line).map_err(io::Error::other),
        Some(Err(e)) => Err(sent.err().unwrap_or_else(|| io::Error::other(e))),
        None => Err(sent.err().unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "the proxy closed the admin connection")
        })),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    #[test]
    fn commands_without_arguments_keep_their_wire_shape() {
        for (line, want) in [
            (r#"{"cmd":"status"}"#, Request::Status {}),
            (r#"{"cmd":"get_settings"}"#, Request::GetSettings {}),
        ] {
            assert_eq!(serde_json::from_str::<Request>(line).unwrap(), want);
            assert_eq!(serde_json::to_string(&want).unwrap(), line);
        }
    }

    #[test]
    fn an_unknown_field_is_refused_for_every_command() {
        for line in [
            r#"{"cmd":"status","extra":1}"#,
            r#"{"cmd":"status","enabled":false}"#,
            r#"{"cmd":"get_settings","path":"/etc/passwd"}"#,
            r#"{"cmd":"set_enabled","enabled":true,"extra":1}"#,
            r#"{"cmd":"update_settings","settings":{},"extra":1}"#,
        ] {
            let e = serde_json::from_str::<Request>(line).unwrap_err();
            assert!(e.to_string().contains("unknown field"), "{line}: {e}");
        }
    }

    fn echo(line: &str) -> serde_json::Value {
        serde_json::json!({ "ok": true, "echo": line })
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
        assert!(got[0]["error"].as_str().unwrap().contains("no complete request"), "{got:?}");
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
            assert_eq!(answer["ok"], true, "{answer}");
        }
        // Then silence: closed one idle timeout after the last answer.
        let started = Instant::now();
        let (got, closed) = lines_until_closed(lines.into_inner()).await;
        closed_at_idle_timeout(started, closed);
        assert_eq!(got.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_no_answers_is_closed_after_the_idle_timeout() {
        let (server, c) = UnixStream::pair().unwrap();
        let (r, mut w) = c.into_split();
        let big = |_: &str| serde_json::json!({ "ok": true, "pad": "x".repeat(64 * 1024) });
        tokio::spawn(client(server, big, CancellationToken::new()));
        // 100 requests, ~6 MiB of answers: far more than the socket holds. Nothing read.
        for _ in 0..100 {
            w.write_all(b"{}\n").await.unwrap();
        }
        tokio::time::sleep(IDLE_TIMEOUT + Duration::from_secs(1)).await;
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
        tokio::spawn(async move { accept_loop(listener, echo, &t, &s).await });
        let started = Instant::now();
        let mut silent = Vec::new();
        for _ in 0..MAX_CLIENTS {
            silent.push(UnixStream::connect(&path).await.unwrap());
        }
        // One more is told "busy" at once, and closed.
        let (got, closed) = lines_until_closed(UnixStream::connect(&path).await.unwrap()).await;
        assert!(closed - started < Duration::from_millis(100));
        assert_eq!(got.len(), 1);
        assert!(is_busy(&got[0]) && got[0]["ok"] == false, "{got:?}");
        // `request` retries and gets through once the silent ones are closed.
        let answer = request(&path, &Request::Status {}).await.unwrap();
        let took = started.elapsed();
        assert_eq!(answer["echo"], r#"{"cmd":"status"}"#, "{answer}");
        assert!(took >= IDLE_TIMEOUT && took < IDLE_TIMEOUT + Duration::from_secs(1), "took {took:?}");
        for c in silent {
            let (got, _) = lines_until_closed(c).await;
            assert!(got[0]["error"].as_str().unwrap().contains("no complete request"), "{got:?}");
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
        let e = request(&path, &Request::Status {}).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        let took = started.elapsed();
        assert!(took >= REQUEST_TIMEOUT && took < REQUEST_TIMEOUT + Duration::from_secs(1), "{took:?}");
    }
}

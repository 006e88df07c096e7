//! [`request`]: one request, one answer, retried while the API is busy. Before sending, the
//! client checks that the server runs as the same user: on a Unix socket by the peer's
//! credentials (`SO_PEERCRED`, `LOCAL_PEERCRED`), on a pipe by the serving process's token.
//! An impostor who got to the endpoint first is refused, never told anything.

use std::io;
use std::time::Duration;

use futures_util::StreamExt;
use thiserror::Error;
use tokio::io::AsyncRead;
use tokio::time::{Instant, timeout_at};
use tokio_util::codec::{FramedRead, LinesCodec};

use crate::{Endpoint, MAX_ANSWER_LEN, MAX_CLIENTS, REQUEST_TIMEOUT, Request, Response};

/// Longest pause between [`request`]'s tries while the API is busy.
const BUSY_RETRY_MAX: Duration = Duration::from_millis(250);

/// Why a request got no answer. Each is a sentence naming the endpoint.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Nothing serves the endpoint.
    #[error("hostnet-proxy is not running (no admin API at {endpoint}: {source})")]
    NotRunning { endpoint: Endpoint, source: io::Error },
    /// Something serves it, but not in time (busy or stuck).
    #[error("hostnet-proxy did not answer at {endpoint}: {what}")]
    TimedOut { endpoint: Endpoint, what: String },
    /// The endpoint is served by a process of another user.
    #[error(
        "the admin API at {endpoint} is served by {server}, not by you ({me}); hostnet will not talk \
         to another user's process there: stop it, or pass --admin-socket with a path of your own"
    )]
    NotOurs { endpoint: Endpoint, server: String, me: String },
    /// This platform cannot use that kind of endpoint.
    #[error("{endpoint} is not an admin endpoint this platform can use ({why})")]
    Unsupported { endpoint: Endpoint, why: &'static str },
    /// The connection failed otherwise, or the answer made no sense.
    #[error("talking to hostnet-proxy at {endpoint} failed: {source}")]
    Io { endpoint: Endpoint, source: io::Error },
}

impl ClientError {
    /// Nothing serves the endpoint: the proxy is not running (there).
    pub fn is_not_running(&self) -> bool {
        matches!(self, ClientError::NotRunning { .. })
    }
}

/// What one try came to.
enum Try {
    Answer(Response),
    /// Busy: the API said so, or its accept queue (or pipe instances) are full.
    Busy,
}

/// Sends one request to the admin API at `endpoint` and returns the answer. While the API is
/// busy it tries again, for at most [`REQUEST_TIMEOUT`] in all.
pub async fn request(endpoint: &Endpoint, req: &Request) -> Result<Response, ClientError> {
    let line = serde_json::to_string(req)
        .map_err(|e| ClientError::Io { endpoint: endpoint.clone(), source: io::Error::other(e) })?;
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut pause = Duration::from_millis(10);
    loop {
        let timed_out = |what: String| ClientError::TimedOut { endpoint: endpoint.clone(), what };
        let Ok(answer) = timeout_at(deadline, request_once(endpoint, &line)).await else {
            return Err(timed_out(format!("no answer within {REQUEST_TIMEOUT:?}; try again")));
        };
        match answer? {
            Try::Answer(r) if !r.is_busy() => return Ok(r),
            Try::Answer(_) | Try::Busy => {}
        }
        if Instant::now() + pause >= deadline {
            return Err(timed_out(format!(
                "the admin API stayed busy ({MAX_CLIENTS} clients connected) for {REQUEST_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(BUSY_RETRY_MAX);
    }
}

/// Reads one answer line after `sent` (the result of writing the request).
async fn read_answer<R: AsyncRead + Unpin>(
    endpoint: &Endpoint,
    conn: R,
    sent: io::Result<()>,
) -> Result<Try, ClientError> {
    let io_err = |source| ClientError::Io { endpoint: endpoint.clone(), source };
    let mut lines = FramedRead::new(conn, LinesCodec::new_with_max_length(MAX_ANSWER_LEN));
    // A busy proxy answers and hangs up without reading, so the write may fail: the answer is
    // still there to read.
    match lines.next().await {
        Some(Ok(line)) => serde_json::from_str(&line).map(Try::Answer).map_err(|e| {
            io_err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected answer: {e}")))
        }),
        Some(Err(e)) => Err(io_err(sent.err().unwrap_or_else(|| io::Error::other(e)))),
        None => Err(io_err(sent.err().unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "the proxy closed the admin connection")
        }))),
    }
}

#[cfg(unix)]
async fn request_once(endpoint: &Endpoint, line: &str) -> Result<Try, ClientError> {
    let Endpoint::Socket(path) = endpoint else {
        return Err(ClientError::Unsupported { endpoint: endpoint.clone(), why: "named pipes are Windows'" });
    };
    let conn = match tokio::net::UnixStream::connect(path).await {
        Ok(c) => c,
        // The socket's accept queue is full: as busy as it gets.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Try::Busy),
        // Someone's socket, not ours to use: not "not running".
        Err(source) if source.kind() == io::ErrorKind::PermissionDenied => {
            return Err(ClientError::Io { endpoint: endpoint.clone(), source });
        }
        Err(source) => return Err(ClientError::NotRunning { endpoint: endpoint.clone(), source }),
    };
    let me = crate::unix::euid();
    match crate::unix::peer_uid(&conn) {
        Ok(uid) if uid == me => {}
        Ok(uid) => {
            return Err(ClientError::NotOurs {
                endpoint: endpoint.clone(),
                server: format!("user id {uid}"),
                me: format!("user id {me}"),
            });
        }
        Err(source) => return Err(ClientError::Io { endpoint: endpoint.clone(), source }),
    }
    let sent = crate::unix::send_all(&conn, format!("{line}\n").as_bytes()).await;
    read_answer(endpoint, conn, sent).await
}

#[cfg(windows)]
async fn request_once(endpoint: &Endpoint, line: &str) -> Result<Try, ClientError> {
    use tokio::net::windows::named_pipe::ClientOptions;
    use windows_sys::Win32::Foundation::ERROR_PIPE_BUSY;
    let Endpoint::Pipe(name) = endpoint else {
        return Err(ClientError::Unsupported {
            endpoint: endpoint.clone(),
            why: "Windows serves the admin API on a named pipe, \\\\.\\pipe\\…",
        });
    };
    let mut conn = match ClientOptions::new().open(name) {
        Ok(c) => c,
        // Every instance is taken: as busy as it gets (retried with the same back-off).
        Err(e) if e.raw_os_error() == Some(ERROR_PIPE_BUSY as i32) => return Ok(Try::Busy),
        Err(source) => return Err(ClientError::NotRunning { endpoint: endpoint.clone(), source }),
    };
    let io_err = |source| ClientError::Io { endpoint: endpoint.clone(), source };
    let me = crate::windows::current_user_sid().map_err(io_err)?;
    let server = crate::windows::pipe_server_sid(&conn).map_err(io_err)?;
    if server != me {
        return Err(ClientError::NotOurs {
            endpoint: endpoint.clone(),
            server: format!("the account {server}"),
            me: format!("account {me}"),
        });
    }
    let sent = {
        use tokio::io::AsyncWriteExt;
        let written = conn.write_all(format!("{line}\n").as_bytes()).await;
        match written {
            Ok(()) => conn.flush().await,
            Err(e) => Err(e),
        }
    };
    read_answer(endpoint, conn, sent).await
}

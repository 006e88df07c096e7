//! The admin API: JSON lines on a Unix socket that only its owner can use (socket 0600 in a
//! 0700 directory). `hostnet-proxy status|enable|disable` and the settings window are its
//! clients.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"set_enabled","enabled":false}`,
//! `{"cmd":"get_settings"}`, `{"cmd":"update_settings","settings":{…}}`. Every answer is one
//! line: `{"ok":true,…}` or `{"ok":false,"error":"…","field":"…"}`.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use hostnet_protocol::{ListenerSet, Proto};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::codec::{FramedRead, FramedWrite, LinesCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::LinkState;
use crate::forward::{ForwardStats, ForwardStatus, Forwards};
use crate::guest_streams::ToHostStats;
use crate::settings::{Settings, SettingsHandle};

/// Longest request line accepted.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// Most admin connections served at once.
const MAX_CLIENTS: usize = 64;

/// A request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    SetEnabled { enabled: bool },
    GetSettings,
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
}

/// What the API serves from.
#[derive(Debug, Clone)]
pub struct Admin {
    pub forwards: Forwards,
    pub settings: SettingsHandle,
    pub link: watch::Receiver<LinkState>,
    pub host: watch::Receiver<Arc<ListenerSet>>,
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
        Status {
            enabled: settings.enabled,
            agent: agent.to_owned(),
            agent_error,
            settings_path: self.settings.path.clone(),
            errors: self.settings.error().into_iter().collect(),
            forwards: forwards.iter().filter_map(|f| serde_json::to_value(f).ok()).collect(),
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
            Request::Status => ok(serde_json::json!({ "status": self.status() })),
            Request::GetSettings => {
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
    let clients = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    tracker.spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            let Ok((conn, _)) = accepted else { continue };
            let Ok(permit) = clients.clone().try_acquire_owned() else {
                warn!("over {MAX_CLIENTS} admin connections: refusing one");
                continue;
            };
            let (api, stop) = (api.clone(), stop.clone());
            tracker2.spawn(async move {
                client(conn, api, stop).await;
                drop(permit);
            });
        }
        let _ = std::fs::remove_file(&owned);
    });
    Ok(())
}

async fn client(conn: UnixStream, api: Admin, stop: CancellationToken) {
    let (r, w) = conn.into_split();
    let mut lines = FramedRead::new(r, LinesCodec::new_with_max_length(MAX_REQUEST_LEN));
    let mut out = FramedWrite::new(w, LinesCodec::new());
    loop {
        let line = tokio::select! {
            _ = stop.cancelled() => return,
            l = lines.next() => l,
        };
        let answer = match line {
            None => return,
            Some(Ok(line)) if line.trim().is_empty() => continue,
            Some(Ok(line)) => api.answer(&line),
            Some(Err(e)) => {
                // Too long or not UTF-8: answer once, then hang up.
                debug!("admin client sent garbage: {e}");
                let _ = out.send(error(format!("bad request: {e}"), None).to_string()).await;
                return;
            }
        };
        if out.send(answer.to_string()).await.is_err() {
            return;
        }
    }
}

/// Sends one request to the admin socket at `path` and returns the answer.
pub async fn request(path: &Path, req: &Request) -> io::Result<serde_json::Value> {
    let conn = UnixStream::connect(path).await?;
    let (r, w) = conn.into_split();
    let mut out = FramedWrite::new(w, LinesCodec::new());
    out.send(serde_json::to_string(req).map_err(io::Error::other)?).await.map_err(io::Error::other)?;
    let mut lines = FramedRead::new(r, LinesCodec::new_with_max_length(16 << 20));
    match lines.next().await {
        Some(Ok(line)) => serde_json::from_str(&line).map_err(io::Error::other),
        Some(Err(e)) => Err(io::Error::other(e)),
        None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the proxy closed the admin connection")),
    }
}

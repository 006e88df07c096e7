//! `hostnet-proxy`: the desktop side of hostnet.
//!
//! [`run`] keeps a control link to the agent ([`link`]) and mirrors every guest listener it
//! reports as listening sockets on the host's loopback ([`forward`]). [`demo`] stands up the
//! netns stand-in for a VM and runs the same thing against it.

use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;

use hostnet_net::discovery::own::OwnSockets;
use hostnet_net::threads::RelayThreads;
use hostnet_net::{Connector, TransportSpec};
use settings::SettingsHandle;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod admin;
pub mod bridge;
#[cfg(target_os = "linux")]
pub mod demo;
pub mod forward;
pub mod guest_streams;
pub mod limits;
mod link;
pub mod policy;
pub mod serving;
pub mod settings;
pub mod udp;

/// How often the desktop's own listeners are read for guest→host.
pub const HOST_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How the proxy runs.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// How to reach the agent.
    pub connector: Arc<dyn Connector>,
    /// Where the agent opens streams for guest→host connections (`None`: guest→host off).
    pub guest_listen: Option<TransportSpec>,
    /// The settings file (watched; created when first saved).
    pub settings_path: PathBuf,
    /// Where the admin API listens: a Unix socket, or a named pipe on Windows (`None`: no
    /// admin API).
    pub admin_socket: Option<admin::Endpoint>,
    /// Connections and UDP flows served at once.
    pub limits: limits::Limits,
    /// The VM, when the agent's transport names it (a vsock CID, a Hyper-V VM id): guest→host
    /// streams from any other peer are refused (and counted).
    pub guest_vm: Option<guest_streams::VmIdentity>,
    /// Threads relayed connections live on ([`hostnet_net::threads`]).
    pub relay_threads: usize,
    /// Streams to the agent kept opened ahead of need ([`hostnet_net::transport::spare`]).
    pub spare_streams: usize,
    /// Streams whose connection ended cleanly kept for the next ones, at most (0: each
    /// connection's stream is closed with it).
    pub reuse_streams: usize,
}

impl ProxyConfig {
    pub fn new(agent: &TransportSpec) -> Self {
        ProxyConfig {
            connector: agent.connector(),
            guest_listen: None,
            // The current directory only when the system names no configuration directory.
            settings_path: settings::default_path().unwrap_or_else(|| PathBuf::from("hostnet-settings.toml")),
            admin_socket: admin::default_endpoint()
                .map_err(|e| tracing::warn!("the admin API is off: {e}"))
                .ok(),
            limits: limits::Limits::default(),
            guest_vm: guest_streams::VmIdentity::of(agent),
            relay_threads: RelayThreads::default_count(),
            spare_streams: agent.default_spare_streams(),
            reuse_streams: hostnet_net::transport::spare::REUSED_STREAMS,
        }
    }
}

/// The state of the link to the agent, for status and the `ready` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Trying to reach the agent.
    Connecting,
    /// Snapshot applied: `forwarding` host ports are live for `listeners` guest listeners.
    Connected { listeners: usize, forwarding: usize },
    /// The last attempt failed; retrying.
    Disconnected { error: String },
}

/// Runs until `shutdown` fires, then closes every forwarded port and drains connections.
pub async fn run(config: ProxyConfig, shutdown: CancellationToken, state: watch::Sender<LinkState>) {
    let relay = match RelayThreads::start("hostnet-relay", config.relay_threads) {
        Ok(threads) => threads,
        Err(e) => return tracing::error!("cannot start the relay threads: {e}"),
    };
    let tracker = TaskTracker::new();
    let connector = hostnet_net::transport::spare::with_spares(
        config.connector.clone(),
        config.spare_streams,
        config.reuse_streams,
    );
    let settings = SettingsHandle::load(config.settings_path.clone());
    settings.watch(&tracker, &shutdown);
    // The proxy's own sockets: its mirrors, bridges and flow sockets, never offered to the guest.
    let own = OwnSockets::new();
    let forwards = forward::Forwards::new(serving::Serving::new(
        connector.clone(),
        tracker.clone(),
        shutdown.clone(),
        config.limits,
        own.clone(),
        relay.clone(),
    ));
    forwards.apply_settings(settings.current()).await;
    {
        let (forwards, mut changes, stop) = (forwards.clone(), settings.subscribe(), shutdown.clone());
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
                let next = changes.borrow_and_update().clone();
                forwards.apply_settings(next).await;
            }
        });
    }
    let to_host_stats = guest_streams::ToHostStats::default();
    let to_host = match &config.guest_listen {
        Some(spec) => {
            guest_streams::start(
                spec,
                settings.subscribe(),
                to_host_stats.clone(),
                config.limits.guest_streams,
                config.guest_vm,
                &own,
                &relay,
                &tracker,
                &shutdown,
            )
            .await
        }
        None => guest_streams::ToHost::off(),
    };
    let host = to_host.advertised.clone();
    if let Some(endpoint) = &config.admin_socket {
        let api = admin::Admin {
            forwards: forwards.clone(),
            settings: settings.clone(),
            link: state.subscribe(),
            host: host.clone(),
            to_host: to_host.clone(),
            to_host_stats,
            connector: connector.clone(),
        };
        if let Err(e) = admin::serve(endpoint, api, &tracker, &shutdown) {
            tracing::warn!("the admin API is off: {e}");
        }
    }
    // Before the link: the agent connects to it once the first desktop ports are advertised.
    #[cfg(target_os = "linux")]
    if let Some(TransportSpec::Unix(path)) = &config.guest_listen {
        match hand_socket_to_directory_owner(path) {
            Ok(Some((uid, gid))) => tracing::debug!("{} handed to uid {uid}, gid {gid}", path.display()),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                "the agent may not be able to open guest→host streams on {}: cannot hand it to its \
                 directory's owner: {e}",
                path.display()
            ),
        }
    }
    // On a worker thread: a future driven by the caller's `block_on` is woken across threads
    // for every control frame (the I/O driver lives on the workers).
    let link = tokio::spawn(link::maintain(connector, forwards, host, state, shutdown.clone()));
    if let Err(e) = link.await {
        tracing::error!("the link to the agent failed: {e}");
    }
    hostnet_net::tasks::drain(&tracker, "hostnet-proxy").await;
}

/// Hands the Unix socket at `path`, which this proxy created for the agent, to the owner of its
/// directory when that is not root: the stand-in's run directory belongs to the agent's
/// unprivileged user, who must be able to connect to the socket the proxy (root) made there.
/// Only as root, and never through a symbolic link (the directory's owner can rename things in
/// it): the socket is opened with `O_PATH | O_NOFOLLOW`, checked to be a socket, and changed
/// through that descriptor. Returns the new owner, if it changed; a socket that is not there
/// (its bind failed, and said so) is nothing to do.
#[cfg(target_os = "linux")]
pub fn hand_socket_to_directory_owner(path: &std::path::Path) -> std::io::Result<Option<(u32, u32)>> {
    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::{Mode, SFlag};
    use std::os::unix::fs::MetadataExt;

    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let owner = std::fs::metadata(dir)?;
    if owner.uid() == 0 {
        return Ok(None);
    }
    let fd = match nix::fcntl::open(path, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
    {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let stat = nix::sys::stat::fstat(&fd)?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(std::io::Error::other(format!("{} is not a socket", path.display())));
    }
    let (uid, gid) = (owner.uid(), owner.gid());
    nix::unistd::fchownat(
        &fd,
        "",
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
        AtFlags::AT_EMPTY_PATH,
    )?;
    Ok(Some((uid, gid)))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Needs root (it creates files of another user); skipped, and says so, without it.
    #[test]
    fn the_agents_socket_goes_to_its_directory_owner_but_never_through_a_link() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (chown)");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        let socket = dir.join("host.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        // A root-owned directory: nothing changes.
        assert_eq!(hand_socket_to_directory_owner(&socket).unwrap(), None);
        assert_eq!(std::fs::metadata(&socket).unwrap().uid(), 0);

        std::os::unix::fs::chown(&dir, Some(4242), Some(4243)).unwrap();
        assert_eq!(hand_socket_to_directory_owner(&socket).unwrap(), Some((4242, 4243)));
        let meta = std::fs::symlink_metadata(&socket).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4242, 4243));

        // The directory's owner swapped the socket for a link to a file of root's.
        let precious = tmp.path().join("precious");
        std::fs::write(&precious, "root's").unwrap();
        std::fs::remove_file(&socket).unwrap();
        std::os::unix::fs::symlink(&precious, &socket).unwrap();
        let err = hand_socket_to_directory_owner(&socket).unwrap_err();
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::metadata(&precious).unwrap().uid(), 0, "the link was not followed");
        // Gone (its bind failed): nothing to do.
        std::fs::remove_file(&socket).unwrap();
        assert_eq!(hand_socket_to_directory_owner(&socket).unwrap(), None);
    }
}

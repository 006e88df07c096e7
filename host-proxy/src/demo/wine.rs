//! `hostnet-proxy demo --windows`: the same stand-in VM, with the desktop half being the
//! **Windows build** of `hostnet-proxy` run under Wine on this Linux machine.
//!
//! Wine's sockets are this machine's sockets, so the Windows proxy's mirrors of guest ports
//! are reachable as `localhost:P` here, and its listener source (`GetExtendedTcpTable`) reads
//! this machine's listeners for guest→host. What Windows lacks is the stand-in's transport
//! (path-based Unix sockets), so the demo bridges it to loopback TCP, the Windows proxy's
//! `tcp:` transport:
//!
//! ```text
//!  Windows proxy ──tcp:127.0.0.2:A──► bridge ──unix agent.sock──► agent (in the namespace)
//!  agent ──unix host.sock──► bridge ──tcp:127.0.0.2:B──► Windows proxy (--listen)
//! ```
//!
//! The bridges listen on 127.0.0.2, not 127.0.0.1: they are the demo's plumbing, not desktop
//! services for the guest to reach (guest→host offers only 127.0.0.1 and ::1 listeners).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::process::Command;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use hostnet_net::accept::next_accepted;

use crate::LinkState;

/// Where the bridges listen: loopback, but not the address guest→host offers.
const BRIDGE_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// The DLL Rust's std needs and Wine 8 lacks; a stand-in must sit beside the `.exe`.
pub const PRNG_SHIM: &str = "bcryptprimitives.dll";

/// How to run the Windows proxy.
#[derive(Debug, Clone)]
pub struct WineOptions {
    /// `hostnet-proxy.exe` (x86_64-pc-windows-gnu).
    pub exe: PathBuf,
    /// Wine's 64-bit loader.
    pub wine: PathBuf,
    /// The Wine prefix (created on first use, ~10 s).
    pub prefix: PathBuf,
    /// The settings file given with `--config` (else the Windows proxy's own default, in the
    /// prefix's `%APPDATA%`).
    pub config: Option<PathBuf>,
    /// The admin endpoint given with `--admin-socket` (on Windows, a named pipe's name, e.g.
    /// `\\.\pipe\hostnet-admin-test`); else the Windows proxy's default pipe.
    pub admin: Option<String>,
}

impl WineOptions {
    /// Fills in what was not given: the `.exe` built beside this program's target directory,
    /// Wine where Debian puts it, a prefix in the user's cache directory.
    pub fn resolve(
        exe: Option<PathBuf>,
        wine: Option<PathBuf>,
        prefix: Option<PathBuf>,
        config: Option<PathBuf>,
        admin: Option<String>,
    ) -> anyhow::Result<Self> {
        let exe = match exe {
            Some(p) => p,
            None => default_exe().context(
                "the Windows build of hostnet-proxy was not found: build it with `./dev.sh demo --windows` \
                 (or cargo build --target x86_64-pc-windows-gnu -p host-proxy) or pass --windows-exe PATH",
            )?,
        };
        if !exe.is_file() {
            bail!("{} not found: build the Windows proxy first or pass --windows-exe PATH", exe.display());
        }
        let shim = exe.with_file_name(PRNG_SHIM);
        if !shim.is_file() {
            bail!(
                "{} is missing: Wine 8 lacks ProcessPrng, which Rust programs need at start; build the stand-in \
                 with `x86_64-w64-mingw32-gcc -shared -Wl,--kill-at -o {} tests/wine/bcryptprimitives.c -ladvapi32` \
                 (./dev.sh demo --windows does it)",
                shim.display(),
                shim.display()
            );
        }
        let wine = match wine {
            Some(w) => w,
            None => find_wine().context(
                "Wine was not found (Debian: apt-get install wine64; ./dev.sh setup installs it) — or pass --wine PATH",
            )?,
        };
        let prefix = prefix
            .or_else(|| dirs::cache_dir().map(|d| d.join("hostnet").join("wine")))
            .context("no cache directory for the Wine prefix: pass --wine-prefix DIR")?;
        Ok(WineOptions { exe, wine, prefix, config, admin })
    }
}

fn default_exe() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let profile_dir = me.parent()?;
    let target_dir = profile_dir.parent()?;
    let exe =
        target_dir.join("x86_64-pc-windows-gnu").join(profile_dir.file_name()?).join("hostnet-proxy.exe");
    exe.is_file().then_some(exe)
}

fn find_wine() -> Option<PathBuf> {
    let debian = PathBuf::from("/usr/lib/wine/wine64");
    if debian.is_file() {
        return Some(debian);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .flat_map(|d| [d.join("wine64"), d.join("wine")])
        .find(|p| p.is_file())
}

/// A Linux path as a Windows program under Wine sees it (Wine maps `/` to drive `Z:`).
pub fn windows_path(p: &Path) -> String {
    format!("Z:{}", p.display()).replace('/', "\\")
}

/// The Wine environment for `opts`: its prefix, quiet.
pub fn wine_command(opts: &WineOptions) -> Command {
    let mut cmd = Command::new(&opts.wine);
    cmd.arg(&opts.exe).env("WINEPREFIX", &opts.prefix).env("WINEDEBUG", "-all").stdin(Stdio::null());
    cmd
}

/// Runs the Windows proxy against the agent behind `agent_socket`, serving the agent's
/// guest→host streams (which the agent opens on `host_socket`, if given), until `shutdown`.
/// The Windows proxy serves its admin API on the pipe `opts.admin` names, else on its own
/// default named pipe.
pub async fn run(
    opts: &WineOptions,
    agent_socket: &Path,
    host_socket: Option<&Path>,
    shutdown: CancellationToken,
    state: watch::Sender<LinkState>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.prefix)
        .with_context(|| format!("cannot create the Wine prefix {}", opts.prefix.display()))?;
    let tracker = TaskTracker::new();
    let to_agent =
        TcpListener::bind((BRIDGE_ADDR, 0)).await.context("cannot listen on 127.0.0.2 for the bridge")?;
    let to_agent_addr = to_agent.local_addr()?;
    let agent_socket = agent_socket.to_owned();
    tracker.spawn(bridge(to_agent, shutdown.clone(), tracker.clone(), move || {
        let path = agent_socket.clone();
        async move { UnixStream::connect(path).await }
    }));
    let mut args = vec!["run".to_owned(), "--transport".to_owned(), format!("tcp:{to_agent_addr}")];
    if let Some(host_socket) = host_socket {
        let listen = free_bridge_port()?;
        let _ = std::fs::remove_file(host_socket);
        let from_agent = UnixListener::bind(host_socket)
            .with_context(|| format!("cannot listen on {}", host_socket.display()))?;
        // The agent, not root, connects to it.
        crate::hand_socket_to_directory_owner(host_socket)
            .with_context(|| format!("cannot hand {} to the agent's user", host_socket.display()))?;
        tracker
            .spawn(bridge(from_agent, shutdown.clone(), tracker.clone(), move || TcpStream::connect(listen)));
        args.extend(["--listen".to_owned(), format!("tcp:{listen}")]);
    }
    let config = match &opts.config {
        Some(config) => config.clone(),
        None => demo_settings(&opts.prefix)?,
    };
    args.extend(["--config".to_owned(), windows_path(&config)]);
    if let Some(admin) = &opts.admin {
        args.extend(["--admin-socket".to_owned(), admin.clone()]);
    }
    info!(exe = %opts.exe.display(), prefix = %opts.prefix.display(), "starting the Windows proxy under Wine");
    let mut cmd = wine_command(opts);
    cmd.args(&args).stdout(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("cannot start {}", opts.wine.display()))?;
    let stdout = child.stdout.take().context("no stdout from the Windows proxy")?;
    // Its `ready` line is ours: the stand-in is up once the Windows proxy forwards.
    tracker.spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            debug!("windows proxy: {line}");
            if line.contains("ready") {
                let _ = state.send(LinkState::Connected { listeners: 0, forwarding: 0 });
            }
        }
    });
    let result = tokio::select! {
        _ = shutdown.cancelled() => {
            super::stop_child(&mut child).await;
            Ok(())
        }
        status = child.wait() => match status {
            Ok(s) => Err(anyhow::anyhow!("the Windows proxy exited ({s}); its log is above")),
            Err(e) => Err(anyhow::anyhow!("waiting for the Windows proxy failed: {e}")),
        },
    };
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await.is_err() {
        warn!("some bridged streams did not close within 2 s");
    }
    if let Some(host_socket) = host_socket {
        let _ = std::fs::remove_file(host_socket);
    }
    result
}

/// What the Windows demo's own settings file (kept in its Wine prefix) starts as.
const DEMO_SETTINGS: &str = "\
# Settings of `hostnet-proxy demo --windows` (the Windows proxy under Wine).
# Wine cannot tell which program owns a socket (every owner is unknown), so the guest→host
# policy, which offers only the desktop user's own listeners, would offer the guest nothing:
# this demo also offers listeners of unknown owners. A real Windows desktop does not need it.
[guest_to_host_policy]
other_users = true
";

/// The Windows demo's settings file when no `--config` was given: in the Wine prefix, made on
/// first use (and then left as the user edits it).
fn demo_settings(prefix: &Path) -> anyhow::Result<PathBuf> {
    let path = prefix.join("hostnet-demo-settings.toml");
    if !path.exists() {
        std::fs::write(&path, DEMO_SETTINGS).with_context(|| format!("cannot write {}", path.display()))?;
        info!(
            path = %path.display(),
            "the Windows demo's settings offer the guest desktop listeners of unknown owners (Wine cannot tell owners)"
        );
    }
    Ok(path)
}

/// A port on [`BRIDGE_ADDR`] free right now, for the Windows proxy's `--listen`.
fn free_bridge_port() -> anyhow::Result<SocketAddr> {
    let probe =
        std::net::TcpListener::bind((BRIDGE_ADDR, 0)).context("cannot find a free port on 127.0.0.2")?;
    Ok(probe.local_addr()?)
}

/// Something that accepts streams, for [`bridge`].
trait Accept {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    async fn accept(&self) -> std::io::Result<TcpStream> {
        let (s, _) = TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

impl Accept for UnixListener {
    type Stream = UnixStream;
    async fn accept(&self) -> std::io::Result<UnixStream> {
        UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

/// Copies each accepted stream to a new one from `connect`, both ways, until either ends.
/// A byte pipe: the protocol inside carries FIN and RST itself.
async fn bridge<L, C, F, S>(listener: L, shutdown: CancellationToken, tracker: TaskTracker, connect: C)
where
    L: Accept + Send + Sync,
    C: Fn() -> F + Send + Sync,
    F: std::future::Future<Output = std::io::Result<S>> + Send + 'static,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    while let Some(mut inbound) = next_accepted(|| listener.accept(), &shutdown, "a bridged stream").await {
        let (far, stop) = (connect(), shutdown.clone());
        tracker.spawn(async move {
            let mut outbound = match far.await {
                Ok(s) => s,
                Err(e) => {
                    debug!("bridge: cannot reach the far side: {e}");
                    let _ = inbound.shutdown().await;
                    return;
                }
            };
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
            }
        });
    }
}

//! The netns stand-in for a VM: a network namespace with its own loopback plays the guest,
//! the agent runs inside it, and the proxy reaches it over a Unix socket (path-based Unix
//! sockets cross namespaces). Everything it creates is removed when it stops.
//!
//! The agent runs as it would in a VM: started as root, it becomes an unprivileged user
//! (`hostnet-agent --user`; `nobody` unless `--agent-user` names another) with only the
//! capabilities it needs. The run directory belongs to that user (mode 0700): the agent creates
//! its socket there and connects to the proxy's; the proxy, root, reaches both.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use hostnet_net::TransportSpec;
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{LinkState, ProxyConfig};

pub mod wine;

/// The namespace name when none is given.
pub const DEFAULT_NETNS: &str = "hostnet-demo";
/// Where named network namespaces live (`ip netns` convention).
const NETNS_DIR: &str = "/run/netns";
/// Where the demo keeps its agent socket: `<RUN_DIR>/<netns>/agent.sock`.
const RUN_DIR: &str = "/run/hostnet";
/// The user the stand-in's agent becomes: present on every Linux system, owns nothing. (The
/// demo adds no user to the developer's machine; a VM image brings its own `hostnet` user.)
pub const DEFAULT_AGENT_USER: &str = "nobody";
/// An agent that ran at least this long before dying is restarted at once.
const AGENT_HEALTHY_AFTER: Duration = Duration::from_secs(10);
const AGENT_RESTART_MAX: Duration = Duration::from_secs(5);

/// Options of `hostnet-proxy demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub netns: String,
    /// Use an existing namespace of that name instead of refusing (and leave it in place).
    pub reuse: bool,
    /// The agent binary; by default the `hostnet-agent` next to this executable, else `$PATH`.
    pub agent: Option<PathBuf>,
    /// Extra arguments for the agent.
    pub agent_args: Vec<String>,
    /// The unprivileged user the agent becomes: a user name of this machine or `UID:GID`.
    pub agent_user: String,
    /// Let processes in the namespace reach this machine's servers as localhost:PORT.
    pub guest_to_host: bool,
    /// The settings file.
    pub settings_path: PathBuf,
    /// The admin endpoint (`None`: no admin API).
    pub admin_socket: Option<crate::admin::Endpoint>,
    /// Connections and UDP flows served at once.
    pub limits: crate::limits::Limits,
    /// Run the Windows build of the proxy under Wine instead of this one (`--windows`).
    pub windows: Option<wine::WineOptions>,
    /// Streams to the agent kept opened ahead of need (`None`: the transport's default, none
    /// for the stand-in's Unix socket).
    pub spare_streams: Option<usize>,
    /// Streams kept for reuse after a clean end, at most (`ProxyConfig::reuse_streams`).
    pub reuse_streams: usize,
}

/// Sets the stand-in up, runs the proxy against it until `shutdown`, tears it down.
pub async fn run(
    opts: DemoOptions,
    shutdown: CancellationToken,
    state: watch::Sender<LinkState>,
) -> anyhow::Result<()> {
    preflight(&opts)?;
    let agent = agent_path(opts.agent.as_deref())?;
    let agent_user = agent_user(&opts.agent_user)?;
    let stand_in = StandIn::create(&opts, agent_user).await?;
    info!(netns = %opts.netns, "network namespace ready; starting the agent inside it");

    let spec = TransportSpec::Unix(stand_in.socket.clone());
    let host_spec = TransportSpec::Unix(stand_in.run_dir.join("host.sock"));
    let mut agent_cmd = vec![agent.into_os_string().into_string().unwrap_or_default()];
    agent_cmd.extend(["--transport".to_owned(), spec.to_string()]);
    // By number: the agent reads /etc/passwd only, this machine's user may come from elsewhere.
    agent_cmd.extend(["--user".to_owned(), format!("{}:{}", agent_user.0, agent_user.1)]);
    if opts.guest_to_host {
        agent_cmd.extend(["--host-transport".to_owned(), host_spec.to_string()]);
    }
    agent_cmd.extend(opts.agent_args.iter().cloned());
    let supervisor = tokio::spawn(supervise_agent(opts.netns.clone(), agent_cmd, shutdown.clone()));

    let result = match &opts.windows {
        None => {
            let mut config = ProxyConfig::new(&spec);
            config.guest_listen = opts.guest_to_host.then_some(host_spec);
            config.settings_path = opts.settings_path.clone();
            config.admin_socket = opts.admin_socket.clone();
            config.limits = opts.limits;
            config.spare_streams = opts.spare_streams.unwrap_or(config.spare_streams);
            config.reuse_streams = opts.reuse_streams;
            crate::run(config, shutdown.clone(), state).await;
            Ok(())
        }
        Some(win) => {
            let host_socket = stand_in.run_dir.join("host.sock");
            let host_socket = opts.guest_to_host.then_some(host_socket.as_path());
            wine::run(win, &stand_in.socket, host_socket, shutdown.clone(), state).await
        }
    };
    shutdown.cancel();
    if let Err(e) = supervisor.await {
        warn!("agent supervisor failed: {e}");
    }
    stand_in.remove().await;
    result
}

/// Checks that can fail before anything is created.
fn preflight(opts: &DemoOptions) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "hostnet-proxy demo needs root: it creates a network namespace and starts the agent \
             inside it (CAP_SYS_ADMIN and CAP_NET_ADMIN). Run it with sudo: sudo hostnet-proxy demo"
        );
    }
    let name = &opts.netns;
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        bail!("{name:?} is not a usable namespace name: use up to 64 letters, digits, '-', '_' or '.'");
    }
    if std::process::Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        bail!("the demo needs the `ip` command from iproute2 (Debian: apt-get install iproute2)");
    }
    Ok(())
}

fn agent_path(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        if !p.is_file() {
            bail!("agent binary {} not found", p.display());
        }
        return Ok(p.to_owned());
    }
    let beside = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("hostnet-agent")));
    if let Some(p) = beside.filter(|p| p.is_file()) {
        return Ok(p);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|d| d.join("hostnet-agent"))
        .find(|p| p.is_file());
    on_path.context("hostnet-agent not found next to hostnet-proxy or on $PATH; build it (cargo build) or pass --agent PATH")
}

/// `--agent-user`: a user name of this machine (with its primary group) or `UID:GID`, never
/// root. Returns uid and gid.
fn agent_user(given: &str) -> anyhow::Result<(u32, u32)> {
    let (uid, gid) = match given.split_once(':') {
        Some((uid, gid)) => match (uid.parse::<u32>(), gid.parse::<u32>()) {
            (Ok(uid), Ok(gid)) => (uid, gid),
            _ => {
                bail!("--agent-user {given:?}: give a user name (e.g. nobody) or UID:GID (e.g. 65534:65534)")
            }
        },
        None => match nix::unistd::User::from_name(given) {
            Ok(Some(user)) => (user.uid.as_raw(), user.gid.as_raw()),
            Ok(None) => bail!(
                "--agent-user {given:?}: no such user on this machine; name an existing unprivileged user \
                 (the default, {DEFAULT_AGENT_USER}, exists everywhere) or give UID:GID"
            ),
            Err(e) => bail!("--agent-user {given:?}: cannot look the user up: {e}"),
        },
    };
    if uid == 0 || gid == 0 {
        bail!(
            "--agent-user {given:?} is root (uid {uid}, gid {gid}): the agent runs as an unprivileged user"
        );
    }
    Ok((uid, gid))
}

/// The namespace and run directory the demo made, and whether it owns the namespace.
struct StandIn {
    netns: String,
    created_netns: bool,
    run_dir: PathBuf,
    socket: PathBuf,
    /// Owner of the run directory: the agent's uid and gid.
    agent_user: (u32, u32),
}

impl StandIn {
    async fn create(opts: &DemoOptions, agent_user: (u32, u32)) -> anyhow::Result<Self> {
        let exists = Path::new(NETNS_DIR).join(&opts.netns).exists();
        if exists && !opts.reuse {
            bail!(
                "network namespace {0:?} already exists (a demo may still be running, or one did not \
                 stop cleanly). Remove it with `sudo ip netns del {0}`, pick another with --netns, or \
                 pass --reuse to use it as it is",
                opts.netns
            );
        }
        if !exists {
            ip(&["netns", "add", &opts.netns]).await?;
        }
        let mut stand_in = StandIn {
            netns: opts.netns.clone(),
            created_netns: !exists,
            run_dir: Path::new(RUN_DIR).join(&opts.netns),
            socket: PathBuf::new(),
            agent_user,
        };
        if let Err(e) = stand_in.finish_setup().await {
            stand_in.remove().await;
            return Err(e);
        }
        Ok(stand_in)
    }

    async fn finish_setup(&mut self) -> anyhow::Result<()> {
        // A new namespace has its loopback down.
        ip(&["-n", &self.netns, "link", "set", "lo", "up"]).await?;
        tokio::fs::create_dir_all(&self.run_dir)
            .await
            .with_context(|| format!("cannot create {}", self.run_dir.display()))?;
        // Private to the agent's user (and root): the agent makes its socket here, the proxy
        // hands it the one it makes ([`crate::hand_socket_to_directory_owner`]).
        let (uid, gid) = self.agent_user;
        std::os::unix::fs::lchown(&self.run_dir, Some(uid), Some(gid))
            .with_context(|| format!("cannot hand {} to the agent's user", self.run_dir.display()))?;
        tokio::fs::set_permissions(&self.run_dir, std::fs::Permissions::from_mode(0o700)).await?;
        self.socket = self.run_dir.join("agent.sock");
        Ok(())
    }

    async fn remove(self) {
        let _ = tokio::fs::remove_dir_all(&self.run_dir).await;
        if self.created_netns {
            match ip(&["netns", "del", &self.netns]).await {
                Ok(()) => info!(netns = %self.netns, "network namespace removed"),
                Err(e) => warn!("{e:#}"),
            }
        }
    }
}

async fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().await.context("running `ip`")?;
    if !out.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs the agent inside the namespace and restarts it if it dies, as a guest's init would.
async fn supervise_agent(netns: String, agent_cmd: Vec<String>, shutdown: CancellationToken) {
    let mut delay = Duration::from_millis(100);
    loop {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &netns]).args(&agent_cmd).stdin(Stdio::null()).kill_on_drop(true);
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                warn!("cannot start the agent: {e}");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(AGENT_RESTART_MAX) => continue,
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => {
                stop_child(&mut child).await;
                return;
            }
            status = child.wait() => {
                if started.elapsed() >= AGENT_HEALTHY_AFTER {
                    delay = Duration::from_millis(100);
                }
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                warn!("the agent exited ({status}); restarting it in {delay:?}");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(AGENT_RESTART_MAX);
    }
}

/// SIGTERM, then SIGKILL if it lingers.
pub(crate) async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(3), child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_user_is_a_name_or_uid_gid_never_root() {
        assert_eq!(agent_user("4242:4243").unwrap(), (4242, 4243));
        let nobody = agent_user(DEFAULT_AGENT_USER).unwrap();
        assert!(nobody.0 != 0 && nobody.1 != 0, "{nobody:?}");
        for root in ["root", "0:0", "0:5", "5:0"] {
            let err = agent_user(root).unwrap_err().to_string();
            assert!(err.contains("is root"), "{root}: {err}");
        }
        for bad in ["a:b", "1:", ":1", "-1:1"] {
            let err = agent_user(bad).unwrap_err().to_string();
            assert!(err.contains("UID:GID"), "{bad}: {err}");
        }
        let err = agent_user("no-such-hostnet-user").unwrap_err().to_string();
        assert!(err.contains("no such user"), "{err}");
    }
}

//! `hostnet-proxy`: the desktop side of hostnet.

#![allow(clippy::print_stdout)] // The `ready` line is this program's interface.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use host_proxy::admin::{self, Endpoint};
#[cfg(target_os = "linux")]
use host_proxy::demo::{self, DemoOptions};
use host_proxy::settings::{self, Settings, SettingsFile};
use host_proxy::{LinkState, ProxyConfig};
use hostnet_admin::{ClientError, Request, Response, Status};
use hostnet_net::{TransportSpec, cli};
use tokio::sync::watch;

/// hostnet's proxy on the desktop.
///
/// Mirrors every port a container listens on inside the Linux VM as the same port on this
/// machine's loopback (127.0.0.1 and ::1), so `nc localhost 8000` reaches a container listening
/// on 8000. Ports appear when the container starts listening and close when it stops.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Args {
    /// The admin socket: where `run`/`demo` serve the admin API and `status`/`enable`/`disable`
    /// find it; on Windows a pipe name [default: $XDG_RUNTIME_DIR/hostnet/admin.sock on Linux
    /// (/run/hostnet/admin/admin.sock for root), ~/Library/Application Support/hostnet/run/admin.sock
    /// on macOS, \\.\pipe\hostnet-admin-<your SID> on Windows; see docs/admin-api.md]
    #[arg(long, global = true, value_name = "PATH", env = "HOSTNET_ADMIN_SOCKET")]
    admin_socket: Option<OsString>,

    /// The settings file [default: ~/.config/hostnet/settings.toml, or the platform's config
    /// directory]
    #[arg(long, global = true, value_name = "PATH", env = "HOSTNET_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Forward ports from a VM whose hostnet-agent is reachable over TRANSPORT.
    #[command(
        after_help = "Examples:\n  hostnet-proxy run --transport hybrid:/run/vm/vm.vsock:1024   # Firecracker, Cloud Hypervisor, vhost-device-vsock\n  hostnet-proxy run --transport vsock:3:1024                      # Linux host with vhost-vsock, guest CID 3\n  hostnet-proxy run --transport unix:/run/hostnet/agent.sock\n\nPrints a line containing `ready` once forwarding is live. Logging: RUST_LOG=debug."
    )]
    Run {
        /// How to reach the agent: hybrid:PATH:PORT, vsock:CID:PORT, unix:PATH, tcp:ADDR:PORT or
        /// hyperv:VMID:PORT (Windows).
        #[arg(long, env = "HOSTNET_TRANSPORT")]
        transport: TransportSpec,
        /// Where the agent connects for guest→host (containers reaching this machine's servers
        /// as localhost:PORT): for hybrid vsock, unix:<VM socket>_<PORT>; vsock:any:1025 with
        /// vhost-vsock; hyperv:VMID:1025 (Windows). Off when not given.
        #[arg(long, value_name = "SPEC")]
        listen: Option<TransportSpec>,
        /// Allow --listen tcp: on an address beyond loopback (other machines could then speak
        /// the guest→host protocol to this proxy).
        #[arg(long)]
        listen_beyond_loopback: bool,
        #[command(flatten)]
        spares: SpareArgs,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Stand up a network namespace as a stand-in VM, run the agent in it and forward its ports
    /// (needs root). Ctrl-C removes everything it created.
    #[command(
        after_help = "Try it, in three terminals:\n  sudo hostnet-proxy demo\n  sudo ip netns exec hostnet-demo nc -lkv 0.0.0.0 8000   # a \"container\" listens\n  nc localhost 8000                                       # the \"desktop\" connects"
    )]
    #[cfg(target_os = "linux")]
    Demo {
        /// Name of the network namespace to create.
        #[arg(long, default_value = demo::DEFAULT_NETNS)]
        netns: String,
        /// Use the namespace if it already exists (and leave it in place afterwards).
        #[arg(long)]
        reuse: bool,
        /// The hostnet-agent binary (default: next to this program, else on $PATH).
        #[arg(long, value_name = "PATH")]
        agent: Option<PathBuf>,
        /// The unprivileged user the agent becomes once started: a user name of this machine or
        /// UID:GID.
        #[arg(long, value_name = "USER", default_value = demo::DEFAULT_AGENT_USER)]
        agent_user: String,
        /// Milliseconds between the agent's reads of the listener table.
        #[arg(long, value_name = "MS")]
        poll_interval_ms: Option<u64>,
        /// Do not let the namespace reach this machine's servers through localhost.
        #[arg(long)]
        no_guest_to_host: bool,
        /// Relay bulk transfers through a buffer in the proxy and the agent even where
        /// splice(2) could move them: the path every byte takes in a real VM (vsock) and on
        /// macOS and Windows, measured here.
        #[arg(long)]
        no_splice: bool,
        /// Run the desktop half as the Windows build of hostnet-proxy under Wine (its admin API
        /// is then a named pipe: `wine64 hostnet-proxy.exe status`).
        #[arg(long)]
        windows: bool,
        /// With --windows: the Windows proxy [default: target/x86_64-pc-windows-gnu/<profile>/hostnet-proxy.exe beside this program's target directory].
        #[arg(long, value_name = "PATH", requires = "windows")]
        windows_exe: Option<PathBuf>,
        /// With --windows: Wine's loader [default: /usr/lib/wine/wine64, else wine64 or wine on $PATH].
        #[arg(long, value_name = "PATH", requires = "windows")]
        wine: Option<PathBuf>,
        /// With --windows: the Wine prefix [default: hostnet/wine in the user's cache directory].
        #[arg(long, value_name = "DIR", requires = "windows", env = "WINEPREFIX")]
        wine_prefix: Option<PathBuf>,
        #[command(flatten)]
        spares: SpareArgs,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Show whether host networking is on and every forward with its state and traffic.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Turn host networking on (live, and saved in the settings file).
    Enable,
    /// Turn host networking off: closes every forwarded port and guest-side redirect (live, and
    /// saved in the settings file).
    Disable,
}

/// Streams to the agent opened ahead of need (`hostnet_net::transport::spare`).
#[derive(Debug, clap::Args)]
struct SpareArgs {
    /// Streams to the agent kept opened ahead of need, so a new connection does not wait for
    /// its own to be set up [default: 4 for vsock:, hybrid: and hyperv:, where that is a round
    /// trip through the VM; 0 for unix: and tcp: — give 4 for a VMM's unix: socket, e.g.
    /// vfkit's].
    #[arg(long, value_name = "N", env = "HOSTNET_SPARE_STREAMS", value_parser = clap::value_parser!(u16).range(0..=64))]
    spare_streams: Option<u16>,
    /// Streams to the agent whose connection ended cleanly kept for the next connections, at
    /// most (0: each connection's stream is closed with it; `demo` gives its agent the same for
    /// guest→host).
    #[arg(long, value_name = "N", env = "HOSTNET_REUSE_STREAMS", default_value_t = hostnet_net::transport::spare::REUSED_STREAMS as u16, value_parser = clap::value_parser!(u16).range(0..=64))]
    reuse_streams: u16,
}

impl SpareArgs {
    /// The count asked for, if any (else the transport's default).
    fn count(&self) -> Option<usize> {
        self.spare_streams.map(usize::from)
    }
}

/// How much the proxy serves at once; past a limit it refuses (and counts it in `status`).
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Relayed TCP connections open at once (all ports together); more are reset at once.
    #[arg(long, value_name = "N", default_value_t = host_proxy::limits::MAX_CONNECTIONS as u32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: u32,
    /// UDP flows (desktop client addresses) open at once; datagrams of more are dropped.
    #[arg(long, value_name = "N", default_value_t = host_proxy::limits::MAX_UDP_FLOWS as u32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_udp_flows: u32,
    /// Guest→host streams (connections, UDP flows, openings) served at once; more are closed.
    #[arg(long, value_name = "N", default_value_t = host_proxy::limits::MAX_GUEST_STREAMS as u32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_guest_streams: u32,
}

impl LimitArgs {
    fn limits(&self) -> host_proxy::limits::Limits {
        host_proxy::limits::Limits {
            connections: self.max_connections as usize,
            udp_flows: self.max_udp_flows as usize,
            guest_streams: self.max_guest_streams as usize,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    cli::init_process();
    let args = Args::parse();
    if matches!(args.command, Cmd::Status { .. } | Cmd::Enable | Cmd::Disable) {
        // A one-shot command piped into `head` ends quietly when the reader goes away, as
        // other command-line tools do, instead of panicking on a closed stdout.
        // SAFETY: restoring a signal's default disposition before any other thread uses it.
        #[cfg(unix)]
        let _ = unsafe {
            nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl)
        };
    }
    let shutdown = cli::cancel_on_termination();
    let (state_tx, state_rx) = watch::channel(LinkState::Connecting);
    #[cfg(target_os = "linux")]
    let explicit_admin = args.admin_socket.clone();
    let endpoint = match args.admin_socket {
        Some(value) => Ok(Endpoint::from_user(value)),
        None => admin::default_endpoint(),
    };
    let Some(settings_path) = args.config.clone().or_else(settings::default_path) else {
        eprintln!(
            "error: this system names no configuration directory (is HOME set?) for the settings file, \
             and hostnet does not fall back to a shared one such as /tmp: pass --config PATH (HOSTNET_CONFIG)"
        );
        return ExitCode::FAILURE;
    };
    // `run` and `demo` work without an admin API (said in the log); the commands need one.
    let admin_socket = match (&endpoint, &args.command) {
        #[cfg(target_os = "linux")]
        (Err(e), Cmd::Demo { .. }) => {
            tracing::warn!("the admin API is off: {e}");
            None
        }
        (Err(e), Cmd::Run { .. }) => {
            tracing::warn!("the admin API is off: {e}");
            None
        }
        _ => endpoint.as_ref().ok().cloned(),
    };

    let result = match args.command {
        Cmd::Status { json } => match endpoint {
            Ok(endpoint) => cli_status(&endpoint, json).await,
            Err(e) => Err(e.into()),
        },
        Cmd::Enable | Cmd::Disable => match endpoint {
            Ok(endpoint) => {
                cli_set_enabled(&endpoint, &settings_path, matches!(args.command, Cmd::Enable)).await
            }
            Err(e) => Err(e.into()),
        },
        Cmd::Run { transport, listen, listen_beyond_loopback, spares, limits } => {
            if let Some(Err(e)) = listen
                .as_ref()
                .map(|spec| host_proxy::guest_streams::check_listen(spec, listen_beyond_loopback))
            {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            tokio::spawn(announce_ready(
                state_rx,
                format!("hostnet-proxy ready: forwarding ports from the agent at {transport}"),
            ));
            let mut config = ProxyConfig::new(&transport);
            config.guest_listen = listen;
            config.settings_path = settings_path;
            config.admin_socket = admin_socket;
            config.limits = limits.limits();
            config.spare_streams = spares.count().unwrap_or(config.spare_streams);
            config.reuse_streams = usize::from(spares.reuse_streams);
            host_proxy::run(config, shutdown, state_tx).await;
            Ok(())
        }
        #[cfg(target_os = "linux")]
        Cmd::Demo {
            netns,
            reuse,
            agent,
            agent_user,
            poll_interval_ms,
            no_guest_to_host,
            no_splice,
            windows,
            windows_exe,
            wine,
            wine_prefix,
            spares,
            limits,
        } => {
            let windows = match windows {
                true => match demo::wine::WineOptions::resolve(
                    windows_exe,
                    wine,
                    wine_prefix,
                    args.config.clone(),
                    explicit_admin.clone().map(|a| a.to_string_lossy().into_owned()),
                ) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        return ExitCode::FAILURE;
                    }
                },
                false => None,
            };
            let mut agent_args = poll_interval_ms
                .map(|ms| vec!["--poll-interval-ms".to_owned(), ms.to_string()])
                .unwrap_or_default();
            if no_splice {
                hostnet_net::relay::tcp::set_splice(false);
                agent_args.push("--no-splice".to_owned());
            }
            // Streams reused on both sides alike: the agent's guest→host ones too.
            agent_args.extend(["--reuse-streams".to_owned(), spares.reuse_streams.to_string()]);
            tokio::spawn(announce_ready(state_rx, demo_banner(&netns)));
            let guest_to_host = !no_guest_to_host;
            let opts = DemoOptions {
                netns,
                reuse,
                agent,
                agent_args,
                agent_user,
                guest_to_host,
                settings_path,
                admin_socket,
                limits: limits.limits(),
                windows,
                spare_streams: spares.count(),
                reuse_streams: usize::from(spares.reuse_streams),
            };
            demo::run(opts, shutdown, state_tx).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(target_os = "linux")]
fn demo_banner(netns: &str) -> String {
    format!(
        "hostnet demo ready: network namespace {netns} stands in for the VM.\n  \
         a \"container\" listens:  sudo ip netns exec {netns} nc -lkv 0.0.0.0 8000\n  \
         the \"desktop\" connects: nc localhost 8000\n\
         Ports opened inside {netns} appear on this machine's 127.0.0.1 and ::1. Ctrl-C stops and cleans up."
    )
}

/// Prints `message` (whose first line contains `ready`) the first time the agent's snapshot
/// has been applied.
async fn announce_ready(mut state: watch::Receiver<LinkState>, message: String) {
    if state.wait_for(|s| matches!(s, LinkState::Connected { .. })).await.is_ok() {
        // Whoever started us may have stopped reading: a closed stdout is not our failure.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{message}").and_then(|()| out.flush()).is_err() {
            tracing::info!("ready (stdout is closed)");
        }
    }
}

/// A sentence for a request that got no answer: where to look, what to do.
fn no_answer(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::NotRunning { .. } => anyhow::anyhow!(
            "{e}; start it with `hostnet-proxy run` or `hostnet-proxy demo`, or pass --admin-socket"
        ),
        ClientError::TimedOut { .. } => anyhow::anyhow!("{e}"),
        e => e.into(),
    }
}

/// The status in an answer, or the proxy's refusal as an error.
fn status_of(answer: Response, what: &str) -> anyhow::Result<Status> {
    match answer {
        Response::Status(s) => Ok(*s),
        Response::Error(e) => anyhow::bail!("the proxy refused the {what} request: {}", e.error),
        Response::Settings { .. } => anyhow::bail!("the proxy answered the {what} request with its settings"),
    }
}

async fn cli_status(endpoint: &Endpoint, json: bool) -> anyhow::Result<()> {
    let answer = hostnet_admin::request(endpoint, &Request::Status {}).await.map_err(no_answer)?;
    let s = status_of(answer, "status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    print!("{}", status_table(&s));
    Ok(())
}

/// `status` for people: the switch, the agent, errors, then one row per forward.
fn status_table(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let agent = match &s.agent_error {
        Some(e) => format!("{} ({e})", s.agent.as_str()),
        None => s.agent.as_str().to_owned(),
    };
    let _ = writeln!(out, "host networking: {}    agent: {agent}", if s.enabled { "ON" } else { "OFF" });
    let _ = writeln!(out, "settings: {}", s.settings_path.display());
    for e in &s.errors {
        let _ = writeln!(out, "error: {e}");
    }
    for l in &s.limits {
        let _ = writeln!(out, "limit: {l}");
    }
    if let Some(p) = &s.streams {
        let _ = writeln!(out, "{p}");
    }
    if s.forwards.is_empty() {
        let _ = writeln!(out, "no forwards");
        return out;
    }
    let _ = writeln!(
        out,
        "\n{:<5} {:<9} {:>6} {:>6}  {:<11} {:>9} {:>11} {:>11}  REASON",
        "PROTO", "DIRECTION", "GUEST", "HOST", "STATE", "CONNS", "TO GUEST", "FROM GUEST"
    );
    for f in &s.forwards {
        let _ = writeln!(
            out,
            "{:<5} {:<9} {:>6} {:>6}  {:<11} {:>9} {:>11} {:>11}  {}",
            f.proto.to_string(),
            f.direction.words(),
            f.guest_port,
            f.host_port,
            f.state.as_str(),
            format!("{}/{}", f.connections_active, f.connections_total),
            human_bytes(f.bytes_to_guest),
            human_bytes(f.bytes_from_guest),
            f.reason.as_deref().unwrap_or(""),
        );
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS.get(unit).unwrap_or(&"")) }
}

async fn cli_set_enabled(
    endpoint: &Endpoint,
    settings_path: &std::path::Path,
    enabled: bool,
) -> anyhow::Result<()> {
    let word = if enabled { "enabled" } else { "disabled" };
    match hostnet_admin::request(endpoint, &Request::SetEnabled { enabled }).await {
        Ok(Response::Error(e)) => anyhow::bail!("{}", e.error),
        Ok(answer) => {
            status_of(answer, "set_enabled")?;
            println!("host networking {word}");
            Ok(())
        }
        Err(e) if e.is_not_running() => {
            // Not running: change the file, the proxy reads it when it starts.
            let mut s = Settings::load(settings_path)?;
            s.enabled = enabled;
            settings::save(settings_path, &s)?;
            println!(
                "host networking {word} in {} (hostnet-proxy is not running; it applies when it starts)",
                settings_path.display()
            );
            Ok(())
        }
        Err(e) => Err(no_answer(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostnet_admin::{AgentLink, Direction, ForwardState, ForwardStatus};

    #[test]
    fn the_status_table_lines_up_typed_fields() {
        let forward = |proto, direction, state, reason: Option<&str>| ForwardStatus {
            proto,
            direction,
            guest_port: 8000,
            host_port: 8080,
            state,
            reason: reason.map(str::to_owned),
            host_addresses: vec![],
            connections_active: 2,
            connections_total: 7,
            connections_refused: 0,
            bytes_to_guest: 3 * 1024 * 1024,
            bytes_from_guest: 12,
        };
        let s = Status {
            enabled: false,
            agent: AgentLink::Disconnected,
            agent_error: Some("connection refused".into()),
            settings_path: "/s.toml".into(),
            errors: vec!["bad remap".into()],
            forwards: vec![
                forward(hostnet_protocol::Proto::Tcp, Direction::ToGuest, ForwardState::Forwarding, None),
                forward(
                    hostnet_protocol::Proto::Udp,
                    Direction::ToHost,
                    ForwardState::Conflict,
                    Some("in use"),
                ),
            ],
            limits: vec!["2 guest port(s) not forwarded over the limits".into()],
            streams: Some(hostnet_admin::StreamPool { held: 3, limit: 8, taken: 640, kept: 400, dropped: 2 }),
        };
        let table = status_table(&s);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "host networking: OFF    agent: disconnected (connection refused)");
        assert_eq!(lines[2], "error: bad remap");
        assert_eq!(lines[3], "limit: 2 guest port(s) not forwarded over the limits");
        assert_eq!(
            lines[4],
            "streams to the agent: 3 held for connections to come (at most 8); 640 connection(s) took one, 400 kept after a clean end, 2 closed unused"
        );
        assert!(lines[6].starts_with("PROTO DIRECTION  GUEST   HOST  STATE"), "{table}");
        assert_eq!(
            lines[7],
            "tcp   to guest    8000   8080  forwarding        2/7     3.0 MiB        12 B  "
        );
        assert!(
            lines[8].starts_with("udp   to host     8000   8080  conflict ")
                && lines[8].ends_with("  in use")
        );
    }
}

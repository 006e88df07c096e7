//! `hostnet-proxy`: the desktop side of hostnet.

#![allow(clippy::print_stdout)] // The `ready` line is this program's interface.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use host_proxy::admin::{self, Request};
#[cfg(target_os = "linux")]
use host_proxy::demo::{self, DemoOptions};
use host_proxy::forward;
use host_proxy::settings::{self, Settings};
use host_proxy::{LinkState, ProxyConfig};
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
    /// find it [default: /run/hostnet/admin.sock for root, else $XDG_RUNTIME_DIR/hostnet/admin.sock]
    #[arg(long, global = true, value_name = "PATH", env = "HOSTNET_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,

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

/// How much the proxy serves at once; past a limit it refuses (and counts it in `status`).
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Relayed TCP connections open at once (all ports together); more are reset at once.
    #[arg(long, value_name = "N", default_value_t = forward::MAX_CONNECTIONS as u32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: u32,
    /// UDP flows (desktop client addresses) open at once; datagrams of more are dropped.
    #[arg(long, value_name = "N", default_value_t = host_proxy::udp::MAX_UDP_FLOWS as u32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_udp_flows: u32,
}

impl LimitArgs {
    fn limits(&self) -> forward::Limits {
        forward::Limits { connections: self.max_connections as usize, udp_flows: self.max_udp_flows as usize }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    cli::init_logging();
    cli::tune_allocator();
    match cli::raise_fd_limit() {
        Ok(n) => tracing::debug!("open-file limit: {n}"),
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
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
    let explicit_admin = args.admin_socket.as_ref().map(|p| p.display().to_string());
    let admin_socket = args.admin_socket.unwrap_or_else(admin::default_socket_path);
    let settings_path = args.config.clone().unwrap_or_else(settings::default_path);

    let result = match args.command {
        Cmd::Status { json } => cli_status(&admin_socket, json).await,
        Cmd::Enable => cli_set_enabled(&admin_socket, &settings_path, true).await,
        Cmd::Disable => cli_set_enabled(&admin_socket, &settings_path, false).await,
        Cmd::Run { transport, listen, limits } => {
            tokio::spawn(announce_ready(
                state_rx,
                format!("hostnet-proxy ready: forwarding ports from the agent at {transport}"),
            ));
            let mut config = ProxyConfig::new(&transport);
            config.guest_listen = listen;
            config.settings_path = settings_path;
            config.admin_socket = Some(admin_socket);
            config.limits = limits.limits();
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
            windows,
            windows_exe,
            wine,
            wine_prefix,
            limits,
        } => {
            let windows = match windows {
                true => match demo::wine::WineOptions::resolve(
                    windows_exe,
                    wine,
                    wine_prefix,
                    args.config.clone(),
                    explicit_admin.clone(),
                ) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        return ExitCode::FAILURE;
                    }
                },
                false => None,
            };
            let agent_args = poll_interval_ms
                .map(|ms| vec!["--poll-interval-ms".to_owned(), ms.to_string()])
                .unwrap_or_default();
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
                admin_socket: Some(admin_socket),
                limits: limits.limits(),
                windows,
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

/// A sentence for "the proxy is not running", from a failed connect to its admin socket — or,
/// if it is running but did not answer in time (busy or stuck), for that.
fn not_running(path: &std::path::Path, e: &std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::TimedOut {
        return anyhow::anyhow!("hostnet-proxy did not answer on {}: {e}; try again", path.display());
    }
    anyhow::anyhow!(
        "hostnet-proxy is not running (no admin API at {}: {e}); start it with `hostnet-proxy run` or `hostnet-proxy demo`, or pass --admin-socket",
        path.display()
    )
}

async fn cli_status(path: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let answer = admin::request(path, &Request::Status {}).await.map_err(|e| not_running(path, &e))?;
    if answer.get("ok").and_then(|v| v.as_bool()) != Some(true) {
        let error = answer.get("error").and_then(|e| e.as_str()).unwrap_or("no reason given");
        anyhow::bail!("the proxy refused the status request: {error}");
    }
    let status = answer.get("status").cloned().unwrap_or_default();
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let s: admin::Status = serde_json::from_value(status)?;
    let agent = match &s.agent_error {
        Some(e) => format!("{} ({e})", s.agent),
        None => s.agent.clone(),
    };
    println!("host networking: {}    agent: {agent}", if s.enabled { "ON" } else { "OFF" });
    println!("settings: {}", s.settings_path.display());
    for e in &s.errors {
        println!("error: {e}");
    }
    if s.forwards.is_empty() {
        println!("no forwards");
        return Ok(());
    }
    println!(
        "\n{:<5} {:<9} {:>6} {:>6}  {:<11} {:>9} {:>11} {:>11}  REASON",
        "PROTO", "DIRECTION", "GUEST", "HOST", "STATE", "CONNS", "TO GUEST", "FROM GUEST"
    );
    for f in &s.forwards {
        let get = |k: &str| f.get(k).cloned().unwrap_or_default();
        let num = |k: &str| get(k).as_u64().unwrap_or(0);
        let text = |k: &str| get(k).as_str().unwrap_or("").to_owned();
        println!(
            "{:<5} {:<9} {:>6} {:>6}  {:<11} {:>9} {:>11} {:>11}  {}",
            text("proto"),
            text("direction").replace('_', " "),
            num("guest_port"),
            num("host_port"),
            text("state"),
            format!("{}/{}", num("connections_active"), num("connections_total")),
            human_bytes(num("bytes_to_guest")),
            human_bytes(num("bytes_from_guest")),
            text("reason"),
        );
    }
    Ok(())
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
    admin_socket: &std::path::Path,
    settings_path: &std::path::Path,
    enabled: bool,
) -> anyhow::Result<()> {
    let word = if enabled { "enabled" } else { "disabled" };
    match admin::request(admin_socket, &Request::SetEnabled { enabled }).await {
        Ok(answer) if answer.get("ok").and_then(|v| v.as_bool()) == Some(true) => {
            println!("host networking {word}");
            Ok(())
        }
        Ok(answer) => {
            anyhow::bail!("{}", answer.get("error").and_then(|e| e.as_str()).unwrap_or("the proxy refused"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(not_running(admin_socket, &e)),
        Err(_) => {
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
    }
}

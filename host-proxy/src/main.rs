//! `hostnet-proxy`: the desktop side of hostnet.

#![allow(clippy::print_stdout)] // The `ready` line is this program's interface.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use host_proxy::demo::{self, DemoOptions};
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
        /// How to reach the agent: hybrid:PATH:PORT, vsock:CID:PORT, unix:PATH or tcp:ADDR:PORT.
        #[arg(long, env = "HOSTNET_TRANSPORT")]
        transport: TransportSpec,
        /// Where the agent connects for guest→host (containers reaching this machine's servers
        /// as localhost:PORT): for hybrid vsock, unix:<VM socket>_<PORT>. Off when not given.
        #[arg(long, value_name = "SPEC")]
        listen: Option<TransportSpec>,
    },
    /// Stand up a network namespace as a stand-in VM, run the agent in it and forward its ports
    /// (needs root). Ctrl-C removes everything it created.
    #[command(
        after_help = "Try it, in three terminals:\n  sudo hostnet-proxy demo\n  sudo ip netns exec hostnet-demo nc -lkv 0.0.0.0 8000   # a \"container\" listens\n  nc localhost 8000                                       # the \"desktop\" connects"
    )]
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
        /// Milliseconds between the agent's reads of the listener table.
        #[arg(long, value_name = "MS")]
        poll_interval_ms: Option<u64>,
        /// Do not let the namespace reach this machine's servers through localhost.
        #[arg(long)]
        no_guest_to_host: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    cli::init_logging();
    let args = Args::parse();
    let shutdown = cli::cancel_on_termination();
    let (state_tx, state_rx) = watch::channel(LinkState::Connecting);

    let result = match args.command {
        Cmd::Run { transport, listen } => {
            tokio::spawn(announce_ready(
                state_rx,
                format!("hostnet-proxy ready: forwarding ports from the agent at {transport}"),
            ));
            let mut config = ProxyConfig::new(&transport);
            config.guest_listen = listen;
            host_proxy::run(config, shutdown, state_tx).await;
            Ok(())
        }
        Cmd::Demo { netns, reuse, agent, poll_interval_ms, no_guest_to_host } => {
            let agent_args = poll_interval_ms
                .map(|ms| vec!["--poll-interval-ms".to_owned(), ms.to_string()])
                .unwrap_or_default();
            tokio::spawn(announce_ready(state_rx, demo_banner(&netns)));
            let guest_to_host = !no_guest_to_host;
            demo::run(DemoOptions { netns, reuse, agent, agent_args, guest_to_host }, shutdown, state_tx)
                .await
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
        println!("{message}");
    }
}

//! `hostnet-agent`: the VM side of hostnet.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use guest_agent::{AgentConfig, Discovery, privileges, run_with};
use hostnet_net::{TransportSpec, cli};

/// hostnet's agent inside the Linux VM.
///
/// Watches the VM's listening TCP sockets (wildcard and loopback binds, IPv4 and IPv6) and
/// advertises them to hostnet-proxy on the desktop, which opens the same ports on the host's
/// loopback. Each connection the proxy relays is connected here to the guest server.
///
/// Usually started by the VM's init system; `hostnet-proxy demo` starts it inside a network
/// namespace instead.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  hostnet-agent --transport vsock:any:1024     # in a real VM\n  hostnet-agent --transport unix:/run/hostnet/agent.sock\n\nLogging: RUST_LOG=debug hostnet-agent …"
)]
struct Args {
    /// Where to wait for the proxy: vsock:any:PORT (a VM), unix:PATH (the netns stand-in) or
    /// tcp:ADDR:PORT (tests).
    #[arg(long, env = "HOSTNET_AGENT_TRANSPORT")]
    transport: TransportSpec,

    /// Where to reach the proxy for guest→host connections (containers reaching desktop
    /// servers as localhost:PORT): vsock:2:PORT in a VM, unix:PATH in the stand-in. Needs root
    /// (CAP_NET_ADMIN) and the `nft` command. Off when not given.
    #[arg(long, env = "HOSTNET_AGENT_HOST_TRANSPORT", value_name = "SPEC")]
    host_transport: Option<TransportSpec>,

    /// Milliseconds between two reads of the listener table when polling (kernel listener
    /// events unavailable or turned off).
    #[arg(long, default_value_t = guest_agent::DEFAULT_POLL_INTERVAL.as_millis() as u64, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    poll_interval_ms: u64,

    /// Do not use kernel listener events (eBPF); poll the listener table instead. Events need
    /// root (CAP_BPF + CAP_PERFMON); without them the agent polls anyway.
    #[arg(long)]
    no_listener_events: bool,

    /// Guest port never to advertise; repeat for more.
    #[arg(long = "ignore-port", value_name = "PORT")]
    ignore_ports: Vec<u16>,
}

fn main() -> ExitCode {
    cli::init_logging();
    cli::tune_allocator();
    match cli::raise_fd_limit() {
        Ok(n) => tracing::debug!("open-file limit: {n}"),
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
    let args = Args::parse();
    let mut config = AgentConfig::new(args.transport);
    config.poll_interval = Duration::from_millis(args.poll_interval_ms);
    config.listener_events = !args.no_listener_events;
    config.ignore_ports = args.ignore_ports.into_iter().collect::<BTreeSet<_>>();
    config.host_transport = args.host_transport;

    // Start-up that needs more than the agent keeps (loading BPF), then the drop, both while
    // this is the only thread: capabilities are per thread and the runtime's threads copy them.
    let discovery = match Discovery::open(&config) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let keep = privileges::needed(config.host_transport.is_some(), &config.transport);
    match privileges::drop_all_but(&keep) {
        Ok(dropped) => tracing::info!("privileges: {dropped}"),
        Err(e) => {
            tracing::error!("cannot drop the privileges the agent does not need: {e}");
            return ExitCode::FAILURE;
        }
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The agent runs on a worker thread, not on this one: a future driven by `block_on` is
    // woken across threads for every event (the I/O driver lives on the workers), which cost
    // each new connection several extra context switches in its accept loop.
    let agent = runtime.spawn(async move {
        let shutdown = cli::cancel_on_termination();
        run_with(config, discovery, shutdown).await
    });
    match runtime.block_on(agent) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!("the agent's main task failed: {e}");
            ExitCode::FAILURE
        }
    }
}

//! `hostnet-agent`: the VM side of hostnet.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use guest_agent::user::{self, UserSpec};
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
    after_help = "Examples:\n  hostnet-agent --transport vsock:any:1024 --user hostnet    # in a real VM, started as root\n  hostnet-agent --transport unix:/run/hostnet/agent.sock\n\nLogging: RUST_LOG=debug hostnet-agent …"
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

    /// Streams to the proxy for guest→host kept opened ahead of need, so a container's new
    /// connection does not wait for its own to be set up [default: 4 for vsock:, where that is
    /// a round trip through the VMM; 0 for unix: and tcp:].
    #[arg(long, env = "HOSTNET_AGENT_SPARE_STREAMS", value_name = "N", value_parser = clap::value_parser!(u16).range(0..=64))]
    spare_streams: Option<u16>,

    /// Streams to the proxy for guest→host whose connection ended cleanly kept for the next
    /// connections, at most (0: each connection's stream is closed with it).
    #[arg(long, env = "HOSTNET_AGENT_REUSE_STREAMS", value_name = "N", default_value_t = hostnet_net::transport::spare::REUSED_STREAMS as u16, value_parser = clap::value_parser!(u16).range(0..=64))]
    reuse_streams: u16,

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

    /// The unprivileged user to become once started: NAME (from /etc/passwd, with its primary
    /// group) or UID:GID. Start the agent as root: it loads its listener-events programs
    /// first, then switches (no supplementary groups) keeping only the capabilities it needs
    /// (CAP_NET_ADMIN for guest→host). Without it the agent stays the user it was started as.
    #[arg(long, env = "HOSTNET_AGENT_USER", value_name = "NAME|UID:GID")]
    user: Option<UserSpec>,

    /// Relay bulk transfers through a buffer even where splice(2) could move them: the path
    /// every byte takes over vsock and on macOS and Windows (for measuring it on Linux).
    #[arg(long)]
    no_splice: bool,
}

fn main() -> ExitCode {
    cli::init_process();
    let args = Args::parse();
    hostnet_net::relay::tcp::set_splice(!args.no_splice);
    // Its peer is the desktop: more credit, fewer and larger reads (the proxy keeps Linux's).
    hostnet_net::transport::vsock::set_stream_credit(hostnet_net::transport::vsock::AGENT_CREDIT);
    let mut config = AgentConfig::new(args.transport);
    config.poll_interval = Duration::from_millis(args.poll_interval_ms);
    config.listener_events = !args.no_listener_events;
    config.ignore_ports = args.ignore_ports.into_iter().collect::<BTreeSet<_>>();
    config.host_transport = args.host_transport;
    config.spare_streams = args.spare_streams.map(usize::from);
    config.reuse_streams = usize::from(args.reuse_streams);
    // An unknown user is an error before anything starts.
    let account = match args.user.as_ref().map(user::lookup).transpose() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };

    // Start-up that needs more than the agent keeps (loading BPF), then the switch to its own
    // user and the drop, all while this is the only thread: credentials and capabilities are
    // per thread and the runtime's threads copy them.
    let discovery = match Discovery::open(&config) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Err(e)) = account.as_ref().map(user::become_user) {
        tracing::error!("{e}");
        return ExitCode::FAILURE;
    }
    let keep = privileges::needed(config.host_transport.is_some(), &config.transport);
    match privileges::drop_all_but(&keep) {
        Ok(dropped) => {
            tracing::info!("privileges: {dropped}");
            if let Some(account) = &account {
                tracing::info!("running as {account} with {}", dropped.kept_names());
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let base = ["hostnet-agent", "--transport", "vsock:any:1024"];
        Args::try_parse_from(base.iter().chain(extra))
    }

    #[test]
    fn user_takes_a_name_or_uid_gid() {
        assert_eq!(parse(&[]).unwrap().user, None, "without --user the agent stays who it is");
        assert_eq!(parse(&["--user", "hostnet"]).unwrap().user, Some(UserSpec::Name("hostnet".into())));
        assert_eq!(parse(&["--user", "999:999"]).unwrap().user, Some(UserSpec::Ids { uid: 999, gid: 999 }));
    }

    #[test]
    fn user_refuses_root_and_lone_numbers_at_parse_time() {
        for bad in ["root", "0:0", "999", "a:b", ""] {
            let err = parse(&["--user", bad]).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{bad}: {err}");
        }
        let err = parse(&["--user", "0:0"]).unwrap_err().to_string();
        assert!(err.contains("must not run as root"), "{err}");
    }
}

//! The control link to the agent: connect, handshake, apply the snapshot and deltas,
//! heartbeat; on loss, reconnect with backoff and resync from the next snapshot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use hostnet_net::handshake::{self, FrameReader, HandshakeError};
use hostnet_net::{Connector, TransportError};
use hostnet_protocol::frame::MAX_SNAPSHOT_LISTENERS;
use hostnet_protocol::{Control, ListenerSet, Open, Role, SnapshotParts, listener_chunks};
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::LinkState;
use crate::forward::Forwards;

/// Desktop listener changes within this long go to the agent as one delta.
const HOST_BATCH: Duration = Duration::from_millis(10);
/// How often the proxy sends a heartbeat (and retries conflicting ports).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// No frame from the agent for this long: the link is dead.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(8);
/// After losing the agent, forwarded ports stay open this long for it to come back, then close.
pub const STALE_AFTER: Duration = Duration::from_secs(5);
/// Reconnect backoff bounds.
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
enum LinkError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("the agent reported: {0}")]
    Agent(String),
    #[error("the agent sent {0} where a {1} was expected")]
    Unexpected(&'static str, &'static str),
    #[error("the agent stopped answering heartbeats for {0:?}")]
    Silent(Duration),
    #[error(transparent)]
    SnapshotTooLarge(#[from] hostnet_protocol::frame::SnapshotTooLarge),
    #[error("the agent reports more than {0} listeners")]
    TooManyListeners(usize),
}

fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(RECONNECT_MIN)
        .with_max_delay(RECONNECT_MAX)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Keeps the link up until `shutdown`.
pub async fn maintain(
    connector: Arc<dyn Connector>,
    forwards: Forwards,
    host: watch::Receiver<Arc<ListenerSet>>,
    state: watch::Sender<LinkState>,
    shutdown: CancellationToken,
) {
    let mut delays = backoff();
    let mut lost_at: Option<Instant> = None;
    // Whether the forwards of the agent lost at `lost_at` are closed already.
    let mut stale_closed = false;
    let mut attempts = 0u32;
    loop {
        let established = AtomicBool::new(false);
        // An attempt can wait for the agent for as long as the handshake timeout (an agent
        // that is stopped, not gone, accepts connections but never answers): the forwards of
        // a lost agent still close on time meanwhile.
        let stale_at = lost_at.filter(|_| !stale_closed).map(|t| t + STALE_AFTER);
        let result = {
            let attempt = session(&*connector, &forwards, host.clone(), &state, &shutdown, &established);
            tokio::pin!(attempt);
            loop {
                tokio::select! {
                    r = &mut attempt => break r,
                    _ = sleep_until_or_never(stale_at), if !stale_closed => {
                        stale_closed = true;
                        if !established.load(Ordering::SeqCst) {
                            close_stale(&forwards).await;
                        }
                    }
                }
            }
        };
        let established = established.into_inner();
        if shutdown.is_cancelled() {
            return;
        }
        attempts += 1;
        if established {
            delays = backoff();
            attempts = 1;
            lost_at = Some(Instant::now());
            stale_closed = false;
        } else {
            lost_at.get_or_insert_with(Instant::now);
        }
        let error = match result {
            Ok(()) => "the agent closed the control stream".to_owned(),
            Err(e) => e.to_string(),
        };
        let delay = delays.next().unwrap_or(RECONNECT_MAX);
        if established {
            warn!("lost the agent: {error}; reconnecting");
        } else if attempts == 1 {
            // Usual at start-up, while the VM boots: say so once, calmly.
            info!("waiting for the agent: {error}");
        } else if attempts.is_power_of_two() || delay >= RECONNECT_MAX {
            warn!("agent unreachable (attempt {attempts}): {error}; retrying in {delay:.1?}");
        }
        state.send_replace(LinkState::Disconnected { error });

        let stale_at = lost_at.filter(|_| !stale_closed).map(|t| t + STALE_AFTER);
        let wake = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(wake) => break,
                _ = sleep_until_or_never(stale_at), if !stale_closed => {
                    stale_closed = true;
                    close_stale(&forwards).await;
                }
            }
        }
    }
}

/// Sleeps until `at`, or forever when there is none.
async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The agent has been away for [`STALE_AFTER`]: its forwarded ports close until it is back.
async fn close_stale(forwards: &Forwards) {
    let (_, open) = forwards.counts();
    if open > 0 {
        info!("agent still away after {STALE_AFTER:?}: closing {open} forwarded port(s) until it is back");
    }
    forwards.replace_all(ListenerSet::new()).await;
}

async fn session(
    connector: &dyn Connector,
    forwards: &Forwards,
    mut host: watch::Receiver<Arc<ListenerSet>>,
    state: &watch::Sender<LinkState>,
    shutdown: &CancellationToken,
    established: &AtomicBool,
) -> Result<(), LinkError> {
    state.send_replace(LinkState::Connecting);
    let stream = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        s = connector.connect() => s?,
    };
    handshake::send_preface_and(&stream, &Open::Control {}).await?;
    let hello = Control::Hello {
        role: Role::Proxy,
        software: format!("hostnet-proxy {}", env!("CARGO_PKG_VERSION")),
    };
    handshake::send_frame(&stream, &hello).await?;

    let mut reader = FrameReader::new();
    match reader.read_opening::<_, Control>(&stream).await? {
        Control::Hello { software, .. } => {
            info!(agent = %software, via = %connector, "connected to the agent")
        }
        Control::Error { message } => return Err(LinkError::Agent(message)),
        _ => return Err(LinkError::Unexpected("another frame", "hello")),
    }
    // The snapshot, in as many parts as the agent split it into.
    let mut parts = SnapshotParts::default();
    let listeners = tokio::time::timeout(handshake::HANDSHAKE_TIMEOUT, async {
        loop {
            let Control::Snapshot { listeners, more } = reader.read_frame::<_, Control>(&stream).await?
            else {
                return Err(LinkError::Unexpected("another frame", "snapshot"));
            };
            if let Some(all) = parts.push(listeners, more)? {
                return Ok(all);
            }
        }
    })
    .await
    .map_err(|_| HandshakeError::TimedOut(handshake::HANDSHAKE_TIMEOUT))??;
    forwards.replace_all(listeners.into_iter().filter(|l| l.is_forwardable()).collect()).await;
    established.store(true, Ordering::SeqCst);
    publish(state, forwards);
    // Guest→host: the desktop's own listeners (the watcher already leaves out our mirrors).
    let mut host_sent = (**host.borrow_and_update()).clone();
    for frame in Control::host_snapshot_frames(host_sent.iter().copied().collect()) {
        handshake::send_frame(&stream, &frame).await?;
    }
    let mut host_live = true;
    let mut host_due: Option<Instant> = None;

    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > HEARTBEAT_TIMEOUT {
                    return Err(LinkError::Silent(HEARTBEAT_TIMEOUT));
                }
                seq += 1;
                handshake::send_frame(&stream, &Control::Heartbeat { seq }).await?;
                forwards.retry_conflicts();
            }
            changed = host.changed(), if host_live && host_due.is_none() => {
                if changed.is_err() {
                    host_live = false; // guest→host is off
                    continue;
                }
                // A burst of desktop listeners (a dev server starting) settles into one delta:
                // one `nft` run in the guest, not one per port.
                host_due = Some(Instant::now() + HOST_BATCH);
            }
            () = async { if let Some(due) = host_due { tokio::time::sleep_until(due).await } }, if host_due.is_some() => {
                host_due = None;
                let now = (**host.borrow_and_update()).clone();
                let (added, removed) = host_sent.diff(&now);
                if !removed.is_empty() {
                    for listeners in listener_chunks(removed) {
                        handshake::send_frame(&stream, &Control::HostRemoved { listeners }).await?;
                    }
                }
                if !added.is_empty() {
                    for listeners in listener_chunks(added) {
                        handshake::send_frame(&stream, &Control::HostAdded { listeners }).await?;
                    }
                }
                host_sent = now;
            }
            frame = reader.read_frame::<_, Control>(&stream) => {
                last_heard = Instant::now();
                match frame? {
                    Control::Snapshot { listeners, more } => {
                        if let Some(all) = parts.push(listeners, more)? {
                            forwards.replace_all(all.into_iter().filter(|l| l.is_forwardable()).collect()).await;
                        }
                    }
                    Control::Added { listeners } => {
                        let ok: Vec<_> = listeners.into_iter().filter(|l| l.is_forwardable()).collect();
                        // Deltas cannot grow the table past what a snapshot may hold.
                        if forwards.counts().0 + ok.len() > MAX_SNAPSHOT_LISTENERS {
                            return Err(LinkError::TooManyListeners(MAX_SNAPSHOT_LISTENERS));
                        }
                        forwards.add(&ok).await;
                    }
                    Control::Removed { listeners } => forwards.remove(&listeners).await,
                    Control::Heartbeat { seq } => {
                        handshake::send_frame(&stream, &Control::HeartbeatAck { seq }).await?;
                    }
                    Control::HeartbeatAck { .. } => {}
                    Control::Error { message } => return Err(LinkError::Agent(message)),
                    Control::Hello { .. } => debug!("ignoring a repeated hello"),
                    Control::HostSnapshot { .. } | Control::HostAdded { .. } | Control::HostRemoved { .. } => {
                        debug!("ignoring a host-listener frame from the agent");
                    }
                }
                publish(state, forwards);
            }
        }
    }
}

fn publish(state: &watch::Sender<LinkState>, forwards: &Forwards) {
    let (listeners, forwarding) = forwards.counts();
    state.send_if_modified(|s| {
        let next = LinkState::Connected { listeners, forwarding };
        if *s == next {
            return false;
        }
        *s = next;
        true
    });
}

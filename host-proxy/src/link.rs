//! The control link to the agent: the I/O around [`ProxySession`], which holds the session's
//! logic (hello, snapshot parts, deltas, heartbeats, stale ports; see
//! `hostnet_protocol::session`). This driver connects, reconnects with backoff, reads frames,
//! runs the timers the machine names and carries its actions into the forwarding table.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use hostnet_net::transport::handshake::{self, FrameReader, HandshakeError};
use hostnet_net::{Connector, TransportError, TransportStream};
use hostnet_protocol::session::{ProxyAction, ProxySession, ProxySessionError};
use hostnet_protocol::{AgentFrame, ListenerSet, Open};
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::LinkState;
use crate::forward::Forwards;

use hostnet_protocol::session::STALE_AFTER;

/// Reconnect backoff bounds.
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
enum LinkError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Session(#[from] ProxySessionError),
}

fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(RECONNECT_MIN)
        .with_max_delay(RECONNECT_MAX)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The time handed to the session (tokio's clock, so paused-time tests hold).
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Keeps the link up until `shutdown`.
pub async fn maintain(
    connector: Arc<dyn Connector>,
    forwards: Forwards,
    host: watch::Receiver<Arc<ListenerSet>>,
    state: watch::Sender<LinkState>,
    shutdown: CancellationToken,
) {
    let mut link = Link {
        session: ProxySession::new(format!("hostnet-proxy {}", env!("CARGO_PKG_VERSION"))),
        connector: &*connector,
        forwards: &forwards,
        shutdown: &shutdown,
    };
    let mut delays = backoff();
    let mut attempts = 0u32;
    loop {
        let result = link.attempt(host.clone(), &state).await;
        let established = link.session.disconnected(now());
        if shutdown.is_cancelled() {
            return;
        }
        attempts += 1;
        if established {
            delays = backoff();
            attempts = 1;
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

        // The stale-port timer runs on while we wait to retry.
        if link.wait(tokio::time::sleep(delay)).await.is_none() {
            return;
        }
    }
}

/// A [`ProxySession`] and what its actions act on.
struct Link<'a> {
    session: ProxySession,
    connector: &'a dyn Connector,
    forwards: &'a Forwards,
    shutdown: &'a CancellationToken,
}

impl Link<'_> {
    /// One control stream, from connecting until it ends.
    async fn attempt(
        &mut self,
        mut host: watch::Receiver<Arc<ListenerSet>>,
        state: &watch::Sender<LinkState>,
    ) -> Result<(), LinkError> {
        state.send_replace(LinkState::Connecting);
        // An attempt can wait for the agent for as long as the handshake timeout (an agent
        // that is stopped, not gone, accepts connections but never answers): the forwards of
        // a lost agent still close on time meanwhile, as `wait` runs the session's timers.
        let Some(stream) = self.wait(self.connector.connect()).await else { return Ok(()) };
        let stream = stream?;
        handshake::send_preface_and(&stream, &Open::Control {}).await?;
        self.session.connected((**host.borrow_and_update()).clone());
        self.apply(Some(&stream)).await?;

        let mut reader = FrameReader::new();
        let Some(hello) = self.wait(reader.read_opening::<_, AgentFrame>(&stream)).await else {
            return Ok(());
        };
        self.session.handle_frame(hello?, now())?;
        self.apply(Some(&stream)).await?;

        let mut host_live = true;
        loop {
            let deadline = self.session.poll_timeout();
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                () = sleep_until_or_never(deadline) => self.session.handle_timeout(now())?,
                changed = host.changed(), if host_live => {
                    if changed.is_err() {
                        host_live = false; // guest→host is off
                        continue;
                    }
                    self.session.host_listeners((**host.borrow_and_update()).clone(), now());
                }
                frame = reader.read_frame::<_, AgentFrame>(&stream) => {
                    self.session.handle_frame(frame?, now())?;
                }
            }
            self.apply(Some(&stream)).await?;
            if self.session.is_established() {
                publish(state, self.forwards);
            }
        }
    }

    /// Waits for `fut` while running the session's timers (only the stale-port one runs
    /// outside a live stream); `None` on shutdown.
    async fn wait<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                out = &mut fut => return Some(out),
                () = sleep_until_or_never(self.session.poll_timeout()) => {
                    if let Err(e) = self.session.handle_timeout(now()) {
                        debug!("session timer while waiting: {e}");
                    }
                    // No frame is due before the agent's hello: nothing to send on.
                    if let Err(e) = self.apply(None).await {
                        debug!("{e}");
                    }
                }
            }
        }
    }

    /// Carries out what the session asked for, in order.
    async fn apply(&mut self, stream: Option<&TransportStream>) -> Result<(), LinkError> {
        while let Some(action) = self.session.poll_action() {
            match action {
                ProxyAction::Send(frame) => match stream {
                    Some(stream) => handshake::send_frame(stream, &frame).await?,
                    None => debug!(?frame, "no control stream to send on"),
                },
                ProxyAction::Connected { agent } => {
                    info!(agent = %agent, via = %self.connector, "connected to the agent")
                }
                ProxyAction::ReplaceAll(listeners) => self.forwards.replace_all(listeners).await,
                ProxyAction::Add(listeners) => self.forwards.add(&listeners).await,
                ProxyAction::Remove(listeners) => self.forwards.remove(&listeners).await,
                ProxyAction::RetryConflicts => self.forwards.retry_conflicts(),
                ProxyAction::CloseStale => close_stale(self.forwards).await,
            }
        }
        Ok(())
    }
}

/// Sleeps until `at`, or forever when there is none.
async fn sleep_until_or_never(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(Instant::from_std(at)).await,
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

//! The control session of each side as a state machine without I/O.
//!
//! Each side's driver (the proxy's `link.rs`, the agent's `session.rs`) reads frames, watches
//! timers and its listener sets, and hands them in as events with the current time; the machine
//! answers with actions to take (frames to send, listener tables to change) and the next instant
//! at which it wants [`ProxySession::handle_timeout`] / [`AgentSession::handle_timeout`] called.
//! Time is always passed in, never read, so a whole session — hello, split snapshots, deltas,
//! heartbeat loss, reconnects, stale ports — is tested here without a socket or a clock.
//!
//! ```text
//! proxy                                  agent
//!   preface, open control, hello  ──▶
//!                                  ◀──   preface, hello, snapshot (in parts)
//!   host_snapshot (in parts)      ──▶
//!   heartbeat every 2 s           ──▶
//!                                  ◀──   heartbeat_ack, added / removed as listeners change
//!   host_added / host_removed     ──▶
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::frame::{
    AgentFrame, MAX_SNAPSHOT_LISTENERS, ProxyFrame, Role, SnapshotParts, SnapshotTooLarge, listener_chunks,
};
use crate::listener::{Listener, ListenerSet};

/// How often the proxy sends a heartbeat (and retries conflicting ports).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// No frame from the agent for this long: the proxy drops the link.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(8);
/// After losing the agent, forwarded ports stay open this long for it to come back, then close.
pub const STALE_AFTER: Duration = Duration::from_secs(5);
/// How long the agent may take to send all of its snapshot after its hello.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);
/// Desktop listener changes within this long go to the agent as one delta: a dev server that
/// opens a burst of ports costs the guest one `nft` run, not one per port.
pub const HOST_BATCH: Duration = Duration::from_millis(10);
/// A control stream silent this long is dead to the agent: longer than the proxy's
/// [`HEARTBEAT_TIMEOUT`], since the proxy heartbeats every [`HEARTBEAT_INTERVAL`].
pub const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// What the proxy's driver is asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyAction {
    /// Write this frame on the control stream.
    Send(ProxyFrame),
    /// The agent said hello (its software, for the log).
    Connected { agent: String },
    /// The agent's whole snapshot arrived: forward exactly these listeners.
    ReplaceAll(ListenerSet),
    /// Forward these listeners too.
    Add(Vec<Listener>),
    /// Stop forwarding these listeners.
    Remove(Vec<Listener>),
    /// Heartbeat time: retry ports another program held.
    RetryConflicts,
    /// The agent has been away for [`STALE_AFTER`]: close its forwarded ports until it is back.
    CloseStale,
}

/// Why the proxy closes a control stream. Each is a sentence for the log and the status.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProxySessionError {
    #[error("the agent reported: {0}")]
    Agent(String),
    #[error("the agent sent a frame out of order: `{got}` where `{expected}` was due")]
    Unexpected { got: &'static str, expected: &'static str },
    #[error("the agent sent its hello as role `{0:?}`; is the transport pointing at another proxy?")]
    WrongRole(Role),
    #[error("the agent stopped answering heartbeats for {0:?}")]
    Silent(Duration),
    #[error("the agent sent no complete snapshot within {0:?}")]
    SnapshotTimedOut(Duration),
    #[error(transparent)]
    SnapshotTooLarge(#[from] SnapshotTooLarge),
    #[error("the agent reports more than {0} listeners")]
    TooManyListeners(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyState {
    /// No control stream.
    Disconnected,
    /// Our hello is out; the agent's is the first frame we accept.
    AwaitingHello,
    /// Gathering the parts of the agent's snapshot until `deadline`.
    AwaitingSnapshot { deadline: Instant },
    /// The agent's listeners are applied; deltas and heartbeats flow.
    Established,
}

/// The proxy's side of the link to the agent, across reconnects (the stale-port timer runs
/// between control streams).
#[derive(Debug)]
pub struct ProxySession {
    software: String,
    state: ProxyState,
    actions: VecDeque<ProxyAction>,
    /// The agent's forwardable listeners, as last applied.
    agent: ListenerSet,
    parts: SnapshotParts,
    seq: u64,
    next_heartbeat: Option<Instant>,
    last_heard: Option<Instant>,
    /// The desktop's listeners: last told to the agent, latest known, and when to tell it.
    host_sent: ListenerSet,
    host_latest: ListenerSet,
    host_due: Option<Instant>,
    /// When the agent was lost, and whether its ports are closed already.
    lost_at: Option<Instant>,
    stale_closed: bool,
}

impl ProxySession {
    /// `software` goes into our hello ("hostnet-proxy 0.1.0").
    pub fn new(software: String) -> Self {
        ProxySession {
            software,
            state: ProxyState::Disconnected,
            actions: VecDeque::new(),
            agent: ListenerSet::new(),
            parts: SnapshotParts::default(),
            seq: 0,
            next_heartbeat: None,
            last_heard: None,
            host_sent: ListenerSet::new(),
            host_latest: ListenerSet::new(),
            host_due: None,
            lost_at: None,
            stale_closed: false,
        }
    }

    /// A control stream is open (our preface and `Open::Control` are out): says hello.
    /// `host` is the desktop's listeners now, sent once the agent's snapshot is in.
    pub fn connected(&mut self, host: ListenerSet) {
        self.state = ProxyState::AwaitingHello;
        self.parts = SnapshotParts::default();
        self.host_latest = host;
        self.host_due = None;
        self.next_heartbeat = None;
        self.actions.push_back(ProxyAction::Send(ProxyFrame::Hello {
            role: Role::Proxy,
            software: self.software.clone(),
        }));
    }

    /// The control stream ended (an error, the agent closed it, or an attempt that failed
    /// before that). Returns whether the agent's snapshot had been applied on it.
    pub fn disconnected(&mut self, now: Instant) -> bool {
        let established = self.state == ProxyState::Established;
        self.state = ProxyState::Disconnected;
        self.parts = SnapshotParts::default();
        self.next_heartbeat = None;
        self.host_due = None;
        if established {
            self.lost_at = Some(now);
            self.stale_closed = false;
        } else {
            self.lost_at.get_or_insert(now);
        }
        established
    }

    /// Whether the agent's snapshot is applied on the current control stream.
    pub fn is_established(&self) -> bool {
        self.state == ProxyState::Established
    }

    /// How many of the agent's listeners are applied.
    pub fn agent_listeners(&self) -> usize {
        self.agent.len()
    }

    /// The desktop's listeners changed (guest→host): they go to the agent [`HOST_BATCH`] later,
    /// together with any further change meanwhile.
    pub fn host_listeners(&mut self, host: ListenerSet, now: Instant) {
        self.host_latest = host;
        if self.state == ProxyState::Established && self.host_due.is_none() {
            self.host_due = Some(now + HOST_BATCH);
        }
    }

    /// A frame from the agent. An error closes the control stream with its sentence.
    pub fn handle_frame(&mut self, frame: AgentFrame, now: Instant) -> Result<(), ProxySessionError> {
        match self.state {
            ProxyState::Disconnected => {
                Err(ProxySessionError::Unexpected { got: frame.kind(), expected: "preface" })
            }
            ProxyState::AwaitingHello => match frame {
                AgentFrame::Hello { role: Role::Agent, software } => {
                    self.actions.push_back(ProxyAction::Connected { agent: software });
                    self.state = ProxyState::AwaitingSnapshot { deadline: now + SNAPSHOT_TIMEOUT };
                    Ok(())
                }
                AgentFrame::Hello { role, .. } => Err(ProxySessionError::WrongRole(role)),
                AgentFrame::Error { message } => Err(ProxySessionError::Agent(message)),
                other => Err(ProxySessionError::Unexpected { got: other.kind(), expected: "hello" }),
            },
            ProxyState::AwaitingSnapshot { .. } => match frame {
                AgentFrame::Snapshot { listeners, more } => {
                    if let Some(all) = self.parts.push(listeners, more)? {
                        self.establish(all, now);
                    }
                    Ok(())
                }
                AgentFrame::Error { message } => Err(ProxySessionError::Agent(message)),
                other => Err(ProxySessionError::Unexpected { got: other.kind(), expected: "snapshot" }),
            },
            ProxyState::Established => {
                self.last_heard = Some(now);
                self.established_frame(frame)
            }
        }
    }

    fn establish(&mut self, all: Vec<Listener>, now: Instant) {
        self.agent = forwardable(all);
        self.actions.push_back(ProxyAction::ReplaceAll(self.agent.clone()));
        // Guest→host: the desktop's own listeners (the watcher already leaves out our mirrors).
        self.host_sent = self.host_latest.clone();
        for frame in ProxyFrame::host_snapshot_frames(self.host_sent.iter().copied().collect()) {
            self.actions.push_back(ProxyAction::Send(frame));
        }
        self.state = ProxyState::Established;
        self.last_heard = Some(now);
        // The first heartbeat goes at once, then every interval.
        self.next_heartbeat = Some(now);
        // The snapshot replaced every forward: nothing stale is left to close.
        self.stale_closed = true;
    }

    fn established_frame(&mut self, frame: AgentFrame) -> Result<(), ProxySessionError> {
        match frame {
            // A new snapshot on a live stream replaces everything too, once complete.
            AgentFrame::Snapshot { listeners, more } => {
                if let Some(all) = self.parts.push(listeners, more)? {
                    self.agent = forwardable(all);
                    self.actions.push_back(ProxyAction::ReplaceAll(self.agent.clone()));
                }
            }
            AgentFrame::Added { listeners } => {
                let ok: Vec<_> = listeners.into_iter().filter(Listener::is_forwardable).collect();
                // Deltas cannot grow the table past what a snapshot may hold.
                if self.agent.len() + ok.len() > MAX_SNAPSHOT_LISTENERS {
                    return Err(ProxySessionError::TooManyListeners(MAX_SNAPSHOT_LISTENERS));
                }
                self.agent.extend(ok.iter().copied());
                self.actions.push_back(ProxyAction::Add(ok));
            }
            AgentFrame::Removed { listeners } => {
                for l in &listeners {
                    self.agent.remove(l);
                }
                self.actions.push_back(ProxyAction::Remove(listeners));
            }
            AgentFrame::Heartbeat { seq } => {
                self.actions.push_back(ProxyAction::Send(ProxyFrame::HeartbeatAck { seq }));
            }
            AgentFrame::HeartbeatAck { .. } => {}
            AgentFrame::Error { message } => return Err(ProxySessionError::Agent(message)),
            // Harmless, and what earlier proxies did too.
            AgentFrame::Hello { .. } => {}
        }
        Ok(())
    }

    /// The instant [`Self::poll_timeout`] named has come (or any later one).
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ProxySessionError> {
        if self.stale_at().is_some_and(|at| now >= at) {
            self.stale_closed = true;
            self.agent = ListenerSet::new();
            self.actions.push_back(ProxyAction::CloseStale);
        }
        match self.state {
            ProxyState::AwaitingSnapshot { deadline } if now >= deadline => {
                return Err(ProxySessionError::SnapshotTimedOut(SNAPSHOT_TIMEOUT));
            }
            ProxyState::Established => {}
            _ => return Ok(()),
        }
        if self.host_due.is_some_and(|due| now >= due) {
            self.host_due = None;
            let (added, removed) = self.host_sent.diff(&self.host_latest);
            if !removed.is_empty() {
                for listeners in listener_chunks(removed) {
                    self.actions.push_back(ProxyAction::Send(ProxyFrame::HostRemoved { listeners }));
                }
            }
            if !added.is_empty() {
                for listeners in listener_chunks(added) {
                    self.actions.push_back(ProxyAction::Send(ProxyFrame::HostAdded { listeners }));
                }
            }
            self.host_sent = self.host_latest.clone();
        }
        if self.next_heartbeat.is_some_and(|at| now >= at) {
            if self.last_heard.is_some_and(|heard| now.saturating_duration_since(heard) > HEARTBEAT_TIMEOUT) {
                return Err(ProxySessionError::Silent(HEARTBEAT_TIMEOUT));
            }
            self.seq += 1;
            self.actions.push_back(ProxyAction::Send(ProxyFrame::Heartbeat { seq: self.seq }));
            self.actions.push_back(ProxyAction::RetryConflicts);
            self.next_heartbeat = Some(now + HEARTBEAT_INTERVAL);
        }
        Ok(())
    }

    fn stale_at(&self) -> Option<Instant> {
        self.lost_at.filter(|_| !self.stale_closed).map(|t| t + STALE_AFTER)
    }

    /// When to call [`Self::handle_timeout`] next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let snapshot = match self.state {
            ProxyState::AwaitingSnapshot { deadline } => Some(deadline),
            _ => None,
        };
        [self.stale_at(), snapshot, self.host_due, self.next_heartbeat].into_iter().flatten().min()
    }

    /// The next action to take, in the order they arose.
    pub fn poll_action(&mut self) -> Option<ProxyAction> {
        self.actions.pop_front()
    }
}

/// What the agent's driver is asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAction {
    /// Write this frame on the control stream (the first one after our preface).
    Send(AgentFrame),
    /// The proxy said hello (its software, for the log).
    ProxyHello { software: String },
    /// The desktop listeners guest processes may reach are now exactly these.
    SetHost(ListenerSet),
    /// The proxy reported a problem (logged; the proxy closes the stream if it is fatal).
    ProxyReported(String),
}

/// Why the agent closes a control stream.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AgentSessionError {
    #[error("the peer sent nothing for {0:?}")]
    Silent(Duration),
    #[error(transparent)]
    HostSnapshotTooLarge(#[from] SnapshotTooLarge),
    #[error("the proxy sent its hello as role `{0:?}`; is the transport pointing at another agent?")]
    WrongRole(Role),
}

/// The agent's side of one control stream. A new control stream gets a new session.
#[derive(Debug)]
pub struct AgentSession {
    actions: VecDeque<AgentAction>,
    /// The guest listeners the proxy was told about.
    sent: ListenerSet,
    /// The desktop's listeners as the proxy last described them.
    host: ListenerSet,
    host_parts: SnapshotParts,
    last_heard: Instant,
}

impl AgentSession {
    /// A control stream from the proxy was accepted at `now`: our hello and the snapshot of
    /// `listeners` go out at once, without waiting for the proxy's hello.
    pub fn new(software: String, listeners: ListenerSet, now: Instant) -> Self {
        let mut actions = VecDeque::new();
        actions.push_back(AgentAction::Send(AgentFrame::Hello { role: Role::Agent, software }));
        for frame in AgentFrame::snapshot_frames(listeners.iter().copied().collect()) {
            actions.push_back(AgentAction::Send(frame));
        }
        AgentSession {
            actions,
            sent: listeners,
            host: ListenerSet::new(),
            host_parts: SnapshotParts::default(),
            last_heard: now,
        }
    }

    /// The guest's listeners changed: the difference goes to the proxy, removals first.
    pub fn listeners_changed(&mut self, now: ListenerSet) {
        let (added, removed) = self.sent.diff(&now);
        if !removed.is_empty() {
            for listeners in listener_chunks(removed) {
                self.actions.push_back(AgentAction::Send(AgentFrame::Removed { listeners }));
            }
        }
        if !added.is_empty() {
            for listeners in listener_chunks(added) {
                self.actions.push_back(AgentAction::Send(AgentFrame::Added { listeners }));
            }
        }
        self.sent = now;
    }

    /// A frame from the proxy.
    pub fn handle_frame(&mut self, frame: ProxyFrame, now: Instant) -> Result<(), AgentSessionError> {
        self.last_heard = now;
        match frame {
            ProxyFrame::Heartbeat { seq } => {
                self.actions.push_back(AgentAction::Send(AgentFrame::HeartbeatAck { seq }));
            }
            ProxyFrame::HeartbeatAck { .. } => {}
            ProxyFrame::Hello { role: Role::Proxy, software } => {
                self.actions.push_back(AgentAction::ProxyHello { software });
            }
            ProxyFrame::Hello { role, .. } => return Err(AgentSessionError::WrongRole(role)),
            ProxyFrame::HostSnapshot { listeners, more } => {
                if let Some(all) = self.host_parts.push(listeners, more)? {
                    self.host = forwardable(all);
                    self.actions.push_back(AgentAction::SetHost(self.host.clone()));
                }
            }
            ProxyFrame::HostAdded { listeners } => {
                self.host.extend(listeners.into_iter().filter(Listener::is_forwardable));
                self.actions.push_back(AgentAction::SetHost(self.host.clone()));
            }
            ProxyFrame::HostRemoved { listeners } => {
                for l in &listeners {
                    self.host.remove(l);
                }
                self.actions.push_back(AgentAction::SetHost(self.host.clone()));
            }
            ProxyFrame::Error { message } => self.actions.push_back(AgentAction::ProxyReported(message)),
        }
        Ok(())
    }

    /// The instant [`Self::poll_timeout`] named has come.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), AgentSessionError> {
        if now >= self.poll_timeout() {
            return Err(AgentSessionError::Silent(CONTROL_IDLE_TIMEOUT));
        }
        Ok(())
    }

    /// When to call [`Self::handle_timeout`]: the stream is dead if nothing arrives by then.
    pub fn poll_timeout(&self) -> Instant {
        self.last_heard + CONTROL_IDLE_TIMEOUT
    }

    /// The next action to take, in the order they arose.
    pub fn poll_action(&mut self) -> Option<AgentAction> {
        self.actions.pop_front()
    }
}

fn forwardable(listeners: Vec<Listener>) -> ListenerSet {
    listeners.into_iter().filter(Listener::is_forwardable).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameDecoder, LISTENERS_PER_FRAME, encode_frame};
    use crate::listener::Proto;
    use crate::preface::{Preface, PrefaceError};
    use bytes::BytesMut;

    fn tcp(port: u16) -> Listener {
        Listener { proto: Proto::Tcp, addr: "127.0.0.1".parse().unwrap(), port }
    }

    fn set(ports: &[u16]) -> ListenerSet {
        ports.iter().map(|&p| tcp(p)).collect()
    }

    fn actions(s: &mut ProxySession) -> Vec<ProxyAction> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn agent_actions(s: &mut AgentSession) -> Vec<AgentAction> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn hello() -> AgentFrame {
        AgentFrame::Hello { role: Role::Agent, software: "hostnet-agent 9".into() }
    }

    /// A proxy whose control stream is up at `now`, with the agent's snapshot of `ports` applied.
    fn established(now: Instant, ports: &[u16]) -> ProxySession {
        let mut s = ProxySession::new("hostnet-proxy 9".into());
        s.connected(ListenerSet::new());
        s.handle_frame(hello(), now).unwrap();
        s.handle_frame(
            AgentFrame::Snapshot { listeners: set(ports).iter().copied().collect(), more: false },
            now,
        )
        .unwrap();
        assert!(s.is_established());
        actions(&mut s);
        s
    }

    #[test]
    fn hello_then_a_snapshot_in_parts_applied_only_when_whole() {
        let t = Instant::now();
        let mut s = ProxySession::new("hostnet-proxy 9".into());
        s.connected(set(&[22]));
        assert_eq!(
            actions(&mut s),
            [ProxyAction::Send(ProxyFrame::Hello { role: Role::Proxy, software: "hostnet-proxy 9".into() })]
        );
        s.handle_frame(hello(), t).unwrap();
        assert_eq!(actions(&mut s), [ProxyAction::Connected { agent: "hostnet-agent 9".into() }]);
        s.handle_frame(AgentFrame::Snapshot { listeners: vec![tcp(1), tcp(2)], more: true }, t).unwrap();
        assert_eq!(actions(&mut s), [], "nothing applied before the last part");
        assert!(!s.is_established());
        // Port 0 is not forwardable: left out, as the agent's own filter would.
        s.handle_frame(AgentFrame::Snapshot { listeners: vec![tcp(3), tcp(0)], more: false }, t).unwrap();
        assert_eq!(
            actions(&mut s),
            [
                ProxyAction::ReplaceAll(set(&[1, 2, 3])),
                ProxyAction::Send(ProxyFrame::HostSnapshot { listeners: vec![tcp(22)], more: false }),
            ]
        );
        assert!(s.is_established());
        assert_eq!(s.agent_listeners(), 3);
        // The first heartbeat goes at once.
        assert_eq!(s.poll_timeout(), Some(t));
        s.handle_timeout(t).unwrap();
        assert_eq!(
            actions(&mut s),
            [ProxyAction::Send(ProxyFrame::Heartbeat { seq: 1 }), ProxyAction::RetryConflicts]
        );
    }

    #[test]
    fn a_version_mismatch_or_a_refusal_from_the_agent_is_its_sentence() {
        // The agent refuses a control stream of another version with an error frame.
        let mismatch = Preface::check(Preface { version: crate::VERSION + 1 }.to_bytes()).unwrap_err();
        assert!(matches!(mismatch, PrefaceError::VersionMismatch { .. }));
        let mut s = ProxySession::new("p".into());
        s.connected(ListenerSet::new());
        let err = s
            .handle_frame(AgentFrame::Error { message: format!("hostnet-agent: {mismatch}") }, Instant::now())
            .unwrap_err();
        let sentence = err.to_string();
        assert!(sentence.starts_with("the agent reported: hostnet-agent: the peer speaks"), "{sentence}");
        assert!(sentence.contains("install the same hostnet release"), "{sentence}");
        assert!(!s.is_established());
    }

    #[test]
    fn frames_out_of_order_close_with_a_sentence() {
        let t = Instant::now();
        let mut s = ProxySession::new("p".into());
        s.connected(ListenerSet::new());
        let err = s.handle_frame(AgentFrame::Snapshot { listeners: vec![], more: false }, t).unwrap_err();
        assert_eq!(err.to_string(), "the agent sent a frame out of order: `snapshot` where `hello` was due");

        s.connected(ListenerSet::new());
        s.handle_frame(hello(), t).unwrap();
        let err = s.handle_frame(AgentFrame::Added { listeners: vec![tcp(1)] }, t).unwrap_err();
        assert_eq!(err.to_string(), "the agent sent a frame out of order: `added` where `snapshot` was due");
        assert!(
            actions(&mut s).iter().all(|a| !matches!(a, ProxyAction::Add(_))),
            "the delta was not applied"
        );

        s.connected(ListenerSet::new());
        let err =
            s.handle_frame(AgentFrame::Hello { role: Role::Proxy, software: "x".into() }, t).unwrap_err();
        assert!(err.to_string().contains("role `Proxy`"), "{err}");
    }

    #[test]
    fn deltas_change_the_table_and_cannot_outgrow_a_snapshot() {
        let t = Instant::now();
        let mut s = established(t, &[1, 2]);
        s.handle_frame(AgentFrame::Added { listeners: vec![tcp(3), tcp(0)] }, t).unwrap();
        s.handle_frame(AgentFrame::Removed { listeners: vec![tcp(1)] }, t).unwrap();
        s.handle_frame(AgentFrame::Heartbeat { seq: 5 }, t).unwrap();
        s.handle_frame(AgentFrame::Hello { role: Role::Agent, software: "again".into() }, t).unwrap();
        assert_eq!(
            actions(&mut s),
            [
                ProxyAction::Add(vec![tcp(3)]),
                ProxyAction::Remove(vec![tcp(1)]),
                ProxyAction::Send(ProxyFrame::HeartbeatAck { seq: 5 }),
            ]
        );
        assert_eq!(s.agent_listeners(), 2);
        let flood: Vec<Listener> = (1..=u16::MAX)
            .flat_map(|port| {
                (0..9u8).map(move |i| Listener { proto: Proto::Tcp, addr: [127, 0, 0, i + 1].into(), port })
            })
            .collect();
        let mut result = Ok(());
        for listeners in flood.chunks(LISTENERS_PER_FRAME) {
            result = s.handle_frame(AgentFrame::Added { listeners: listeners.to_vec() }, t);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(ProxySessionError::TooManyListeners(MAX_SNAPSHOT_LISTENERS)));
        assert!(s.agent_listeners() <= MAX_SNAPSHOT_LISTENERS);
    }

    #[test]
    fn a_snapshot_after_reconnect_replaces_everything_and_nothing_goes_stale() {
        let t = Instant::now();
        let mut s = established(t, &[1, 2]);
        assert!(s.disconnected(t + Duration::from_secs(1)), "it was established");
        // Back within STALE_AFTER: a failed attempt first, then a good one.
        s.connected(ListenerSet::new());
        assert!(!s.disconnected(t + Duration::from_secs(2)));
        s.connected(ListenerSet::new());
        let back = t + Duration::from_secs(3);
        s.handle_frame(hello(), back).unwrap();
        s.handle_frame(AgentFrame::Snapshot { listeners: vec![tcp(7)], more: false }, back).unwrap();
        let got = actions(&mut s);
        assert!(got.contains(&ProxyAction::ReplaceAll(set(&[7]))), "{got:?}");
        assert_eq!(s.agent_listeners(), 1);
        // The stale timer of the lost stream does not close the new one's ports.
        for secs in [4, 6, 8] {
            let now = t + Duration::from_secs(secs);
            s.handle_timeout(now).unwrap();
            s.handle_frame(AgentFrame::HeartbeatAck { seq: 1 }, now).unwrap();
        }
        assert!(!actions(&mut s).contains(&ProxyAction::CloseStale));
        assert_eq!(s.agent_listeners(), 1);
    }

    #[test]
    fn stale_ports_stay_for_stale_after_then_close_once() {
        let t = Instant::now();
        let mut s = established(t, &[1]);
        s.disconnected(t);
        assert_eq!(s.poll_timeout(), Some(t + STALE_AFTER));
        s.handle_timeout(t + STALE_AFTER - Duration::from_millis(1)).unwrap();
        assert_eq!(actions(&mut s), [], "kept while the agent may come back");
        // Failed attempts meanwhile do not push the deadline back.
        s.connected(ListenerSet::new());
        s.disconnected(t + Duration::from_secs(3));
        actions(&mut s);
        assert_eq!(s.poll_timeout(), Some(t + STALE_AFTER));
        s.handle_timeout(t + STALE_AFTER).unwrap();
        assert_eq!(actions(&mut s), [ProxyAction::CloseStale]);
        assert_eq!(s.agent_listeners(), 0);
        assert_eq!(s.poll_timeout(), None);
        s.connected(ListenerSet::new());
        s.disconnected(t + Duration::from_secs(20));
        s.handle_timeout(t + Duration::from_secs(60)).unwrap();
        assert!(!actions(&mut s).contains(&ProxyAction::CloseStale), "closed once");
    }

    #[test]
    fn the_stale_timer_runs_while_an_attempt_waits_for_the_agent() {
        let t = Instant::now();
        let mut s = established(t, &[1]);
        s.disconnected(t);
        // A stopped agent accepts the stream but never says hello.
        s.connected(ListenerSet::new());
        s.handle_timeout(t + STALE_AFTER).unwrap();
        assert!(actions(&mut s).contains(&ProxyAction::CloseStale));
    }

    #[test]
    fn heartbeat_loss_closes_after_the_timeout() {
        let t = Instant::now();
        let mut s = established(t, &[1]);
        let mut now;
        let mut seqs = Vec::new();
        let err = loop {
            now = s.poll_timeout().unwrap();
            assert!(now <= t + Duration::from_secs(60), "never closed");
            match s.handle_timeout(now) {
                Ok(()) => {
                    for a in actions(&mut s) {
                        if let ProxyAction::Send(ProxyFrame::Heartbeat { seq }) = a {
                            seqs.push(seq);
                        }
                    }
                }
                Err(e) => break e,
            }
        };
        assert_eq!(err.to_string(), "the agent stopped answering heartbeats for 8s");
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        assert!(now - t > HEARTBEAT_TIMEOUT && now - t <= HEARTBEAT_TIMEOUT + HEARTBEAT_INTERVAL);

        // Answers keep it alive.
        let mut s = established(t, &[1]);
        for i in 0..20u32 {
            let now = t + HEARTBEAT_INTERVAL * i;
            s.handle_timeout(now).unwrap();
            s.handle_frame(AgentFrame::HeartbeatAck { seq: u64::from(i) }, now).unwrap();
        }
    }

    #[test]
    fn a_snapshot_that_never_completes_times_out() {
        let t = Instant::now();
        let mut s = ProxySession::new("p".into());
        s.connected(ListenerSet::new());
        s.handle_frame(hello(), t).unwrap();
        s.handle_frame(AgentFrame::Snapshot { listeners: vec![tcp(1)], more: true }, t).unwrap();
        assert_eq!(s.poll_timeout(), Some(t + SNAPSHOT_TIMEOUT));
        s.handle_timeout(t + Duration::from_secs(1)).unwrap();
        let err = s.handle_timeout(t + SNAPSHOT_TIMEOUT).unwrap_err();
        assert_eq!(err.to_string(), "the agent sent no complete snapshot within 10s");
    }

    #[test]
    fn desktop_listener_changes_go_to_the_agent_batched() {
        let t = Instant::now();
        let mut s = established(t, &[]);
        s.handle_timeout(t).unwrap(); // the first heartbeat
        actions(&mut s);
        s.host_listeners(set(&[80]), t);
        s.host_listeners(set(&[80, 81]), t + Duration::from_millis(5));
        assert_eq!(s.poll_timeout(), Some(t + HOST_BATCH));
        s.handle_timeout(t + HOST_BATCH).unwrap();
        assert_eq!(
            actions(&mut s),
            [ProxyAction::Send(ProxyFrame::HostAdded { listeners: vec![tcp(80), tcp(81)] })]
        );
        s.host_listeners(set(&[81]), t + Duration::from_millis(20));
        s.handle_timeout(t + Duration::from_millis(30)).unwrap();
        assert_eq!(
            actions(&mut s),
            [ProxyAction::Send(ProxyFrame::HostRemoved { listeners: vec![tcp(80)] })]
        );
    }

    #[test]
    fn the_agent_says_hello_sends_its_snapshot_in_parts_then_deltas() {
        let t = Instant::now();
        let many: ListenerSet = (1..=LISTENERS_PER_FRAME as u16 + 1).map(tcp).collect();
        let mut a = AgentSession::new("hostnet-agent 9".into(), many.clone(), t);
        let sent = agent_actions(&mut a);
        assert_eq!(
            sent.first(),
            Some(&AgentAction::Send(AgentFrame::Hello {
                role: Role::Agent,
                software: "hostnet-agent 9".into()
            }))
        );
        let parts: Vec<bool> = sent
            .iter()
            .filter_map(|a| match a {
                AgentAction::Send(AgentFrame::Snapshot { more, .. }) => Some(*more),
                _ => None,
            })
            .collect();
        assert_eq!(parts, [true, false]);
        let mut next = many.clone();
        next.remove(&tcp(1));
        next.insert(tcp(60_000));
        a.listeners_changed(next.clone());
        assert_eq!(
            agent_actions(&mut a),
            [
                AgentAction::Send(AgentFrame::Removed { listeners: vec![tcp(1)] }),
                AgentAction::Send(AgentFrame::Added { listeners: vec![tcp(60_000)] }),
            ]
        );
        a.listeners_changed(next);
        assert_eq!(agent_actions(&mut a), [], "no change, no frame");
    }

    #[test]
    fn the_agent_answers_heartbeats_applies_host_listeners_and_drops_a_silent_proxy() {
        let t = Instant::now();
        let mut a = AgentSession::new("a".into(), ListenerSet::new(), t);
        agent_actions(&mut a);
        let later = t + Duration::from_secs(10);
        a.handle_frame(ProxyFrame::Hello { role: Role::Proxy, software: "p".into() }, t).unwrap();
        a.handle_frame(ProxyFrame::HostSnapshot { listeners: vec![tcp(80)], more: true }, t).unwrap();
        a.handle_frame(ProxyFrame::HostSnapshot { listeners: vec![tcp(81), tcp(0)], more: false }, t)
            .unwrap();
        a.handle_frame(ProxyFrame::HostAdded { listeners: vec![tcp(82)] }, t).unwrap();
        a.handle_frame(ProxyFrame::HostRemoved { listeners: vec![tcp(80)] }, t).unwrap();
        a.handle_frame(ProxyFrame::Heartbeat { seq: 9 }, later).unwrap();
        a.handle_frame(ProxyFrame::Error { message: "bye".into() }, later).unwrap();
        assert_eq!(
            agent_actions(&mut a),
            [
                AgentAction::ProxyHello { software: "p".into() },
                AgentAction::SetHost(set(&[80, 81])),
                AgentAction::SetHost(set(&[80, 81, 82])),
                AgentAction::SetHost(set(&[81, 82])),
                AgentAction::Send(AgentFrame::HeartbeatAck { seq: 9 }),
                AgentAction::ProxyReported("bye".into()),
            ]
        );
        assert_eq!(a.poll_timeout(), later + CONTROL_IDLE_TIMEOUT);
        a.handle_timeout(later + Duration::from_secs(14)).unwrap();
        let err = a.handle_timeout(later + CONTROL_IDLE_TIMEOUT).unwrap_err();
        assert_eq!(err.to_string(), "the peer sent nothing for 15s");
    }

    #[test]
    fn endless_snapshot_parts_close_either_side_with_a_sentence() {
        let t = Instant::now();
        let part: Vec<Listener> = (1..=LISTENERS_PER_FRAME as u16).map(tcp).collect();
        let mut proxy = ProxySession::new("p".into());
        proxy.connected(ListenerSet::new());
        proxy.handle_frame(hello(), t).unwrap();
        let err = loop {
            if let Err(e) =
                proxy.handle_frame(AgentFrame::Snapshot { listeners: part.clone(), more: true }, t)
            {
                break e;
            }
        };
        assert_eq!(err, ProxySessionError::SnapshotTooLarge(SnapshotTooLarge));
        assert!(err.to_string().contains("snapshot has more than"), "{err}");
        assert!(actions(&mut proxy).iter().all(|a| !matches!(a, ProxyAction::ReplaceAll(_))));

        let mut agent = AgentSession::new("a".into(), ListenerSet::new(), t);
        let err = loop {
            if let Err(e) =
                agent.handle_frame(ProxyFrame::HostSnapshot { listeners: part.clone(), more: true }, t)
            {
                break e;
            }
        };
        assert_eq!(err, AgentSessionError::HostSnapshotTooLarge(SnapshotTooLarge));
        assert!(agent_actions(&mut agent).iter().all(|a| !matches!(a, AgentAction::SetHost(_))));
    }

    /// Both machines talking through encoded frames, as over a stream: the proxy ends up
    /// forwarding the guest's listeners and the agent knows the desktop's, heartbeats flow,
    /// and an agent that goes quiet is dropped, then its ports close after STALE_AFTER.
    #[test]
    fn a_whole_session_between_the_two_machines() {
        fn wire<T: serde::Serialize + serde::de::DeserializeOwned>(frame: &T) -> T {
            let mut buf = BytesMut::new();
            encode_frame(frame, &mut buf).unwrap();
            FrameDecoder.decode(&mut buf).unwrap().unwrap()
        }
        #[derive(Default)]
        struct Tables {
            forwarded: ListenerSet,
            host_seen: ListenerSet,
        }
        /// Carries each side's frames to the other until both are quiet.
        fn pump(proxy: &mut ProxySession, agent: &mut AgentSession, tables: &mut Tables, now: Instant) {
            loop {
                let mut moved = false;
                while let Some(a) = proxy.poll_action() {
                    moved = true;
                    match a {
                        ProxyAction::Send(f) => agent.handle_frame(wire(&f), now).unwrap(),
                        ProxyAction::ReplaceAll(s) => tables.forwarded = s,
                        ProxyAction::Add(ls) => tables.forwarded.extend(ls),
                        ProxyAction::Remove(ls) => ls.iter().for_each(|l| {
                            tables.forwarded.remove(l);
                        }),
                        ProxyAction::CloseStale => tables.forwarded = ListenerSet::new(),
                        ProxyAction::Connected { .. } | ProxyAction::RetryConflicts => {}
                    }
                }
                while let Some(a) = agent.poll_action() {
                    moved = true;
                    match a {
                        AgentAction::Send(f) => proxy.handle_frame(wire(&f), now).unwrap(),
                        AgentAction::SetHost(s) => tables.host_seen = s,
                        AgentAction::ProxyHello { .. } | AgentAction::ProxyReported(_) => {}
                    }
                }
                if !moved {
                    break;
                }
            }
        }
        let t = Instant::now();
        let mut tables = Tables::default();
        let mut proxy = ProxySession::new("p".into());
        proxy.connected(set(&[5432]));
        let mut agent = AgentSession::new("a".into(), set(&[8000, 8001]), t);
        pump(&mut proxy, &mut agent, &mut tables, t);
        assert!(proxy.is_established());
        assert_eq!(tables.forwarded, set(&[8000, 8001]));
        assert_eq!(tables.host_seen, set(&[5432]));
        agent.listeners_changed(set(&[8001, 9000]));
        let mut now = t;
        for _ in 0..10 {
            now += Duration::from_secs(1);
            proxy.handle_timeout(now).unwrap();
            agent.handle_timeout(now).unwrap();
            pump(&mut proxy, &mut agent, &mut tables, now);
        }
        assert_eq!(tables.forwarded, set(&[8001, 9000]));
        // The agent freezes: its side stops answering.
        let err = loop {
            now += Duration::from_secs(1);
            if let Err(e) = proxy.handle_timeout(now) {
                break e;
            }
            while proxy.poll_action().is_some() {}
        };
        assert_eq!(err, ProxySessionError::Silent(HEARTBEAT_TIMEOUT));
        proxy.disconnected(now);
        assert_eq!(tables.forwarded, set(&[8001, 9000]), "kept for the agent to come back");
        proxy.handle_timeout(now + STALE_AFTER).unwrap();
        while let Some(a) = proxy.poll_action() {
            if a == ProxyAction::CloseStale {
                tables.forwarded = ListenerSet::new();
            }
        }
        assert!(tables.forwarded.is_empty());
    }
}

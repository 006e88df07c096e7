//! Guest listeners and the set the agent advertises.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// Transport-layer protocol of a listener or stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    Tcp,
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One listening socket: the address it is bound to and its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
}

impl Listener {
    /// Whether hostnet forwards this listener: bound to a wildcard or a loopback address.
    /// Listeners on other addresses (say the VM's own LAN address) are left alone.
    pub fn is_forwardable(&self) -> bool {
        self.port != 0 && (self.addr.is_unspecified() || self.addr.is_loopback())
    }

    /// The address a relay inside the guest connects to for this listener: its loopback twin
    /// when it is bound to a wildcard, else its own address.
    pub fn connect_addr(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            other => other,
        }
    }
}

/// The set of listeners one side advertises. Ordered, so diffs and logs are stable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerSet(BTreeSet<Listener>);

impl ListenerSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, l: Listener) -> bool {
        self.0.insert(l)
    }

    pub fn remove(&mut self, l: &Listener) -> bool {
        self.0.remove(l)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Listener> {
        self.0.iter()
    }

    /// `(added, removed)` going from `self` to `next`.
    pub fn diff(&self, next: &ListenerSet) -> (Vec<Listener>, Vec<Listener>) {
        let added = next.0.difference(&self.0).copied().collect();
        let removed = self.0.difference(&next.0).copied().collect();
        (added, removed)
    }

    /// The distinct `(proto, port)` pairs present.
    pub fn ports(&self) -> BTreeSet<(Proto, u16)> {
        self.0.iter().map(|l| (l.proto, l.port)).collect()
    }

    /// Where in the guest a client of the given family should be relayed for `proto`/`port`:
    /// a listener of the client's own family if there is one, else any listener of the port.
    /// `None` when nothing listens there.
    pub fn target_for(&self, proto: Proto, port: u16, client_v6: bool) -> Option<IpAddr> {
        let mut fallback = None;
        for l in self.0.iter().filter(|l| l.proto == proto && l.port == port) {
            let addr = l.connect_addr();
            if addr.is_ipv6() == client_v6 {
                return Some(addr);
            }
            fallback.get_or_insert(addr);
        }
        fallback
    }
}

impl FromIterator<Listener> for ListenerSet {
    fn from_iter<I: IntoIterator<Item = Listener>>(iter: I) -> Self {
        ListenerSet(iter.into_iter().collect())
    }
}

impl Extend<Listener> for ListenerSet {
    fn extend<I: IntoIterator<Item = Listener>>(&mut self, iter: I) {
        self.0.extend(iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(addr: &str, port: u16) -> Listener {
        Listener { proto: Proto::Tcp, addr: addr.parse().unwrap(), port }
    }

    #[test]
    fn forwardable_means_wildcard_or_loopback() {
        assert!(tcp("0.0.0.0", 80).is_forwardable());
        assert!(tcp("::", 80).is_forwardable());
        assert!(tcp("127.0.0.1", 80).is_forwardable());
        assert!(tcp("127.0.0.53", 53).is_forwardable());
        assert!(tcp("::1", 80).is_forwardable());
        assert!(!tcp("10.0.2.15", 80).is_forwardable());
        assert!(!tcp("0.0.0.0", 0).is_forwardable());
    }

    #[test]
    fn diff_reports_both_ways() {
        let a: ListenerSet = [tcp("0.0.0.0", 1), tcp("::", 2)].into_iter().collect();
        let b: ListenerSet = [tcp("::", 2), tcp("::1", 3)].into_iter().collect();
        assert_eq!(a.diff(&b), (vec![tcp("::1", 3)], vec![tcp("0.0.0.0", 1)]));
        assert_eq!(a.diff(&a), (vec![], vec![]));
    }

    #[test]
    fn target_prefers_the_clients_family() {
        let s: ListenerSet = [tcp("0.0.0.0", 80), tcp("::", 80), tcp("::1", 81)].into_iter().collect();
        assert_eq!(s.target_for(Proto::Tcp, 80, false), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(s.target_for(Proto::Tcp, 80, true), Some("::1".parse().unwrap()));
        // An IPv6-only listener still serves an IPv4 client on the host.
        assert_eq!(s.target_for(Proto::Tcp, 81, false), Some("::1".parse().unwrap()));
        assert_eq!(s.target_for(Proto::Tcp, 82, false), None);
        assert_eq!(s.target_for(Proto::Udp, 80, false), None);
    }
}

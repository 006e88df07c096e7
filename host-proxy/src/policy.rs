//! What the guest may reach and take on the desktop, as settings: the guest→host policy
//! (which of the desktop's listening sockets the guest may reach) and the limits on the host
//! ports its listeners take ([`ForwardLimits`]). Pure — no sockets: the settings types, their
//! validation, and [`decide`], which the proxy applies to what it advertises and so to every
//! guest→host stream it serves.
//!
//! Safe by default (`docs/security.md`): the guest is hostile, and a
//! desktop's loopback holds other users' databases, browsers' debugging ports, the DNS stub on
//! `127.0.0.53`, `ssh -D` proxies into the LAN. So the guest reaches only
//! - listeners of the desktop user the proxy runs as (others' and unknown owners' need
//!   [`GuestToHostPolicy::other_users`]);
//! - bound to `127.0.0.1`, `::1` or a wildcard — the proxy connects to `127.0.0.1`/`::1` only,
//!   never to the rest of `127/8`;
//! - on ports from [`FIRST_UNPRIVILEGED_PORT`] up, unless `allow_ports` names them;
//! - never on a port `deny_ports` names, and only on `allow_ports` when `only_allowed`.

use std::fmt;
use std::net::IpAddr;

use hostnet_protocol::Listener;

pub use hostnet_admin::settings::{
    FIRST_UNPRIVILEGED_PORT, ForwardLimits, GuestToHostPolicy, MAX_EPHEMERAL_FORWARDS, MAX_FORWARDED_PORTS,
};

/// Why a desktop listener is not offered to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withheld {
    /// Bound to an address the proxy never connects to (say `127.0.0.53`).
    Address(IpAddr),
    /// `deny_ports` names the port.
    DenyList,
    /// Another desktop user's listener (`Some(false)`) or one whose owner is unknown (`None`).
    Owner(Option<bool>),
    /// Below [`FIRST_UNPRIVILEGED_PORT`] and not in `allow_ports`.
    Privileged,
    /// `only_allowed` is on and `allow_ports` does not name it.
    NotAllowed,
}

impl fmt::Display for Withheld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Withheld::Address(ip) => write!(
                f,
                "bound to {ip}: the guest reaches only servers on 127.0.0.1, ::1 or a wildcard address"
            ),
            Withheld::DenyList => f.write_str("listed in guest_to_host_policy.deny_ports"),
            Withheld::Owner(Some(_)) => f.write_str(
                "owned by another user of this machine (guest_to_host_policy.other_users = true offers it)",
            ),
            Withheld::Owner(None) => {
                f.write_str("its owner is unknown (guest_to_host_policy.other_users = true offers it)")
            }
            Withheld::Privileged => write!(
                f,
                "a system port (below {FIRST_UNPRIVILEGED_PORT}): guest_to_host_policy.allow_ports offers it"
            ),
            Withheld::NotAllowed => {
                f.write_str("not in guest_to_host_policy.allow_ports, and only_allowed is on")
            }
        }
    }
}

/// The policy's answer for one desktop listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Denied(Withheld),
}

/// Whether the guest may reach `listener`, owned by this desktop user (`Some(true)`), another
/// (`Some(false)`) or nobody knows (`None`).
pub fn decide(listener: &Listener, owner: Option<bool>, policy: &GuestToHostPolicy) -> Decision {
    let reached_address = listener.addr.is_unspecified()
        || listener.addr == IpAddr::from(std::net::Ipv4Addr::LOCALHOST)
        || listener.addr == IpAddr::from(std::net::Ipv6Addr::LOCALHOST);
    let port = listener.port;
    let withheld = if !reached_address {
        Some(Withheld::Address(listener.addr))
    } else if policy.denies(port) {
        Some(Withheld::DenyList)
    } else if owner != Some(true) && !policy.other_users {
        Some(Withheld::Owner(owner))
    } else if policy.only_allowed && !policy.allows(port) {
        Some(Withheld::NotAllowed)
    } else if port < FIRST_UNPRIVILEGED_PORT && !policy.allows(port) {
        Some(Withheld::Privileged)
    } else {
        None
    };
    withheld.map_or(Decision::Allowed, Decision::Denied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::PortRange;
    use hostnet_protocol::Proto;

    fn tcp(addr: &str, port: u16) -> Listener {
        Listener { proto: Proto::Tcp, addr: addr.parse().unwrap(), port }
    }

    fn ranges(list: &[&str]) -> Vec<PortRange> {
        list.iter().map(|r| r.parse().unwrap()).collect()
    }

    const MINE: Option<bool> = Some(true);

    #[test]
    fn by_default_only_this_users_unprivileged_loopback_listeners() {
        let p = GuestToHostPolicy::default();
        for addr in ["127.0.0.1", "::1", "0.0.0.0", "::"] {
            assert_eq!(decide(&tcp(addr, 8080), MINE, &p), Decision::Allowed, "{addr}");
        }
        assert_eq!(
            decide(&tcp("127.0.0.53", 5353), MINE, &p),
            Decision::Denied(Withheld::Address("127.0.0.53".parse().unwrap()))
        );
        assert_eq!(
            decide(&tcp("127.0.0.1", 8080), Some(false), &p),
            Decision::Denied(Withheld::Owner(Some(false)))
        );
        assert_eq!(decide(&tcp("127.0.0.1", 8080), None, &p), Decision::Denied(Withheld::Owner(None)));
        assert_eq!(decide(&tcp("127.0.0.1", 631), MINE, &p), Decision::Denied(Withheld::Privileged));
        assert_eq!(decide(&tcp("127.0.0.1", 1023), MINE, &p), Decision::Denied(Withheld::Privileged));
        assert_eq!(decide(&tcp("127.0.0.1", 1024), MINE, &p), Decision::Allowed);
    }

    #[test]
    fn allow_and_deny_lists() {
        let p = GuestToHostPolicy {
            allow_ports: ranges(&["80", "600-700", "9222"]),
            deny_ports: ranges(&["9222", "2375"]),
            ..Default::default()
        };
        assert_eq!(decide(&tcp("127.0.0.1", 80), MINE, &p), Decision::Allowed, "allowed below 1024");
        assert_eq!(decide(&tcp("127.0.0.1", 631), MINE, &p), Decision::Allowed, "in an allowed range");
        assert_eq!(decide(&tcp("127.0.0.1", 22), MINE, &p), Decision::Denied(Withheld::Privileged));
        assert_eq!(
            decide(&tcp("127.0.0.1", 9222), MINE, &p),
            Decision::Denied(Withheld::DenyList),
            "deny wins"
        );
        assert_eq!(decide(&tcp("::", 2375), MINE, &p), Decision::Denied(Withheld::DenyList));
        assert_eq!(decide(&tcp("127.0.0.1", 8080), MINE, &p), Decision::Allowed, "not only_allowed");
        let only = GuestToHostPolicy { only_allowed: true, ..p };
        assert_eq!(decide(&tcp("127.0.0.1", 8080), MINE, &only), Decision::Denied(Withheld::NotAllowed));
        assert_eq!(decide(&tcp("127.0.0.1", 650), MINE, &only), Decision::Allowed);
    }

    #[test]
    fn other_users_only_when_asked_and_never_past_the_address_or_deny_list() {
        let p = GuestToHostPolicy { other_users: true, deny_ports: ranges(&["5432"]), ..Default::default() };
        assert_eq!(decide(&tcp("127.0.0.1", 8080), Some(false), &p), Decision::Allowed);
        assert_eq!(decide(&tcp("127.0.0.1", 8080), None, &p), Decision::Allowed);
        assert_eq!(decide(&tcp("127.0.0.1", 5432), Some(false), &p), Decision::Denied(Withheld::DenyList));
        assert_eq!(decide(&tcp("127.0.0.1", 443), Some(false), &p), Decision::Denied(Withheld::Privileged));
        assert!(matches!(
            decide(&tcp("127.1.2.3", 8080), Some(false), &p),
            Decision::Denied(Withheld::Address(_))
        ));
        assert!(matches!(decide(&tcp("10.0.0.1", 8080), MINE, &p), Decision::Denied(Withheld::Address(_))));
    }

    #[test]
    fn only_allowed_without_a_list_is_refused_with_its_key() {
        let p = GuestToHostPolicy { only_allowed: true, ..Default::default() };
        let (key, message) = p.validate().unwrap_err();
        assert_eq!(key, "guest_to_host_policy");
        assert!(message.contains("allow_ports"), "{message}");
        assert!(GuestToHostPolicy::default().validate().is_ok());
    }

    #[test]
    fn every_reason_is_a_sentence_naming_what_changes_it() {
        for (w, words) in [
            (Withheld::Address("127.0.0.53".parse().unwrap()), "127.0.0.53"),
            (Withheld::DenyList, "deny_ports"),
            (Withheld::Owner(Some(false)), "other_users"),
            (Withheld::Owner(None), "other_users"),
            (Withheld::Privileged, "allow_ports"),
            (Withheld::NotAllowed, "only_allowed"),
        ] {
            assert!(w.to_string().contains(words), "{w}");
        }
    }
}

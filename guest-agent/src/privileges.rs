//! After start-up the agent keeps only the capabilities it still uses, so a flaw in it cannot
//! be turned into more than that.
//!
//! Start-up (before the drop) loads and attaches the listener-events BPF programs (`CAP_BPF`,
//! `CAP_PERFMON`, or `CAP_SYS_ADMIN` on older kernels). What the agent does afterwards, and what
//! it needs for it:
//!
//! - reading the listener table (netlink `sock_diag`), reading the BPF ring it already holds,
//!   connecting to guest servers, serving its transport: nothing;
//! - guest→host (only when it is configured): running `nft`, opening `IP_TRANSPARENT` sockets
//!   (one per UDP flow, at run time) and marking its own sockets (`SO_MARK`):
//!   `CAP_NET_ADMIN`;
//! - binding its transport on a port below 1024 (TCP or vsock), which happens after the drop:
//!   `CAP_NET_BIND_SERVICE`, only then.
//!
//! Everything else leaves the effective, permitted, inheritable and bounding sets, and
//! `PR_SET_NO_NEW_PRIVS` is set, so nothing the agent runs can gain privileges by `execve`.
//! The kept capabilities are also made ambient: `nft`, the one program the agent runs, gets
//! them even when the agent is not root (as root it gets its bounding set anyway).
//!
//! With `--user`, the agent first becomes its own unprivileged user ([`crate::user`]), keeping
//! its capabilities across the change, and the drop then leaves that user with only the kept
//! ones: the agent no longer owns root's files, and `nft` runs as that user with the ambient
//! `CAP_NET_ADMIN`.
//!
//! Capabilities belong to each thread, and new threads copy them from the thread that starts
//! them: the drop must happen while the process has one thread, before the async runtime starts.

use std::fmt;

use caps::{CapSet, Capability, CapsHashSet};
use hostnet_net::TransportSpec;

/// The capabilities the agent needs after start-up, given what it was asked to do.
pub fn needed(guest_to_host: bool, transport: &TransportSpec) -> CapsHashSet {
    let mut keep = CapsHashSet::new();
    if guest_to_host {
        keep.insert(Capability::CAP_NET_ADMIN);
    }
    let low_port = match transport {
        TransportSpec::Tcp(addr) => addr.port() != 0 && addr.port() < 1024,
        TransportSpec::Vsock { port, .. } => *port < 1024,
        // Hyper-V specs are for Windows hosts; an agent never listens on one.
        TransportSpec::Unix(_) | TransportSpec::Hybrid { .. } | TransportSpec::HyperV { .. } => false,
    };
    if low_port {
        keep.insert(Capability::CAP_NET_BIND_SERVICE);
    }
    keep
}

/// What [`drop_all_but`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Capabilities still effective (and permitted) afterwards, by number.
    pub kept: Vec<Capability>,
    /// How many permitted capabilities were given up.
    pub dropped: usize,
    /// Whether the bounding set could be cut down (needs `CAP_SETPCAP`, which root has).
    pub bounding: bool,
    /// Whether the kept capabilities are ambient (passed on to `nft`).
    pub ambient: bool,
}

impl Dropped {
    /// The kept capabilities as a list for people: "CAP_NET_ADMIN", or "no capabilities".
    pub fn kept_names(&self) -> String {
        if self.kept.is_empty() {
            return "no capabilities".to_owned();
        }
        self.kept.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dropped == 0 && self.kept.is_empty() {
            return f.write_str("no capabilities to drop (not privileged); no_new_privs set");
        }
        let kept = if self.kept.is_empty() { "none".to_owned() } else { self.kept_names() };
        write!(f, "dropped {} capabilities, kept: {kept}; no_new_privs set", self.dropped)?;
        if !self.bounding {
            f.write_str("; bounding set unchanged (no CAP_SETPCAP)")?;
        }
        if !self.kept.is_empty() && !self.ambient {
            f.write_str("; kept capabilities not ambient (nft gets them only as root)")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "the process already runs {0} threads; capabilities are per thread, so they must be dropped \
         before any other thread starts"
    )]
    Threads(usize),
    #[error("{what}: {source}")]
    Caps { what: &'static str, source: caps::errors::CapsError },
    #[error("{what}: {source}")]
    Os { what: &'static str, source: std::io::Error },
    #[error("after dropping, {set} still holds {extra}")]
    Left { set: &'static str, extra: String },
}

/// Drops every capability not in `keep` from this process's effective, permitted, inheritable
/// and bounding sets, makes the kept ones ambient, and sets `PR_SET_NO_NEW_PRIVS`. Without
/// capabilities (not root) it only sets `no_new_privs`. Must be called while the process has a
/// single thread.
pub fn drop_all_but(keep: &CapsHashSet) -> Result<Dropped, PrivilegeError> {
    let threads = thread_count();
    if threads > 1 {
        return Err(PrivilegeError::Threads(threads));
    }
    let caps_err = |what| move |source| PrivilegeError::Caps { what, source };
    let permitted = caps::read(None, CapSet::Permitted).map_err(caps_err("reading the permitted set"))?;
    let kept: CapsHashSet = permitted.iter().copied().filter(|c| keep.contains(c)).collect();
    let dropped = permitted.len() - kept.len();

    // The bounding set first: cutting it needs CAP_SETPCAP, itself about to go. Every index the
    // kernel knows goes, including ones newer than the `caps` crate.
    let effective = caps::read(None, CapSet::Effective).map_err(caps_err("reading the effective set"))?;
    let bounding = effective.contains(&Capability::CAP_SETPCAP);
    if bounding {
        for index in 0..=last_cap() {
            if keep.iter().any(|c| u32::from(c.index()) == index) {
                continue;
            }
            // SAFETY: PR_CAPBSET_READ/DROP take plain integers and touch no memory of ours.
            let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(index), 0, 0, 0) };
            if present == 1 {
                // SAFETY: as above.
                if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(index), 0, 0, 0) } != 0 {
                    let source = std::io::Error::last_os_error();
                    return Err(PrivilegeError::Os { what: "dropping from the bounding set", source });
                }
            }
        }
    }
    // Inheritable (needed for ambient), then effective, then permitted: the effective set must
    // stay within the permitted one at every step.
    caps::set(None, CapSet::Inheritable, &kept).map_err(caps_err("setting the inheritable set"))?;
    caps::set(None, CapSet::Effective, &kept).map_err(caps_err("setting the effective set"))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(caps_err("setting the permitted set"))?;
    // Ambient: clear what is not kept, raise what is. Kernels before 4.3 have no ambient set;
    // root's children get the kept capabilities through the bounding set then.
    let mut ambient = caps::clear(None, CapSet::Ambient).is_ok();
    for &cap in &kept {
        ambient &= caps::raise(None, CapSet::Ambient, cap).is_ok();
    }
    set_no_new_privs()?;

    // Check rather than trust.
    for (set, name) in [(CapSet::Effective, "the effective set"), (CapSet::Permitted, "the permitted set")] {
        let now = caps::read(None, set).map_err(caps_err("reading back"))?;
        let extra: Vec<String> = now.difference(&kept).map(ToString::to_string).collect();
        if !extra.is_empty() {
            return Err(PrivilegeError::Left { set: name, extra: extra.join(", ") });
        }
    }
    let mut kept: Vec<Capability> = kept.into_iter().collect();
    kept.sort_by_key(|c| c.index());
    Ok(Dropped { kept, dropped, bounding, ambient })
}

fn set_no_new_privs() -> Result<(), PrivilegeError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) } != 0 {
        let source = std::io::Error::last_os_error();
        return Err(PrivilegeError::Os { what: "setting no_new_privs", source });
    }
    Ok(())
}

/// The highest capability index this kernel knows (`/proc/sys/kernel/cap_last_cap`; 40 on
/// Linux 5.9 to 6.x when it cannot be read).
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Threads of this process (1 when `/proc` cannot say otherwise).
pub(crate) fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_guest_to_host_and_low_ports_keep_anything() {
        let unix: TransportSpec = "unix:/run/hostnet/agent.sock".parse().unwrap();
        assert!(needed(false, &unix).is_empty());
        assert_eq!(needed(true, &unix), CapsHashSet::from([Capability::CAP_NET_ADMIN]));
        let vsock: TransportSpec = "vsock:any:1024".parse().unwrap();
        assert!(needed(false, &vsock).is_empty());
        let low: TransportSpec = "vsock:any:80".parse().unwrap();
        assert_eq!(needed(false, &low), CapsHashSet::from([Capability::CAP_NET_BIND_SERVICE]));
        let tcp: TransportSpec = "tcp:127.0.0.1:443".parse().unwrap();
        assert_eq!(
            needed(true, &tcp),
            CapsHashSet::from([Capability::CAP_NET_ADMIN, Capability::CAP_NET_BIND_SERVICE])
        );
        let any: TransportSpec = "tcp:127.0.0.1:0".parse().unwrap();
        assert!(needed(false, &any).is_empty(), "port 0 is not a privileged port");
    }

    #[test]
    fn the_report_names_what_was_kept() {
        let d = Dropped { kept: vec![Capability::CAP_NET_ADMIN], dropped: 40, bounding: true, ambient: true };
        assert_eq!(d.to_string(), "dropped 40 capabilities, kept: CAP_NET_ADMIN; no_new_privs set");
        let none = Dropped { kept: Vec::new(), dropped: 0, bounding: false, ambient: true };
        assert!(none.to_string().starts_with("no capabilities to drop"));
    }
}

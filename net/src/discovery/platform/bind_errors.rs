//! Why a bind was refused, in each OS's terms: the messages are chosen here from plain inputs
//! (the address, what the OS says about its ports), so the choice is tested everywhere; each
//! OS module gathers the inputs.

use std::net::SocketAddr;
use std::ops::RangeInclusive;

use hostnet_protocol::Proto;

/// Linux: `EACCES` binding a port below `net.ipv4.ip_unprivileged_port_start` (also the IPv6
/// limit; 1024 unless changed). `unprivileged_start` is the sysctl's value when it could be
/// read. `None` when the port is not below it (the refusal has another cause).
pub fn linux_low_port(addr: SocketAddr, unprivileged_start: Option<u16>) -> Option<String> {
    let start = unprivileged_start.unwrap_or(1024);
    let port = addr.port();
    (port < start).then(|| {
        format!(
            "binding {addr} needs privileges: on Linux, ports below {start} \
             (net.ipv4.ip_unprivileged_port_start) need root or the CAP_NET_BIND_SERVICE \
             capability; grant it (setcap cap_net_bind_service=+ep on hostnet-proxy), or lower \
             the limit (sysctl net.ipv4.ip_unprivileged_port_start={port})"
        )
    })
}

/// macOS (10.14 and later): any user may bind a port below 1024 on all addresses (`0.0.0.0`,
/// `::`), but binding one on a specific address — loopback included — still needs root and
/// fails with `EACCES`. `None` for a port of 1024 or above, or an all-addresses bind (the
/// refusal has another cause).
pub fn macos_low_port(addr: SocketAddr) -> Option<String> {
    (addr.port() < 1024 && !addr.ip().is_unspecified()).then(|| {
        format!(
            "binding {addr} needs root: macOS lets any user bind ports below 1024 only on all \
             addresses (0.0.0.0 or ::), not on one address such as loopback; run hostnet-proxy \
             as root, or forward the port on all addresses (this exposes it to the network)"
        )
    })
}

/// Windows: `WSAEACCES` (10013) binding `addr`. Most often the port is inside a range Windows
/// excludes (reserved by Hyper-V, WinNAT or Docker, often right after an update or at boot);
/// else another program holds the port with `SO_EXCLUSIVEADDRUSE`. `excluded` is the list
/// `netsh` printed, when it could be run.
pub fn windows_access_denied(
    proto: Proto,
    addr: SocketAddr,
    excluded: Option<&[RangeInclusive<u16>]>,
) -> String {
    let port = addr.port();
    let family = if addr.is_ipv6() { "ipv6" } else { "ipv4" };
    let show = format!("netsh int {family} show excludedportrange protocol={}", proto_name(proto));
    match excluded.and_then(|ranges| ranges.iter().find(|r| r.contains(&port))) {
        Some(range) => format!(
            "{proto} port {port} is reserved by Windows: it is inside the excluded port range \
             {}-{} (reserved by Hyper-V, WinNAT or Docker); see `{show}`, and pick a port \
             outside those ranges (restarting the winnat service often frees them: \
             `net stop winnat` then `net start winnat`, as administrator)",
            range.start(),
            range.end()
        ),
        None => {
            let ranges = if excluded.is_some() {
                "is not in an excluded port range now"
            } else {
                "may be in an excluded port range"
            };
            format!(
                "Windows denied access to {addr}: another program may hold {proto} port {port} \
                 exclusively (SO_EXCLUSIVEADDRUSE), or the port {ranges} (reserved by Hyper-V, \
                 WinNAT or Docker; see `{show}`)"
            )
        }
    }
}

/// The port ranges in `netsh int ipv4 show excludedportrange protocol=tcp`'s output: its
/// lines of two numbers (start, end), optionally followed by `*` (an administered exclusion).
/// Headings are translated on non-English Windows, so only those lines are read; `None` when
/// the text has no table at all (no line of dashes under the headings: Wine's `netsh` prints
/// nothing), so "no range" is said only when Windows said it.
pub fn parse_excluded_port_ranges(text: &str) -> Option<Vec<RangeInclusive<u16>>> {
    let is_rule = |line: &str| line.contains("---") && line.chars().all(|c| c == '-' || c.is_whitespace());
    if !text.lines().any(is_rule) {
        return None;
    }
    let ranges = text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let start: u16 = words.next()?.parse().ok()?;
            let end: u16 = words.next()?.parse().ok()?;
            let rest: Vec<&str> = words.collect();
            (start <= end && (rest.is_empty() || rest == ["*"])).then_some(start..=end)
        })
        .collect();
    Some(ranges)
}

fn proto_name(proto: Proto) -> &'static str {
    match proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn linux_names_the_sysctl_and_capability_for_low_ports_only() {
        let msg = linux_low_port(at("127.0.0.1:80"), Some(1024)).unwrap();
        assert!(msg.contains("below 1024") && msg.contains("CAP_NET_BIND_SERVICE"), "{msg}");
        assert!(msg.contains("ip_unprivileged_port_start=80"), "{msg}");
        assert!(linux_low_port(at("127.0.0.1:8080"), Some(1024)).is_none());
        assert!(linux_low_port(at("[::1]:443"), Some(0)).is_none(), "no privileged ports at all");
        assert!(linux_low_port(at("[::1]:443"), None).unwrap().contains("below 1024"), "default limit");
        assert!(linux_low_port(at("127.0.0.1:2000"), Some(3000)).unwrap().contains("below 3000"));
    }

    #[test]
    fn macos_low_ports_need_root_only_on_one_address() {
        let msg = macos_low_port(at("127.0.0.1:80")).unwrap();
        assert!(msg.contains("needs root") && msg.contains("0.0.0.0"), "{msg}");
        assert!(macos_low_port(at("[::1]:443")).is_some());
        assert!(macos_low_port(at("0.0.0.0:80")).is_none(), "all addresses: allowed, so not the cause");
        assert!(macos_low_port(at("[::]:80")).is_none());
        assert!(macos_low_port(at("127.0.0.1:1024")).is_none());
    }

    /// `netsh int ipv4 show excludedportrange protocol=tcp` on a Windows 11 machine with
    /// Hyper-V (the layout Windows prints; the numbers of one such machine).
    const NETSH: &str = "\r
Protocol tcp Port Exclusion Ranges\r
\r
Start Port    End Port\r
----------    --------\r
      1026        1125\r
      5357        5357\r
      7990        8089\r
     50000       50059     *\r
\r
* - Administered port exclusions.\r
\r
";

    #[test]
    fn netsh_ranges_are_parsed_and_headings_ignored() {
        assert_eq!(
            parse_excluded_port_ranges(NETSH),
            Some(vec![1026..=1125, 5357..=5357, 7990..=8089, 50000..=50059])
        );
        assert_eq!(parse_excluded_port_ranges(""), None, "no table (Wine's netsh): unknown, not empty");
        assert_eq!(parse_excluded_port_ranges("1026 1125\n"), None, "numbers without the table's rule");
        let none = "Start Port    End Port\n----------    --------\n\n* - Administered port exclusions.\n";
        assert_eq!(parse_excluded_port_ranges(none), Some(vec![]), "a table with no ranges");
        assert_eq!(
            parse_excluded_port_ranges("----  ----\n70000 70001\n9 8\n1 2 x\n3 4 *\n"),
            Some(vec![3..=4]),
            "bad lines skipped"
        );
    }

    #[test]
    fn windows_access_denied_names_the_excluded_range_or_both_causes() {
        let ranges = parse_excluded_port_ranges(NETSH).unwrap();
        let msg = windows_access_denied(Proto::Tcp, at("127.0.0.1:8000"), Some(&ranges));
        assert!(msg.contains("excluded port range 7990-8089"), "{msg}");
        assert!(msg.contains("netsh int ipv4 show excludedportrange protocol=tcp"), "{msg}");
        let msg = windows_access_denied(Proto::Udp, at("[::1]:9000"), Some(&ranges));
        assert!(
            msg.contains("SO_EXCLUSIVEADDRUSE") && msg.contains("is not in an excluded port range"),
            "{msg}"
        );
        assert!(msg.contains("netsh int ipv6 show excludedportrange protocol=udp"), "{msg}");
        let msg = windows_access_denied(Proto::Tcp, at("127.0.0.1:8000"), None);
        assert!(msg.contains("may be in an excluded port range"), "netsh did not run: {msg}");
    }
}

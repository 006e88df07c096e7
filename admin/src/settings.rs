//! `settings.toml`: what the user chose. Parsed strictly (unknown keys are errors) and
//! validated into sentences that name the key. No I/O: the proxy reads, saves (keeping the
//! user's comments) and watches the file; the settings window only validates a form with it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest settings file read: anything bigger is not a settings file.
pub const MAX_SETTINGS_LEN: u64 = 64 * 1024;

/// Where forwarded host ports listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindScope {
    /// `127.0.0.1` and `::1`: only this machine can connect.
    #[default]
    Loopback,
    /// `0.0.0.0` and `::`: other machines on the network can connect too (explicit opt-in).
    All,
}

/// A port or an inclusive range, written `"N"` or `"N-M"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let port = |p: &str| -> Result<u16, String> {
            match p.trim().parse::<u16>() {
                Ok(0) | Err(_) => {
                    Err(format!("{s:?} is not a port or range: use \"N\" or \"N-M\" with ports 1–65535"))
                }
                Ok(n) => Ok(n),
            }
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(s)?;
                (p, p)
            }
        };
        if first > last {
            return Err(format!("{s:?}: the range starts after it ends"));
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

// The guest's share of the desktop: `[guest_to_host_policy]` and `[limits]` (the proxy's
// `policy` module applies them).

/// Ports below this are system services' (CUPS on 631, DNS on 53, …): not offered unless
/// `allow_ports` names them.
pub const FIRST_UNPRIVILEGED_PORT: u16 = 1024;

/// The `[guest_to_host_policy]` table of `settings.toml`. Every key is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestToHostPolicy {
    /// Desktop ports the guest may reach even below 1024 (`"N"` or `"N-M"`).
    pub allow_ports: Vec<PortRange>,
    /// Desktop ports the guest never reaches, whatever else says so.
    pub deny_ports: Vec<PortRange>,
    /// Offer nothing but `allow_ports`.
    pub only_allowed: bool,
    /// Also offer listeners of other desktop users, and those whose owner the system does
    /// not tell.
    pub other_users: bool,
}

impl GuestToHostPolicy {
    /// Checks what the types cannot; names the key at fault. (Every combination of the
    /// lists is meaningful today: `deny_ports` wins where they overlap.)
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.only_allowed && self.allow_ports.is_empty() {
            return Err((
                "guest_to_host_policy",
                "only_allowed = true with an empty allow_ports offers the guest nothing: \
                 list the ports in allow_ports, or turn guest_to_host off"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// Whether `allow_ports` names `port`.
    pub fn allows(&self, port: u16) -> bool {
        self.allow_ports.iter().any(|r| r.contains(port))
    }

    /// Whether `deny_ports` names `port`.
    pub fn denies(&self, port: u16) -> bool {
        self.deny_ports.iter().any(|r| r.contains(port))
    }
}

/// Most host ports forwarded for guest ports in all (TCP and UDP counted apart): far more
/// than a development VM uses, few enough that a guest listening on every port takes a bounded
/// share of the desktop. `limits.ports` in the settings changes it.
pub const MAX_FORWARDED_PORTS: usize = 4096;
/// Most host ports forwarded inside the desktop's ephemeral range, per protocol: the range is
/// where the desktop's own outgoing connections get their source ports (Linux: 28 232 of
/// them by default), so a guest may take at most this many (under 1 %) of them.
/// `limits.ephemeral_ports` in the settings changes it.
pub const MAX_EPHEMERAL_FORWARDS: usize = 256;

/// The `[limits]` table of `settings.toml`: how much of the desktop the guest's ports may take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardLimits {
    /// Host ports forwarded in all.
    pub ports: usize,
    /// Host ports forwarded inside the desktop's ephemeral range, per protocol.
    pub ephemeral_ports: usize,
}

impl Default for ForwardLimits {
    fn default() -> Self {
        ForwardLimits { ports: MAX_FORWARDED_PORTS, ephemeral_ports: MAX_EPHEMERAL_FORWARDS }
    }
}

impl ForwardLimits {
    /// Checks the numbers are ports' worth; names the key at fault.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        const ALL_PORTS: usize = 2 * 65_535;
        if self.ports > ALL_PORTS {
            return Err((
                "limits",
                format!("limits.ports = {}: at most {ALL_PORTS} (every TCP and UDP port)", self.ports),
            ));
        }
        if self.ephemeral_ports > 65_535 {
            return Err((
                "limits",
                format!("limits.ephemeral_ports = {}: at most 65535", self.ephemeral_ports),
            ));
        }
        Ok(())
    }
}

/// The user's settings. Every key is optional; missing ones take the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// "Enable host networking": off closes every forwarded port and guest-side redirect.
    pub enabled: bool,
    /// Where forwarded ports listen on this machine.
    pub bind: BindScope,
    /// Forward UDP as well as TCP.
    pub udp: bool,
    /// Let processes in the VM reach this machine's servers as localhost:PORT.
    pub guest_to_host: bool,
    /// Guest ports never forwarded (`"N"` or `"N-M"`).
    pub ignore_ports: Vec<PortRange>,
    /// A guest port whose host port a desktop program held starts forwarding once the desktop
    /// frees it. Off: the port stays the desktop's (a desktop server that restarts gets it back).
    pub take_freed_ports: bool,
    /// Guest port → the host port it is forwarded to (default: the same number). Tables come
    /// after the plain keys, as TOML writes them.
    pub remap: BTreeMap<String, u16>,
    /// Which desktop listeners the guest may reach (`[guest_to_host_policy]`).
    pub guest_to_host_policy: GuestToHostPolicy,
    /// How many host ports the guest's listeners may take (`[limits]`).
    pub limits: ForwardLimits,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            enabled: true,
            bind: BindScope::Loopback,
            udp: true,
            guest_to_host: true,
            ignore_ports: Vec::new(),
            remap: BTreeMap::new(),
            guest_to_host_policy: GuestToHostPolicy::default(),
            take_freed_ports: false,
            limits: ForwardLimits::default(),
        }
    }
}

/// Why settings could not be read or saved; each names the file and, where it can, the key.
#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is {len} bytes; a settings file is at most {MAX_SETTINGS_LEN} bytes")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{path} is not a regular file ({kind}); settings are read only from a regular file")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String, key: Option<&'static str> },
    #[error("cannot save {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

impl SettingsError {
    /// The settings key the error is about, for a form to show it next to the field.
    pub fn key(&self) -> Option<&'static str> {
        match self {
            SettingsError::Invalid { key, .. } => *key,
            _ => None,
        }
    }
}

impl Settings {
    /// Parses and validates the text of a settings file.
    pub fn parse(text: &str, path: &Path) -> Result<Settings, SettingsError> {
        let invalid = |message: String, key| SettingsError::Invalid { path: path.to_owned(), message, key };
        let settings: Settings = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| s.start).unwrap_or(0);
            let key = key_at(text, at);
            let line = text.get(..at).unwrap_or_default().matches('\n').count() + 1;
            let what = key.map(|k| format!("{k}: ")).unwrap_or_default();
            invalid(format!("line {line}: {what}{}", e.message()), key)
        })?;
        settings.validate().map_err(|(key, message)| invalid(message, Some(key)))?;
        Ok(settings)
    }

    /// Checks what TOML types cannot: remap keys are ports, no two guest ports share a host port.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let mut seen: BTreeMap<u16, u16> = BTreeMap::new();
        for (guest, &host) in &self.remap {
            let g = match guest.parse::<u16>() {
                Ok(0) | Err(_) => {
                    return Err(("remap", format!("remap key {guest:?} is not a guest port (1–65535)")));
                }
                Ok(g) => g,
            };
            if host == 0 {
                return Err(("remap", format!("remap {g} → 0: the host port must be 1–65535")));
            }
            if let Some(other) = seen.insert(host, g) {
                return Err((
                    "remap",
                    format!("guest ports {other} and {g} are both remapped to host port {host}"),
                ));
            }
        }
        self.guest_to_host_policy.validate()?;
        self.limits.validate()
    }

    /// The host port a guest port is forwarded to, or `None` if it is ignored.
    pub fn host_port_for(&self, guest_port: u16) -> Option<u16> {
        if self.ignore_ports.iter().any(|r| r.contains(guest_port)) {
            return None;
        }
        Some(self.remap.get(&guest_port.to_string()).copied().unwrap_or(guest_port))
    }
}

impl Settings {
    /// The settings keys, in file order: the field names of [`Settings`] as serde sees them,
    /// so they are listed once (in the struct) and an error can name its field.
    pub fn keys() -> &'static [&'static str] {
        let mut fields: &'static [&'static str] = &[];
        let _ = Settings::deserialize(FieldNames(&mut fields));
        fields
    }
}

/// A deserializer that only records the field names a struct asks for.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(serde::de::Error::custom("field names recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

/// The settings key whose value contains byte `offset` of `text`: the key on that line, else
/// the table the line is in.
fn key_at(text: &str, offset: usize) -> Option<&'static str> {
    let find = |name: &str| Settings::keys().iter().copied().find(|k| *k == name.trim());
    let before = text.get(..offset.min(text.len())).unwrap_or_default();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(line_start..).unwrap_or_default().lines().next().unwrap_or_default();
    if let Some(k) = line.split_once('=').and_then(|(k, _)| find(k)) {
        return Some(k);
    }
    before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .and_then(|h| find(h.trim_matches(['[', ']'])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, SettingsError> {
        Settings::parse(text, Path::new("settings.toml"))
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").unwrap(), Settings::default());
        assert!(Settings::default().enabled && Settings::default().bind == BindScope::Loopback);
    }

    #[test]
    fn every_key_parses() {
        let s = parse(
            "enabled = false\nbind = \"all\"\nudp = false\nguest_to_host = false\nignore_ports = [\"22\", \"5000-5010\"]\n[remap]\n80 = 8080\n",
        )
        .unwrap();
        assert!(!s.enabled && !s.udp && !s.guest_to_host);
        assert_eq!(s.bind, BindScope::All);
        assert_eq!(s.host_port_for(22), None);
        assert_eq!(s.host_port_for(5005), None);
        assert_eq!(s.host_port_for(80), Some(8080));
        assert_eq!(s.host_port_for(81), Some(81));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key, words) in [
            ("enabeld = true", None, "unknown field"),
            ("enabled = \"yes\"", Some("enabled"), "enabled"),
            ("bind = \"lan\"", Some("bind"), "bind"),
            ("ignore_ports = [\"70000\"]", Some("ignore_ports"), "1–65535"),
            ("ignore_ports = [\"90-80\"]", Some("ignore_ports"), "starts after it ends"),
            ("[remap]\nx = 80", Some("remap"), "not a guest port"),
            ("[remap]\n80 = 0", Some("remap"), "host port must be"),
            ("[remap]\n80 = 9000\n81 = 9000", Some("remap"), "both remapped"),
            ("[remap]\n80 = 70000", Some("remap"), "remap"),
            ("enabled = true\nenabled = false", None, "duplicate"),
            ("not toml at all [", None, "settings.toml"),
        ] {
            let err = parse(text).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(words), "{text:?}: {msg}");
            if key.is_some() {
                assert_eq!(err.key(), key, "{text:?}: {msg}");
            }
        }
    }

    #[test]
    fn the_keys_are_the_fields_in_file_order() {
        assert_eq!(
            Settings::keys(),
            [
                "enabled",
                "bind",
                "udp",
                "guest_to_host",
                "ignore_ports",
                "take_freed_ports",
                "remap",
                "guest_to_host_policy",
                "limits"
            ]
        );
        // Every key is written out, and nothing else: the list and the file cannot drift apart.
        let text = toml::to_string(&Settings::default()).unwrap();
        // The top-level keys: plain ones, then tables (their own keys are the table's business).
        let mut in_table = false;
        let written: Vec<&str> = text
            .lines()
            .filter_map(|l| {
                if let Some(table) = l.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                    in_table = true;
                    return Some(table);
                }
                l.split_once(" = ").filter(|_| !in_table).map(|(k, _)| k)
            })
            .collect();
        assert_eq!(written, Settings::keys(), "{text}");
    }

    #[test]
    fn json_round_trips_and_refuses_unknown_keys() {
        let s =
            parse("bind = \"all\"\nignore_ports = [\"22\", \"5000-5010\"]\n[remap]\n80 = 8080\n").unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Settings>(&json).unwrap(), s);
        let e = serde_json::from_str::<Settings>(r#"{"enabeld":true}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn the_guest_to_host_policy_table_parses_and_names_its_key() {
        let s = parse("[guest_to_host_policy]\nallow_ports = [\"80\", \"600-700\"]\ndeny_ports = [\"9222\"]\nother_users = true\n").unwrap();
        assert_eq!(s.guest_to_host_policy.allow_ports.len(), 2);
        assert!(s.guest_to_host_policy.other_users && !s.guest_to_host_policy.only_allowed);
        for (text, words) in [
            ("[guest_to_host_policy]\ndeny_ports = [\"0\"]", "1–65535"),
            ("[guest_to_host_policy]\nallow = []", "unknown field"),
            ("[guest_to_host_policy]\nonly_allowed = true", "allow_ports"),
        ] {
            let err = parse(text).unwrap_err();
            assert_eq!(err.key(), Some("guest_to_host_policy"), "{text:?}: {err}");
            assert!(err.to_string().contains(words), "{text:?}: {err}");
        }
    }
}

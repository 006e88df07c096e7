//! `settings.toml`: what the user chose. Parsed strictly (unknown keys are errors), validated
//! into sentences that name the key, and saved without losing the user's comments.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::policy::{ForwardLimits, GuestToHostPolicy};

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
    /// Guest port → the host port it is forwarded to (default: the same number).
    pub remap: BTreeMap<String, u16>,
    /// Which desktop listeners the guest may reach (`[guest_to_host_policy]`).
    pub guest_to_host_policy: GuestToHostPolicy,
    /// A guest port whose host port a desktop program held starts forwarding once the desktop
    /// frees it. Off: the port stays the desktop's (a desktop server that restarts gets it back).
    pub take_freed_ports: bool,
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

    /// Reads `path`; a missing file means the defaults. Only a regular file of at most
    /// [`MAX_SETTINGS_LEN`] bytes is read: a FIFO or a device (`/dev/zero`) put in its place
    /// neither blocks the proxy nor makes it grow.
    pub fn load(path: &Path) -> Result<Settings, SettingsError> {
        match read_settings_file(path) {
            Err(SettingsError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(Settings::default())
            }
            Err(e) => Err(e),
            Ok(text) => Settings::parse(&text, path),
        }
    }

    /// The host port a guest port is forwarded to, or `None` if it is ignored.
    pub fn host_port_for(&self, guest_port: u16) -> Option<u16> {
        if self.ignore_ports.iter().any(|r| r.contains(guest_port)) {
            return None;
        }
        Some(self.remap.get(&guest_port.to_string()).copied().unwrap_or(guest_port))
    }
}

/// The text of the settings file at `path`, if it is a regular file of at most
/// [`MAX_SETTINGS_LEN`] bytes. Opened without blocking (a FIFO would wait for a writer), then
/// checked on the open file itself, and read no further than the limit.
pub fn read_settings_file(path: &Path) -> Result<String, SettingsError> {
    use std::io::Read;
    let read_err = |source| SettingsError::Read { path: path.to_owned(), source };
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc_nonblock());
    let file = options.open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        let kind = if meta.is_dir() { "a directory" } else { "a device, pipe or socket" };
        return Err(SettingsError::NotAFile { path: path.to_owned(), kind });
    }
    if meta.len() > MAX_SETTINGS_LEN {
        return Err(SettingsError::TooLarge { path: path.to_owned(), len: meta.len() });
    }
    let mut bytes = Vec::new();
    file.take(MAX_SETTINGS_LEN + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > MAX_SETTINGS_LEN {
        return Err(SettingsError::TooLarge { path: path.to_owned(), len: bytes.len() as u64 });
    }
    String::from_utf8(bytes).map_err(|e| read_err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

#[cfg(unix)]
fn libc_nonblock() -> i32 {
    nix::fcntl::OFlag::O_NONBLOCK.bits()
}

/// The keys, for pointing an error at its field.
const KEYS: [&str; 9] = [
    "enabled",
    "bind",
    "udp",
    "guest_to_host",
    "ignore_ports",
    "remap",
    "guest_to_host_policy",
    "take_freed_ports",
    "limits",
];

/// The settings key whose value contains byte `offset` of `text`: the key on that line, else
/// the table the line is in.
fn key_at(text: &str, offset: usize) -> Option<&'static str> {
    let find = |name: &str| KEYS.iter().copied().find(|k| *k == name.trim());
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

/// Writes `settings` to `path`, keeping the comments and layout of what is there. Atomic: a
/// reader sees the old file or the new one.
pub fn save(path: &Path, settings: &Settings) -> Result<(), SettingsError> {
    let write_err = |source| SettingsError::Write { path: path.to_owned(), source };
    let mut doc: toml_edit::DocumentMut = match read_settings_file(path) {
        Ok(text) => text.parse().unwrap_or_default(),
        Err(_) => toml_edit::DocumentMut::new(),
    };
    let fresh: toml_edit::DocumentMut = toml::to_string(settings)
        .map_err(|e| write_err(std::io::Error::other(e)))?
        .parse()
        .map_err(|e| write_err(std::io::Error::other(e)))?;
    // Replace only values that changed, so untouched keys keep their comments.
    for (key, item) in fresh.iter() {
        let changed =
            doc.get(key).map(|old| old.to_string().trim() != item.to_string().trim()).unwrap_or(true);
        if changed {
            // Replacing the value in place keeps the key's own comments (`# …` above it).
            match doc.get_mut(key) {
                Some(old) => *old = item.clone(),
                None => {
                    doc.insert(key, item.clone());
                }
            }
        }
    }
    let keys: Vec<String> = doc.iter().map(|(k, _)| k.to_owned()).collect();
    for k in keys {
        if fresh.get(&k).is_none() {
            doc.remove(&k);
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, doc.to_string()).map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(write_err)
}

/// The platform's place for the settings file: `$XDG_CONFIG_HOME/hostnet/settings.toml` on
/// Linux, `~/Library/Application Support/hostnet/settings.toml` on macOS,
/// `%APPDATA%\hostnet\settings.toml` on Windows.
pub fn default_path() -> PathBuf {
    dirs::config_dir().unwrap_or_else(std::env::temp_dir).join("hostnet").join("settings.toml")
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
    fn save_keeps_comments_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("settings.toml");
        std::fs::write(&path, "# my note\nenabled = true # keep me\nudp = true\n").unwrap();
        let mut s = Settings::load(&path).unwrap();
        s.enabled = false;
        save(&path, &s).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("# my note"), "{text}");
        assert_eq!(Settings::load(&path).unwrap(), s);
    }

    #[test]
    fn missing_file_is_defaults_and_huge_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Settings::load(&dir.path().join("none.toml")).unwrap(), Settings::default());
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_SETTINGS_LEN as usize + 1]).unwrap();
        assert!(matches!(Settings::load(&big), Err(SettingsError::TooLarge { .. })));
    }

    #[test]
    #[cfg(unix)]
    fn a_fifo_or_a_device_in_place_of_the_file_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let zero = dir.path().join("zero.toml");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        for path in [fifo, zero, dir.path().to_owned()] {
            // On today's main a FIFO blocks here for good and /dev/zero grows until memory runs out.
            let (tx, rx) = std::sync::mpsc::channel();
            let p = path.clone();
            std::thread::spawn(move || {
                let _ = tx.send(Settings::load(&p).map(|_| ()).map_err(|e| e.to_string()));
            });
            let result = rx.recv_timeout(std::time::Duration::from_secs(5)).expect("load returned");
            let err = result.unwrap_err();
            assert!(err.contains("not a regular file"), "{}: {err}", path.display());
        }
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

/// The live settings: the last good ones, the error of the last bad edit, and the file.
#[derive(Debug, Clone)]
pub struct SettingsHandle {
    pub path: PathBuf,
    tx: tokio::sync::watch::Sender<std::sync::Arc<Settings>>,
    error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

/// How long a burst of file events is given to settle before the file is read.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(50);

impl SettingsHandle {
    /// Loads `path` (defaults if missing; defaults and an error if invalid).
    pub fn load(path: PathBuf) -> SettingsHandle {
        let (settings, error) = match Settings::load(&path) {
            Ok(s) => (s, None),
            Err(e) => {
                tracing::warn!("{e}; using the defaults until it is fixed");
                (Settings::default(), Some(e.to_string()))
            }
        };
        let (tx, _) = tokio::sync::watch::channel(std::sync::Arc::new(settings));
        SettingsHandle { path, tx, error: std::sync::Arc::new(std::sync::Mutex::new(error)) }
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<std::sync::Arc<Settings>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> std::sync::Arc<Settings> {
        self.tx.borrow().clone()
    }

    /// The problem with the file on disk, if its last edit was rejected.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_error(&self, e: Option<String>) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    /// Changes the settings: validated, saved to the file, applied at once.
    pub fn update(
        &self,
        change: impl FnOnce(&mut Settings),
    ) -> Result<std::sync::Arc<Settings>, SettingsError> {
        let mut next = (*self.current()).clone();
        change(&mut next);
        next.validate().map_err(|(key, message)| SettingsError::Invalid {
            path: self.path.clone(),
            message,
            key: Some(key),
        })?;
        save(&self.path, &next)?;
        self.set_error(None);
        let next = std::sync::Arc::new(next);
        self.tx.send_replace(next.clone());
        Ok(next)
    }

    /// Re-reads the file: a good file replaces the settings, a bad one is reported and the last
    /// good settings stay.
    pub fn reload(&self) {
        match Settings::load(&self.path) {
            Ok(s) => {
                self.set_error(None);
                self.tx.send_if_modified(|cur| {
                    if **cur == s {
                        return false;
                    }
                    tracing::info!(path = %self.path.display(), "settings changed");
                    *cur = std::sync::Arc::new(s);
                    true
                });
            }
            Err(e) => {
                let msg = e.to_string();
                if self.error().as_deref() != Some(msg.as_str()) {
                    tracing::warn!("{msg}; keeping the previous settings");
                }
                self.set_error(Some(msg));
            }
        }
    }

    /// Watches the file's directory (editors replace files rather than write them) and reloads
    /// on every change, until `shutdown`.
    pub fn watch(
        &self,
        tracker: &tokio_util::task::TaskTracker,
        shutdown: &tokio_util::sync::CancellationToken,
    ) {
        use notify::Watcher;
        let dir = self.path.parent().map(Path::to_owned).unwrap_or_else(|| PathBuf::from("."));
        let name = self.path.file_name().map(|n| n.to_owned());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = std::fs::create_dir_all(&dir).map_err(notify::Error::io).and_then(|()| {
            let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
                let ours =
                    ev.map(|e| e.paths.iter().any(|p| p.file_name() == name.as_deref())).unwrap_or(true);
                if ours {
                    let _ = tx.send(());
                }
            })?;
            w.watch(&dir, notify::RecursiveMode::NonRecursive)?;
            Ok(w)
        });
        let watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(
                    "cannot watch {} for changes ({e}); edits apply after a restart",
                    dir.display()
                );
                return;
            }
        };
        let (this, stop) = (self.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _watcher = watcher; // lives as long as this task
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    ev = rx.recv() => if ev.is_none() { return },
                }
                tokio::time::sleep(SETTLE).await;
                while rx.try_recv().is_ok() {}
                this.reload();
            }
        });
    }
}

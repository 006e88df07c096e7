//! `settings.toml` on disk: read (bounded), saved without losing the user's comments, and
//! watched for edits. The type, its parsing and validation live in `hostnet_admin::settings`
//! (re-exported here), shared with the settings window.

use std::path::{Path, PathBuf};

pub use hostnet_admin::settings::*;

/// Reading the settings file: `Settings::load(path)` with this trait in scope.
pub trait SettingsFile: Sized {
    /// Reads `path`; a missing file means the defaults.
    fn load(path: &Path) -> Result<Self, SettingsError>;
}

impl SettingsFile for Settings {
    /// Reads `path`; a missing file means the defaults. Only a regular file of at most
    /// [`MAX_SETTINGS_LEN`] bytes is read: a FIFO or a device (`/dev/zero`) put in its place
    /// neither blocks the proxy nor makes it grow.
    fn load(path: &Path) -> Result<Settings, SettingsError> {
        match read_settings_file(path) {
            Err(SettingsError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(Settings::default())
            }
            Err(e) => Err(e),
            Ok(text) => Settings::parse(&text, path),
        }
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
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, nix::fcntl::OFlag::O_NONBLOCK.bits());
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
/// `%APPDATA%\hostnet\settings.toml` on Windows. `None` when the system names no
/// configuration directory (no `HOME`): never a shared directory such as `/tmp`, where another
/// local user could put a file of theirs first.
pub fn default_path() -> Option<PathBuf> {
    dirs::config_dir().map(|d| d.join("hostnet").join("settings.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

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

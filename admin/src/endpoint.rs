//! Where the admin API listens. The choice is a pure function of its inputs
//! ([`choose_endpoint`]), so every platform's rule is unit-tested on any platform;
//! [`default_endpoint`] reads those inputs from this process.
//!
//! | platform | who | endpoint |
//! |---|---|---|
//! | any | `HOSTNET_ADMIN_SOCKET` set | that path (Windows: that pipe name) |
//! | Linux | root | `/run/hostnet/admin/admin.sock` |
//! | Linux | a user | `$XDG_RUNTIME_DIR/hostnet/admin.sock`, else `/run/user/<uid>/hostnet/admin.sock` if that directory is the user's, else `$XDG_STATE_HOME/hostnet/admin.sock` (`~/.local/state/hostnet/admin.sock`) |
//! | macOS | root | `/var/run/hostnet/admin/admin.sock` |
//! | macOS | a user | `~/Library/Application Support/hostnet/run/admin.sock` |
//! | Windows | a user | `\\.\pipe\hostnet-admin-<the user's SID>` |
//!
//! Never a shared directory such as `/tmp`: another user could create it first. macOS's
//! `$TMPDIR` is per user but swept of files untouched for days, which would take a long-lived
//! proxy's socket away.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Where the admin API is served.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A Unix stream socket (Linux, macOS).
    Socket(PathBuf),
    /// A named pipe, `\\.\pipe\…` (Windows).
    Pipe(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Socket(p) => write!(f, "{}", p.display()),
            Endpoint::Pipe(name) => f.write_str(name),
        }
    }
}

/// The operating systems whose conventions [`choose_endpoint`] knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Os {
    /// Linux, and any other Unix but macOS (XDG conventions).
    Linux,
    MacOs,
    Windows,
}

impl Os {
    /// The one this program runs on.
    pub const CURRENT: Os = if cfg!(windows) {
        Os::Windows
    } else if cfg!(target_vendor = "apple") {
        Os::MacOs
    } else {
        Os::Linux
    };
}

/// The prefix of every named pipe's name.
pub const PIPE_PREFIX: &str = r"\\.\pipe\";

impl Endpoint {
    /// An endpoint the user named (`--admin-socket`, `HOSTNET_ADMIN_SOCKET`): a socket path,
    /// or on Windows a pipe name (`\\.\pipe\` is added when missing).
    pub fn from_arg(os: Os, value: impl Into<OsString>) -> Endpoint {
        let value = value.into();
        match os {
            Os::Windows => {
                let name = value.to_string_lossy().into_owned();
                let lower = name.to_ascii_lowercase();
                if lower.starts_with(PIPE_PREFIX) || lower.starts_with("//./pipe/") {
                    Endpoint::Pipe(name)
                } else {
                    Endpoint::Pipe(format!("{PIPE_PREFIX}{name}"))
                }
            }
            Os::Linux | Os::MacOs => Endpoint::Socket(PathBuf::from(value)),
        }
    }

    /// The endpoint for this platform named by the user.
    pub fn from_user(value: impl Into<OsString>) -> Endpoint {
        Endpoint::from_arg(Os::CURRENT, value)
    }
}

/// What the choice of endpoint looks at; [`default_endpoint`] reads it from this process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointInputs {
    /// `HOSTNET_ADMIN_SOCKET`.
    pub override_value: Option<OsString>,
    /// The effective user id (Unix).
    pub uid: Option<u32>,
    /// `XDG_RUNTIME_DIR` (Linux).
    pub xdg_runtime_dir: Option<PathBuf>,
    /// `/run/user/<uid>` when it exists, is a directory (not a symlink) and belongs to `uid`.
    pub run_user_dir: Option<PathBuf>,
    /// `XDG_STATE_HOME` (Linux).
    pub xdg_state_home: Option<PathBuf>,
    /// `HOME`.
    pub home: Option<PathBuf>,
    /// The user's security identifier, `S-1-5-21-…` (Windows).
    pub user_sid: Option<String>,
}

/// No endpoint could be chosen, or the pipe's security could not be set.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EndpointError {
    #[error(
        "no private place for the admin socket: neither XDG_RUNTIME_DIR nor HOME is set \
         (hostnet does not fall back to a shared directory such as /tmp); set one, or pass \
         --admin-socket PATH (HOSTNET_ADMIN_SOCKET)"
    )]
    NoPrivateDirectory,
    #[error("cannot tell which Windows user this is ({0}), so the admin pipe cannot be named for it")]
    NoUser(String),
    #[error("{0:?} is not a Windows security identifier (S-1-…)")]
    BadSid(String),
}

/// The admin endpoint for these inputs; see the module's table.
pub fn choose_endpoint(os: Os, i: &EndpointInputs) -> Result<Endpoint, EndpointError> {
    if let Some(v) = i.override_value.as_ref().filter(|v| !v.is_empty()) {
        return Ok(Endpoint::from_arg(os, v.clone()));
    }
    // Relative values are invalid per the XDG spec, and would depend on the working directory.
    let absolute = |p: &Option<PathBuf>| p.clone().filter(|p| p.is_absolute());
    let socket = |dir: PathBuf| Ok(Endpoint::Socket(dir.join("admin.sock")));
    match os {
        Os::Windows => {
            let sid = i.user_sid.as_deref().ok_or_else(|| EndpointError::NoUser("no user SID".into()))?;
            check_sid(sid)?;
            Ok(Endpoint::Pipe(format!("{PIPE_PREFIX}hostnet-admin-{sid}")))
        }
        Os::MacOs => {
            if i.uid == Some(0) {
                return socket(PathBuf::from("/var/run/hostnet/admin"));
            }
            let home = absolute(&i.home).ok_or(EndpointError::NoPrivateDirectory)?;
            socket(home.join("Library/Application Support/hostnet/run"))
        }
        Os::Linux => {
            if i.uid == Some(0) {
                // Its own directory: `/run/hostnet` also holds the demo's per-VM directories.
                return socket(PathBuf::from("/run/hostnet/admin"));
            }
            if let Some(run) = absolute(&i.xdg_runtime_dir).or_else(|| absolute(&i.run_user_dir)) {
                return socket(run.join("hostnet"));
            }
            let state = absolute(&i.xdg_state_home)
                .or_else(|| absolute(&i.home).map(|h| h.join(".local/state")))
                .ok_or(EndpointError::NoPrivateDirectory)?;
            socket(state.join("hostnet"))
        }
    }
}

/// A SID as `ConvertSidToStringSidW` writes it: `S-` then digits and dashes. Anything else
/// could change the meaning of the security descriptor it is put in.
fn check_sid(sid: &str) -> Result<(), EndpointError> {
    let rest = sid.strip_prefix("S-").ok_or_else(|| EndpointError::BadSid(sid.to_owned()))?;
    if rest.is_empty() || !rest.chars().all(|c| c.is_ascii_digit() || c == '-') {
        return Err(EndpointError::BadSid(sid.to_owned()));
    }
    Ok(())
}

/// The security descriptor of the admin pipe, in SDDL: a protected DACL (`P`: nothing
/// inherited) with one entry allowing (`A`) all access (`GA`) to the user `sid` — no one else,
/// not even administrators or SYSTEM, can open it.
pub fn pipe_sddl(sid: &str) -> Result<String, EndpointError> {
    check_sid(sid)?;
    Ok(format!("D:P(A;;GA;;;{sid})"))
}

/// This process's endpoint: `HOSTNET_ADMIN_SOCKET`, else the platform's place for this user.
#[cfg(any(feature = "client", feature = "server"))]
pub fn default_endpoint() -> Result<Endpoint, EndpointError> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let mut inputs = EndpointInputs {
        override_value: env(crate::ENDPOINT_ENV),
        home: env("HOME").map(PathBuf::from),
        xdg_runtime_dir: env("XDG_RUNTIME_DIR").map(PathBuf::from),
        xdg_state_home: env("XDG_STATE_HOME").map(PathBuf::from),
        ..EndpointInputs::default()
    };
    if inputs.override_value.is_none() {
        #[cfg(unix)]
        {
            let uid = crate::unix::euid();
            inputs.uid = Some(uid);
            let run_user = PathBuf::from(format!("/run/user/{uid}"));
            inputs.run_user_dir = crate::unix::is_own_directory(&run_user, uid).then_some(run_user);
        }
        #[cfg(windows)]
        {
            inputs.user_sid =
                Some(crate::windows::current_user_sid().map_err(|e| EndpointError::NoUser(e.to_string()))?);
        }
    }
    choose_endpoint(Os::CURRENT, &inputs)
}

/// The directory a socket endpoint lives in.
pub fn socket_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn user(uid: u32) -> EndpointInputs {
        EndpointInputs { uid: Some(uid), home: Some("/home/me".into()), ..EndpointInputs::default() }
    }

    #[cfg(unix)]
    fn sock(p: &str) -> Result<Endpoint, EndpointError> {
        Ok(Endpoint::Socket(p.into()))
    }

    // Unix paths are built with this platform's `Path`: checked where they are used.
    #[cfg(unix)]
    #[test]
    fn linux_prefers_the_runtime_dir_and_never_tmp() {
        let mut i = user(1000);
        assert_eq!(choose_endpoint(Os::Linux, &i), sock("/home/me/.local/state/hostnet/admin.sock"));
        i.xdg_state_home = Some("/home/me/state".into());
        assert_eq!(choose_endpoint(Os::Linux, &i), sock("/home/me/state/hostnet/admin.sock"));
        i.run_user_dir = Some("/run/user/1000".into());
        assert_eq!(choose_endpoint(Os::Linux, &i), sock("/run/user/1000/hostnet/admin.sock"));
        i.xdg_runtime_dir = Some("/run/user/1000x".into());
        assert_eq!(choose_endpoint(Os::Linux, &i), sock("/run/user/1000x/hostnet/admin.sock"));
        // Relative XDG values are ignored, as the spec says.
        i.xdg_runtime_dir = Some("run".into());
        i.xdg_state_home = Some("state".into());
        i.run_user_dir = None;
        assert_eq!(choose_endpoint(Os::Linux, &i), sock("/home/me/.local/state/hostnet/admin.sock"));
        // Nothing private to use: an error, not /tmp.
        let none = EndpointInputs { uid: Some(1000), ..EndpointInputs::default() };
        assert_eq!(choose_endpoint(Os::Linux, &none), Err(EndpointError::NoPrivateDirectory));
        assert!(EndpointError::NoPrivateDirectory.to_string().contains("--admin-socket"));
    }

    // Unix paths are built with this platform's `Path`: checked where they are used.
    #[cfg(unix)]
    #[test]
    fn root_has_its_own_directory() {
        let mut i = user(0);
        i.xdg_runtime_dir = Some("/run/user/0".into());
        assert_eq!(choose_endpoint(Os::Linux, &i), sock("/run/hostnet/admin/admin.sock"));
        assert_eq!(choose_endpoint(Os::MacOs, &i), sock("/var/run/hostnet/admin/admin.sock"));
    }

    // Unix paths are built with this platform's `Path`: checked where they are used.
    #[cfg(unix)]
    #[test]
    fn macos_uses_the_users_library() {
        let mut i = user(501);
        i.home = Some("/Users/me".into());
        i.xdg_runtime_dir = Some("/ignored".into());
        assert_eq!(
            choose_endpoint(Os::MacOs, &i),
            sock("/Users/me/Library/Application Support/hostnet/run/admin.sock")
        );
        i.home = None;
        assert_eq!(choose_endpoint(Os::MacOs, &i), Err(EndpointError::NoPrivateDirectory));
    }

    #[test]
    fn windows_names_the_pipe_after_the_user() {
        let i = EndpointInputs { user_sid: Some("S-1-5-21-1-2-3-1001".into()), ..EndpointInputs::default() };
        assert_eq!(
            choose_endpoint(Os::Windows, &i),
            Ok(Endpoint::Pipe(r"\\.\pipe\hostnet-admin-S-1-5-21-1-2-3-1001".into()))
        );
        let odd =
            EndpointInputs { user_sid: Some("S-1-1-0)(A;;GA;;;WD".into()), ..EndpointInputs::default() };
        assert!(matches!(choose_endpoint(Os::Windows, &odd), Err(EndpointError::BadSid(_))));
        assert!(matches!(
            choose_endpoint(Os::Windows, &EndpointInputs::default()),
            Err(EndpointError::NoUser(_))
        ));
    }

    // Unix paths are built with this platform's `Path`: checked where they are used.
    #[cfg(unix)]
    #[test]
    fn the_override_wins_everywhere() {
        let i = EndpointInputs {
            override_value: Some("/tmp/test/admin.sock".into()),
            user_sid: Some("S-1-5-18".into()),
            ..user(0)
        };
        assert_eq!(choose_endpoint(Os::Linux, &i), sock("/tmp/test/admin.sock"));
        assert_eq!(choose_endpoint(Os::MacOs, &i), sock("/tmp/test/admin.sock"));
        let pipe = EndpointInputs { override_value: Some("hostnet-test".into()), ..i.clone() };
        assert_eq!(choose_endpoint(Os::Windows, &pipe), Ok(Endpoint::Pipe(r"\\.\pipe\hostnet-test".into())));
        let full = EndpointInputs { override_value: Some(r"\\.\PIPE\x".into()), ..i };
        assert_eq!(choose_endpoint(Os::Windows, &full), Ok(Endpoint::Pipe(r"\\.\PIPE\x".into())));
        let empty = EndpointInputs { override_value: Some("".into()), ..user(1000) };
        assert_eq!(choose_endpoint(Os::Linux, &empty), sock("/home/me/.local/state/hostnet/admin.sock"));
    }

    #[test]
    fn the_pipe_admits_only_its_user() {
        assert_eq!(pipe_sddl("S-1-5-21-11-22-33-1001").unwrap(), "D:P(A;;GA;;;S-1-5-21-11-22-33-1001)");
        for bad in ["", "S-", "WD", "S-1-1-0)(A;;GA;;;WD", "s-1-5-18", "S-1-5 -18"] {
            assert!(pipe_sddl(bad).is_err(), "{bad:?}");
        }
    }

    // Unix paths are built with this platform's `Path`: checked where they are used.
    #[cfg(unix)]
    #[test]
    fn a_bare_file_name_lives_in_the_working_directory() {
        assert_eq!(socket_dir(Path::new("admin.sock")), Path::new("."));
        assert_eq!(socket_dir(Path::new("/a/b/admin.sock")), Path::new("/a/b"));
    }
}

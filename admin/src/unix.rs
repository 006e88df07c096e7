//! Linux and macOS: who we are, whose directory and socket a path is.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// This process's effective user id.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// `path` is a directory (not a symlink to one) owned by `uid`.
pub(crate) fn is_own_directory(path: &Path, uid: u32) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.uid() == uid)
}

/// What [`judge_dir`] looks at, from `lstat`.
#[cfg(feature = "server")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DirFacts {
    pub symlink: bool,
    pub dir: bool,
    pub uid: u32,
    pub mode: u32,
}

#[cfg(feature = "server")]
impl From<&std::fs::Metadata> for DirFacts {
    fn from(m: &std::fs::Metadata) -> Self {
        DirFacts {
            symlink: m.file_type().is_symlink(),
            dir: m.is_dir(),
            uid: m.uid(),
            mode: m.mode() & 0o7777,
        }
    }
}

/// Whether a directory is fit to hold our admin socket: a real directory, ours, that no one
/// else can enter. A sentence saying what is wrong and what to do otherwise.
#[cfg(feature = "server")]
pub(crate) fn judge_dir(dir: &Path, f: DirFacts, our_uid: u32) -> Result<(), String> {
    let d = dir.display();
    if f.symlink {
        return Err(format!(
            "{d} is a symbolic link; hostnet serves its admin socket only in a real directory of its \
             own: remove the link, or pass --admin-socket with another path"
        ));
    }
    if !f.dir {
        return Err(format!("{d} is not a directory; pass --admin-socket with another path"));
    }
    if f.uid != our_uid {
        return Err(format!(
            "{d} belongs to user id {}, not to you (uid {our_uid}); hostnet will not serve its admin \
             socket in another user's directory (nor change or delete it): pass --admin-socket \
             with a path in a directory of your own",
            f.uid
        ));
    }
    if f.mode & 0o077 != 0 {
        return Err(format!(
            "{d} has mode {:04o}, so other users can enter it; the admin socket's directory must be \
             yours alone: run `chmod 700 {d}`, or pass --admin-socket with another path",
            f.mode
        ));
    }
    Ok(())
}

/// Makes `dir` (mode 0700, parents as usual) if missing, then checks it with [`judge_dir`].
#[cfg(feature = "server")]
pub(crate) fn prepare_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                // Made meanwhile by someone else: judged below like any existing directory.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
            }
        }
        Err(e) => return Err(format!("cannot inspect {}: {e}", dir.display())),
        Ok(_) => {}
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
    judge_dir(dir, DirFacts::from(&m), euid())
}

/// What is at the socket's path before we bind.
#[cfg(feature = "server")]
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AtPath {
    Nothing,
    /// A socket of ours: stale, or served by another of our processes.
    OurSocket,
    /// Anything else; never removed.
    Other(String),
}

#[cfg(feature = "server")]
pub(crate) fn what_is_at(path: &Path) -> io::Result<AtPath> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(AtPath::Nothing),
        Err(e) => Err(e),
        Ok(m) if m.file_type().is_socket() && m.uid() == euid() => Ok(AtPath::OurSocket),
        Ok(m) => Ok(AtPath::Other(format!(
            "{} already exists and is not a socket of yours (a {}, user id {}); hostnet leaves it \
             alone: remove it, or pass --admin-socket with another path",
            path.display(),
            if m.file_type().is_socket() {
                "socket"
            } else if m.is_dir() {
                "directory"
            } else {
                "file"
            },
            m.uid()
        ))),
    }
}

/// Sets the socket file's mode to 0600.
#[cfg(feature = "server")]
pub(crate) fn make_private(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// The user id of the process at the other end of `conn`.
pub(crate) fn peer_uid(conn: &tokio::net::UnixStream) -> io::Result<u32> {
    conn.peer_cred().map(|c| c.uid())
}

/// Writes all of `bytes` without raising SIGPIPE: a proxy that hung up (busy, or gone) is an
/// error to handle, not a signal that kills the command-line client (which keeps SIGPIPE's
/// default disposition so that `| head` ends it quietly).
#[cfg(feature = "client")]
pub(crate) async fn send_all(conn: &tokio::net::UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    let sock = socket2::SockRef::from(conn);
    #[cfg(target_vendor = "apple")]
    sock.set_nosigpipe(true)?;
    #[cfg(target_vendor = "apple")]
    let flags = 0;
    #[cfg(not(target_vendor = "apple"))]
    let flags = libc::MSG_NOSIGNAL;
    while !bytes.is_empty() {
        let n = conn.async_io(tokio::io::Interest::WRITABLE, || sock.send_with_flags(bytes, flags)).await?;
        bytes = bytes.get(n..).unwrap_or_default();
    }
    Ok(())
}

#[cfg(all(test, feature = "server"))]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

    const ME: u32 = 1000;

    fn facts(mode: u32) -> DirFacts {
        DirFacts { symlink: false, dir: true, uid: ME, mode }
    }

    #[test]
    fn only_a_private_directory_of_ours_is_used() {
        let dir = Path::new("/run/user/1000/hostnet");
        assert_eq!(judge_dir(dir, facts(0o700), ME), Ok(()));
        for (f, words) in [
            (facts(0o755), "mode 0755"),
            (facts(0o710), "chmod 700"),
            (facts(0o1777), "mode 1777"),
            (DirFacts { uid: 1001, ..facts(0o700) }, "belongs to user id 1001"),
            (DirFacts { symlink: true, ..facts(0o777) }, "symbolic link"),
            (DirFacts { dir: false, ..facts(0o600) }, "not a directory"),
        ] {
            let e = judge_dir(dir, f, ME).unwrap_err();
            assert!(e.contains(words) && e.contains("/run/user/1000/hostnet"), "{f:?}: {e}");
        }
    }

    #[test]
    fn prepare_dir_makes_a_private_directory_and_refuses_others() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("a/b/hostnet");
        prepare_dir(&fresh).unwrap();
        let m = std::fs::metadata(&fresh).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700);
        prepare_dir(&fresh).unwrap(); // again: fine

        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(prepare_dir(&open).unwrap_err().contains("mode 0755"));
        assert_eq!(std::fs::metadata(&open).unwrap().mode() & 0o777, 0o755, "left as it was");

        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert!(prepare_dir(&link).unwrap_err().contains("symbolic link"));

        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(prepare_dir(&file).unwrap_err().contains("not a directory"));
    }

    /// Needs root: makes a directory owned by another user.
    #[test]
    fn another_users_directory_is_refused_and_left_alone() {
        if euid() != 0 {
            eprintln!("skipped: needs root to chown a directory to another user");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let theirs = tmp.path().join("theirs");
        std::fs::DirBuilder::new().mode(0o700).create(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let e = prepare_dir(&theirs).unwrap_err();
        assert!(e.contains("belongs to user id 65534") && e.contains("not to you"), "{e}");
        let m = std::fs::metadata(&theirs).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (65534, 0o700), "left as it was");
    }

    #[test]
    fn only_our_own_socket_counts_as_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("admin.sock");
        assert_eq!(what_is_at(&p).unwrap(), AtPath::Nothing);
        let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        assert_eq!(what_is_at(&p).unwrap(), AtPath::OurSocket);
        drop(l);
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"precious").unwrap();
        assert!(matches!(what_is_at(&p).unwrap(), AtPath::Other(s) if s.contains("not a socket of yours")));
    }
}

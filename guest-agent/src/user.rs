//! The unprivileged user the agent becomes after start-up (`hostnet-agent --user`).
//!
//! The agent starts as root: loading the listener-events BPF programs needs it. Then, while it
//! still has one thread, it becomes its own user ([`become_user`]): supplementary groups
//! cleared, then the group, then the user (real, effective and saved), keeping its capabilities
//! across the change (`PR_SET_KEEPCAPS`) so that [`crate::privileges::drop_all_but`] can then
//! cut them down to what the agent needs. A flaw in the agent then acts as that user with, at
//! most, `CAP_NET_ADMIN` — not as root on every file of the guest.
//!
//! `--user NAME` is looked up in `/etc/passwd` (the user's own group is its primary group). The
//! agent reads that file itself instead of asking the C library: the VM image's agent is a
//! static binary, which has no NSS modules. `--user UID:GID` needs no entry at all.

use std::fmt;
use std::str::FromStr;

use nix::unistd::{Gid, Uid};

/// Where [`lookup`] finds users by name.
pub const PASSWD: &str = "/etc/passwd";

/// What `--user` names: a user of `/etc/passwd`, or a user and group by number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSpec {
    Name(String),
    Ids { uid: u32, gid: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("--user needs a user name (e.g. hostnet) or UID:GID (e.g. 999:999)")]
    Empty,
    #[error("{0:?} is not a user: give a user name (e.g. hostnet) or UID:GID (e.g. 999:999)")]
    Malformed(String),
    #[error("{0:?} is a number: give the group too (UID:GID, e.g. {0}:{0}), or a user name from /etc/passwd")]
    UidWithoutGid(String),
    #[error(
        "the agent must not run as root ({0}): --user names the unprivileged user it becomes after \
         start-up"
    )]
    Root(String),
    #[error(
        "user {name:?} does not exist in {file}: create it (e.g. `useradd --system --no-create-home \
         --shell /usr/sbin/nologin {name}`) or give --user UID:GID"
    )]
    Unknown { name: String, file: String },
    #[error("cannot read {file} to look up user {name:?}: {reason}")]
    Unreadable { name: String, file: String, reason: String },
    #[error("the entry of user {name:?} in {file} is malformed")]
    BadEntry { name: String, file: String },
}

impl FromStr for UserSpec {
    type Err = UserError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(UserError::Empty);
        }
        if let Some((uid, gid)) = s.split_once(':') {
            let (Ok(uid), Ok(gid)) = (parse_id(uid), parse_id(gid)) else {
                return Err(UserError::Malformed(s.to_owned()));
            };
            if uid == 0 || gid == 0 {
                return Err(UserError::Root(s.to_owned()));
            }
            return Ok(UserSpec::Ids { uid, gid });
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(UserError::UidWithoutGid(s.to_owned()));
        }
        // What useradd and busybox adduser accept, roughly: no separators, no whitespace, no
        // leading '-' (it would read as an option to the tools that manage the account).
        let usable = !s.starts_with('-')
            && s.len() <= 256
            && s.chars().all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'));
        if !usable {
            return Err(UserError::Malformed(s.to_owned()));
        }
        if s == "root" {
            return Err(UserError::Root(s.to_owned()));
        }
        Ok(UserSpec::Name(s.to_owned()))
    }
}

impl fmt::Display for UserSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserSpec::Name(name) => f.write_str(name),
            UserSpec::Ids { uid, gid } => write!(f, "{uid}:{gid}"),
        }
    }
}

/// Decimal ids only: "0x10" or "+5" are not what anyone means by a uid.
fn parse_id(s: &str) -> Result<u32, ()> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(());
    }
    s.parse().map_err(|_| ())
}

/// The user the agent becomes, resolved to numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Its name, when `/etc/passwd` has one (for the log).
    pub name: Option<String>,
    pub uid: u32,
    pub gid: u32,
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name} (uid {}, gid {})", self.uid, self.gid),
            None => write!(f, "uid {}, gid {}", self.uid, self.gid),
        }
    }
}

/// Resolves `spec` against the text of a passwd file (`file` names it in errors).
pub fn resolve(spec: &UserSpec, passwd: &str, file: &str) -> Result<Account, UserError> {
    let mut entries = passwd.lines().filter_map(|line| {
        // name:password:uid:gid:gecos:home:shell
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        Some((name, fields.next(), fields.next()))
    });
    match spec {
        UserSpec::Ids { uid, gid } => {
            let name = entries
                .find(|(_, u, _)| u.and_then(|u| parse_id(u).ok()) == Some(*uid))
                .map(|(name, _, _)| name.to_owned());
            Ok(Account { name, uid: *uid, gid: *gid })
        }
        UserSpec::Name(wanted) => {
            let Some((name, uid, gid)) = entries.find(|(name, _, _)| name == wanted) else {
                return Err(UserError::Unknown { name: wanted.clone(), file: file.to_owned() });
            };
            let bad = || UserError::BadEntry { name: wanted.clone(), file: file.to_owned() };
            let uid = uid.ok_or_else(bad).and_then(|u| parse_id(u).map_err(|()| bad()))?;
            let gid = gid.ok_or_else(bad).and_then(|g| parse_id(g).map_err(|()| bad()))?;
            if uid == 0 || gid == 0 {
                return Err(UserError::Root(format!("{wanted} has uid {uid}, gid {gid} in {file}")));
            }
            Ok(Account { name: Some(name.to_owned()), uid, gid })
        }
    }
}

/// Resolves `spec` against this machine's `/etc/passwd`. A name must be there; `UID:GID`
/// needs no entry (an unreadable file then only costs the name in the log).
pub fn lookup(spec: &UserSpec) -> Result<Account, UserError> {
    match std::fs::read_to_string(PASSWD) {
        Ok(text) => resolve(spec, &text, PASSWD),
        Err(e) => match spec {
            UserSpec::Ids { .. } => resolve(spec, "", PASSWD),
            UserSpec::Name(name) => Err(UserError::Unreadable {
                name: name.clone(),
                file: PASSWD.to_owned(),
                reason: e.to_string(),
            }),
        },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error(
        "the process already runs {0} threads; the user must be switched before any other thread \
         starts (the kernel changes credentials per thread)"
    )]
    Threads(usize),
    #[error("cannot become {account}: {what} failed: {source} (start the agent as root to use --user)")]
    Os { account: String, what: &'static str, source: nix::Error },
    #[error("cannot become {account}: {what}: {source}")]
    Caps { account: String, what: &'static str, source: caps::errors::CapsError },
    #[error("after switching, the process still runs as {0}")]
    Left(String),
}

/// Makes this process `account`: no supplementary groups, then real, effective and saved gid,
/// then uid. The capabilities it had stay permitted and effective (for
/// [`crate::privileges::drop_all_but`], which must run next and cut them down); the working
/// directory becomes `/`. A process that already is `account` (started so by its service
/// manager) is left as it is. Must be called while the process has a single thread.
pub fn become_user(account: &Account) -> Result<(), SwitchError> {
    let threads = crate::privileges::thread_count();
    if threads > 1 {
        return Err(SwitchError::Threads(threads));
    }
    let (uid, gid) = (Uid::from_raw(account.uid), Gid::from_raw(account.gid));
    if already(uid, gid) {
        return Ok(());
    }
    let os_err = |what| move |source| SwitchError::Os { account: account.to_string(), what, source };
    // Without this, leaving uid 0 empties the permitted set too. The ambient and effective sets
    // are emptied all the same; the kernel clears the flag itself at the next execve.
    set_keep_caps(true).map_err(os_err("keeping capabilities across the change (PR_SET_KEEPCAPS)"))?;
    nix::unistd::setgroups(&[]).map_err(os_err("clearing the supplementary groups (setgroups)"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(os_err("changing the group (setresgid)"))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(os_err("changing the user (setresuid)"))?;
    set_keep_caps(false).map_err(os_err("clearing PR_SET_KEEPCAPS"))?;
    let caps_err = |what| move |source| SwitchError::Caps { account: account.to_string(), what, source };
    let permitted =
        caps::read(None, caps::CapSet::Permitted).map_err(caps_err("reading the permitted set"))?;
    caps::set(None, caps::CapSet::Effective, &permitted).map_err(caps_err("restoring the effective set"))?;
    // The old directory may not be this user's to read; nothing the agent does is relative.
    nix::unistd::chdir("/").map_err(os_err("changing to / (chdir)"))?;

    // Check rather than trust.
    if !already(uid, gid) {
        let ids = nix::unistd::getresuid().map(|r| format!("uids {} {} {}", r.real, r.effective, r.saved));
        return Err(SwitchError::Left(ids.unwrap_or_else(|e| e.to_string())));
    }
    Ok(())
}

/// Whether every uid and gid of this process is `uid` / `gid` and it has no supplementary
/// groups.
fn already(uid: Uid, gid: Gid) -> bool {
    let uids = nix::unistd::getresuid().is_ok_and(|r| r.real == uid && r.effective == uid && r.saved == uid);
    let gids = nix::unistd::getresgid().is_ok_and(|r| r.real == gid && r.effective == gid && r.saved == gid);
    let groups = nix::unistd::getgroups().is_ok_and(|g| g.iter().all(|&g2| g2 == gid));
    uids && gids && groups
}

fn set_keep_caps(on: bool) -> nix::Result<()> {
    // SAFETY: PR_SET_KEEPCAPS takes plain integers and touches no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(on), 0, 0, 0) };
    nix::errno::Errno::result(r).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD_TEXT: &str = "root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        hostnet:x:999:998:hostnet agent:/nonexistent:/usr/sbin/nologin\n\
        toor:x:0:0::/root:/bin/sh\n\
        broken:x:12\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";

    #[test]
    fn user_names_and_numeric_ids_parse() {
        assert_eq!("hostnet".parse(), Ok(UserSpec::Name("hostnet".into())));
        assert_eq!("svc-agent_1.x".parse(), Ok(UserSpec::Name("svc-agent_1.x".into())));
        assert_eq!("999:998".parse(), Ok(UserSpec::Ids { uid: 999, gid: 998 }));
        assert_eq!("65534:65534".parse::<UserSpec>().map(|s| s.to_string()).as_deref(), Ok("65534:65534"));
        assert_eq!(UserSpec::Name("hostnet".into()).to_string(), "hostnet");
    }

    #[test]
    fn root_and_malformed_users_are_refused_with_a_reason() {
        assert_eq!("".parse::<UserSpec>(), Err(UserError::Empty));
        for root in ["root", "0:0", "0:999", "999:0"] {
            assert!(matches!(root.parse::<UserSpec>(), Err(UserError::Root(_))), "{root}");
        }
        assert_eq!("999".parse::<UserSpec>(), Err(UserError::UidWithoutGid("999".into())));
        for bad in [
            "a:b",
            "999:",
            ":999",
            "1:2:3",
            "-1:5",
            "+5:5",
            "0x10:1",
            "99999999999:1",
            "has space",
            "a/b",
            "-rf",
        ] {
            assert!(matches!(bad.parse::<UserSpec>(), Err(UserError::Malformed(_))), "{bad}");
        }
        let msg = "999".parse::<UserSpec>().unwrap_err().to_string();
        assert!(msg.contains("999:999"), "{msg}");
    }

    #[test]
    fn a_name_resolves_to_its_uid_and_primary_group() {
        let spec = UserSpec::Name("hostnet".into());
        let account = resolve(&spec, PASSWD_TEXT, "passwd").unwrap();
        assert_eq!(account, Account { name: Some("hostnet".into()), uid: 999, gid: 998 });
        assert_eq!(account.to_string(), "hostnet (uid 999, gid 998)");
    }

    #[test]
    fn numeric_ids_need_no_entry_but_take_its_name() {
        let known = resolve(&UserSpec::Ids { uid: 65534, gid: 65534 }, PASSWD_TEXT, "passwd").unwrap();
        assert_eq!(known.name.as_deref(), Some("nobody"));
        let unknown = resolve(&UserSpec::Ids { uid: 4242, gid: 4243 }, PASSWD_TEXT, "passwd").unwrap();
        assert_eq!(unknown, Account { name: None, uid: 4242, gid: 4243 });
        assert_eq!(unknown.to_string(), "uid 4242, gid 4243");
    }

    #[test]
    fn unknown_root_and_broken_entries_are_errors() {
        let err = resolve(&UserSpec::Name("hostnett".into()), PASSWD_TEXT, "/etc/passwd").unwrap_err();
        assert_eq!(err, UserError::Unknown { name: "hostnett".into(), file: "/etc/passwd".into() });
        assert!(err.to_string().contains("does not exist in /etc/passwd"), "{err}");
        // A name that is root under another name.
        assert!(matches!(resolve(&UserSpec::Name("toor".into()), PASSWD_TEXT, "p"), Err(UserError::Root(_))));
        assert!(matches!(
            resolve(&UserSpec::Name("broken".into()), PASSWD_TEXT, "p"),
            Err(UserError::BadEntry { .. })
        ));
        // A prefix of a name is not that name.
        assert!(matches!(
            resolve(&UserSpec::Name("host".into()), PASSWD_TEXT, "p"),
            Err(UserError::Unknown { .. })
        ));
    }
}

//! The service files `installer/` ships are checked by the tools that will read them:
//!
//! - the guest's systemd unit and the desktop's systemd user unit with `systemd-analyze verify`
//!   (which exits 0 on values it ignores, so anything it prints fails the check too);
//! - the launchd plist with Python's `plistlib`, and the keys launchd needs;
//! - the OpenRC script with `sh -n`;
//! - the agent's sysusers.d entry with `systemd-sysusers` in a scratch root: it creates the
//!   unprivileged user that every way of starting the agent in a guest passes to `--user`.
//!
//! Each check is first shown a broken copy and must reject it, so a check that cannot fail
//! fails here. Needs `systemd` (for `systemd-analyze`) and `python3`, which `./dev.sh setup`
//! installs; no root.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn installer(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("installer").join(rel)
}

/// A scratch directory for one check, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("hostnet-units-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.0.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    fn executable(&self, rel: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.write(rel, "#!/bin/sh\n");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `Ok(())` if `cmd` exits 0 and prints nothing on stderr; otherwise what it said.
fn quiet_success(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if out.status.success() && stderr.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {stderr}{}", out.status, String::from_utf8_lossy(&out.stdout)))
    }
}

fn require_tool(name: &str, package: &str) {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output().unwrap();
    assert!(
        found.status.success(),
        "{name} is missing: install the Debian package {package} (./dev.sh setup does)"
    );
}

/// The guest's unit, as installed (`/etc/systemd/system`, agent in `/usr/local/bin`), verified
/// inside a scratch root so the agent binary and the targets it orders against exist.
fn verify_guest_unit(text: &str) -> Result<(), String> {
    let root = Scratch::new("guest");
    root.executable("usr/local/bin/hostnet-agent");
    for target in ["sysinit", "basic", "shutdown", "network", "multi-user"] {
        root.write(&format!("etc/systemd/system/{target}.target"), "[Unit]\nDescription=stand-in\n");
    }
    root.write("etc/systemd/system/hostnet-agent.service", text);
    quiet_success(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.0.display()))
            .arg("/etc/systemd/system/hostnet-agent.service"),
    )
}

/// The desktop's user unit, as installed for a user whose home is a scratch directory (the
/// unit runs `%h/.local/bin/hostnet-proxy`).
fn verify_user_unit(text: &str) -> Result<(), String> {
    let home = Scratch::new("user");
    home.executable(".local/bin/hostnet-proxy");
    let runtime = home.0.join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    let unit = home.write(".config/systemd/user/hostnet-proxy.service", text);
    quiet_success(
        Command::new("systemd-analyze")
            .args(["--user", "verify"])
            .arg(unit)
            .env("HOME", &home.0)
            .env("XDG_RUNTIME_DIR", &runtime),
    )
}

#[test]
fn systemd_units_verify_cleanly() {
    require_tool("systemd-analyze", "systemd");
    let guest = std::fs::read_to_string(installer("guest/hostnet-agent.service")).unwrap();
    let user = std::fs::read_to_string(installer("host/hostnet-proxy.service")).unwrap();

    // The checks catch what systemd would ignore at boot.
    let broken = guest.replace("Restart=always", "Restart=sometimes");
    assert_ne!(broken, guest, "the guest unit no longer has Restart=always: update this test");
    let err = verify_guest_unit(&broken).unwrap_err();
    assert!(err.contains("sometimes"), "{err}");
    let broken = user.replace("RestartSec=2", "RestartSec=soon");
    assert_ne!(broken, user, "the user unit no longer has RestartSec=2: update this test");
    let err = verify_user_unit(&broken).unwrap_err();
    assert!(err.contains("soon"), "{err}");

    if let Err(e) = verify_guest_unit(&guest) {
        panic!("installer/guest/hostnet-agent.service: {e}");
    }
    if let Err(e) = verify_user_unit(&user) {
        panic!("installer/host/hostnet-proxy.service: {e}");
    }
}

/// Parses a plist with Python's `plistlib` and checks what launchd needs to start the proxy.
fn check_plist(path: &Path) -> Result<(), String> {
    const CHECK: &str = r#"
import plistlib, sys
with open(sys.argv[1], "rb") as f:
    p = plistlib.load(f, fmt=plistlib.FMT_XML)
assert p["Label"] == "dev.hostnet.proxy", p.get("Label")
args = p["ProgramArguments"]
assert args[0].endswith("/hostnet-proxy") and args[1] == "run", args
assert "--transport" in args, args
assert p["RunAtLoad"] is True and p["KeepAlive"] is True
# Nothing in a directory every local user can write: another user could plant a socket there.
for value in args + [p.get("StandardErrorPath", ""), p.get("StandardOutPath", "")]:
    for shared in ("/tmp/", "/private/tmp/", "/var/tmp/", "/Users/Shared/"):
        assert shared not in value, f"{value} is in the shared directory {shared}"
"#;
    quiet_success(Command::new("python3").args(["-c", CHECK]).arg(path))
}

#[test]
fn launchd_plist_is_a_valid_plist_that_starts_the_proxy() {
    require_tool("python3", "python3");
    let real = installer("host/dev.hostnet.proxy.plist");
    let text = std::fs::read_to_string(&real).unwrap();

    let scratch = Scratch::new("plist");
    let unclosed = scratch.write("unclosed.plist", &text.replace("</dict>", ""));
    assert!(check_plist(&unclosed).is_err(), "a plist missing </dict> passed");
    let no_run =
        scratch.write("no-run.plist", &text.replace("<string>run</string>", "<string>demo</string>"));
    assert!(check_plist(&no_run).is_err(), "a plist not running `hostnet-proxy run` passed");
    let shared = scratch.write(
        "shared.plist",
        &text.replace("/Users/USERNAME/Library/Application Support/hostnet/", "/Users/Shared/hostnet/"),
    );
    assert!(check_plist(&shared).is_err(), "a plist with its sockets in /Users/Shared passed");
    let tmp_log = scratch.write("tmp-log.plist", &text.replace("/Users/USERNAME/Library/Logs/", "/tmp/"));
    assert!(check_plist(&tmp_log).is_err(), "a plist logging to /tmp passed");

    if let Err(e) = check_plist(&real) {
        panic!("installer/host/dev.hostnet.proxy.plist: {e}");
    }
}

#[test]
fn openrc_script_is_valid_shell() {
    let real = installer("guest/hostnet-agent.openrc");
    let text = std::fs::read_to_string(&real).unwrap();
    assert!(text.starts_with("#!/sbin/openrc-run\n"), "not an OpenRC script");

    let scratch = Scratch::new("openrc");
    let broken = scratch.write("broken", &text.replace("depend() {", "depend() {{"));
    let sh_n = |p: &Path| quiet_success(Command::new("sh").arg("-n").arg(p));
    assert!(sh_n(&broken).is_err(), "sh -n accepted an unbalanced brace");

    if let Err(e) = sh_n(&real) {
        panic!("installer/guest/hostnet-agent.openrc: {e}");
    }
    for var in ["command=", "command_args=", "pidfile="] {
        assert!(text.contains(var), "the OpenRC script sets no {var}");
    }
}

/// The `/etc/passwd` that `systemd-sysusers` writes for `entry` in a scratch root.
fn sysusers_passwd(entry: &str) -> Result<String, String> {
    let root = Scratch::new("sysusers");
    root.write("etc/.keep", "");
    let mut child = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.0.display()))
        .arg("--replace=/etc/sysusers.d/hostnet-agent.conf")
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), entry.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stderr.contains("ignoring") || stderr.contains("Failed") {
        return Err(format!("{}: {stderr}", out.status));
    }
    std::fs::read_to_string(root.0.join("etc/passwd")).map_err(|e| format!("no /etc/passwd: {e}; {stderr}"))
}

#[test]
fn every_way_of_starting_the_agent_makes_it_the_unprivileged_hostnet_user() {
    require_tool("systemd-sysusers", "systemd");
    let entry = std::fs::read_to_string(installer("guest/hostnet-agent.sysusers")).unwrap();
    let broken = entry.replace("u hostnet", "u host:net");
    assert_ne!(broken, entry, "the sysusers entry no longer creates hostnet: update this test");
    assert!(sysusers_passwd(&broken).is_err(), "systemd-sysusers accepted a user name with ':'");

    let passwd =
        sysusers_passwd(&entry).unwrap_or_else(|e| panic!("installer/guest/hostnet-agent.sysusers: {e}"));
    let fields: Vec<&str> =
        passwd.lines().find(|l| l.starts_with("hostnet:")).expect("hostnet created").split(':').collect();
    assert!(fields[2] != "0" && fields[3] != "0", "hostnet is not root: {passwd}");

    let image = std::fs::read_to_string(installer("build-guest-image")).unwrap();
    assert!(image.contains("\nhostnet:x:999:999:"), "the VM image has a hostnet user");
    for (file, text) in [
        (
            "guest/hostnet-agent.service",
            std::fs::read_to_string(installer("guest/hostnet-agent.service")).unwrap(),
        ),
        (
            "guest/hostnet-agent.openrc",
            std::fs::read_to_string(installer("guest/hostnet-agent.openrc")).unwrap(),
        ),
        ("build-guest-image", image),
    ] {
        let starts = text.lines().filter(|l| {
            l.contains("hostnet-agent --transport")
                || l.starts_with("command_args=")
                || l.starts_with("ExecStart=")
        });
        let mut n = 0;
        for line in starts.filter(|l| !l.starts_with('#')) {
            n += 1;
            assert!(line.contains("--user hostnet"), "{file}: {line}");
        }
        assert!(n > 0, "{file} starts no agent");
    }
}

//! The real settings window, end to end: `hostnet-gui` under Xvfb against a running demo
//! proxy. A real mouse click (xdotool) on "Enable host networking" must close the forwarded
//! host port, a second click reopen it; the pixels of the switch are read back from the
//! screen, and a screenshot is saved to `target/gui-e2e.png`.
//!
//! Needs root (the demo), Xvfb, xdotool and ImageMagick's `import`; the README's test command
//! installs them. (WebDriver through tauri-driver would need a driver download; a real click
//! on the real window tests the same path a person takes.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use hostnet_tests::*;

/// A point inside the switch's box in the 760×620 window at (0, 0) (no window manager under
/// Xvfb): clicked to flip it, and read back — accent blue when on.
const SWITCH: (u32, u32) = (696, 52);

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The 8-bit colour of one screen pixel, read with ImageMagick (`… srgb(37,99,235)`).
fn pixel(display: &str, (x, y): (u32, u32)) -> (u32, u32, u32) {
    let out = Command::new("import")
        .env("DISPLAY", display)
        .args(["-window", "root", "-crop", &format!("1x1+{x}+{y}"), "-depth", "8", "txt:-"])
        .output()
        .expect("ImageMagick's import is needed; the README's setup installs it");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let inner =
        text.rsplit_once("rgb(").and_then(|(_, r)| r.split_once(')')).map(|(v, _)| v).unwrap_or_default();
    let v: Vec<u32> = inner.split(',').filter_map(|c| c.trim().parse().ok()).collect();
    (v.first().copied().unwrap_or(0), v.get(1).copied().unwrap_or(0), v.get(2).copied().unwrap_or(0))
}

/// The switch is drawn checked: the accent blue, not white or grey.
fn switch_is_on(display: &str) -> bool {
    let (r, g, b) = pixel(display, SWITCH);
    b > 180 && r < 120 && g < 160
}

fn click(display: &str) {
    let (x, y) = SWITCH;
    let ok = Command::new("xdotool")
        .env("DISPLAY", display)
        .args(["mousemove", &x.to_string(), &y.to_string(), "click", "1"])
        .status()
        .expect("xdotool is needed; the README's setup installs it");
    assert!(ok.success());
}

#[test]
fn flipping_the_switch_in_the_window_closes_and_reopens_the_port() {
    let demo = Demo::start();
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(SocketAddr::from(([0, 0, 0, 0], port)), false), echo);
    connect_when_forwarded(loopback(false, port));

    let n = 90 + std::process::id() % 100;
    let display = format!(":{n}");
    let _x = Killed(
        Command::new("Xvfb")
            .args([display.as_str(), "-screen", "0", "1024x768x24", "-nolisten", "tcp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Xvfb is needed; the README's setup installs it"),
    );
    wait_until("the X server is up", || Path::new(&format!("/tmp/.X11-unix/X{n}")).exists());
    let _gui = Killed(
        Command::new(env!("CARGO_BIN_EXE_hostnet-gui"))
            .env("DISPLAY", &display)
            .env("HOSTNET_ADMIN_SOCKET", &demo.admin_socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the window shows host networking on", || switch_is_on(&display));

    click(&display);
    let off = wait_until("the host port closes", || refused(loopback(false, port)));
    eprintln!("click → host port closed: {off:?}");
    assert_eq!(demo.status()["enabled"], false);
    wait_until("the window shows it off", || !switch_is_on(&display));

    click(&display);
    connect_when_forwarded(loopback(false, port));
    wait_until("the window shows it on again", || switch_is_on(&display));
    assert_eq!(demo.status()["enabled"], true);

    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/gui-e2e.png");
    let saved = Command::new("import")
        .env("DISPLAY", &display)
        .args(["-window", "root"])
        .arg(&shot)
        .status()
        .unwrap();
    assert!(saved.success(), "screenshot saved to {}", shot.display());
}

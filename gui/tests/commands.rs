//! The window's commands through Tauri's mock runtime (no display needed), against a fake
//! admin API that records what it was asked.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

use tauri::ipc::{CallbackFn, InvokeBody};
use tauri::test::{INVOKE_KEY, get_ipc_response, mock_builder, mock_context, noop_assets};
use tauri::webview::InvokeRequest;

const STATUS: &str = r#"{"enabled":true,"agent":"connected","settings_path":"/x/settings.toml","errors":[],"forwards":[
  {"proto":"tcp","direction":"to_guest","guest_port":8000,"host_port":8000,"state":"forwarding","host_addresses":["127.0.0.1"],"connections_active":1,"connections_total":3,"bytes_to_guest":1,"bytes_from_guest":2},
  {"proto":"udp","direction":"to_host","guest_port":53,"host_port":53,"state":"conflict","reason":"in use by dnsmasq (pid 9)","host_addresses":[],"connections_active":0,"connections_total":0,"bytes_to_guest":0,"bytes_from_guest":0},
  {"proto":"tcp","direction":"to_host","guest_port":5432,"host_port":5432,"state":"not_offered","reason":"127.0.0.1:5432: owned by another user","host_addresses":[],"connections_active":0,"connections_total":0,"bytes_to_guest":0,"bytes_from_guest":0}],
  "limits":["3 guest port(s) not forwarded over the limits on host ports"],
  "streams":{"held":2,"limit":8,"taken":298,"kept":300,"dropped":1}}"#;

/// A fake admin API on a temp socket: answers every request with `status` and logs requests.
fn fake_admin() -> (tempfile::TempDir, Arc<Mutex<Vec<String>>>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut w = conn.try_clone().unwrap();
            for line in BufReader::new(conn).lines().map_while(Result::ok) {
                log.lock().unwrap().push(line.clone());
                let answer = if line.contains("get_settings") {
                    r#"{"ok":true,"settings":{"enabled":false,"bind":"loopback","udp":true,"guest_to_host":true,"ignore_ports":["22"],"remap":{"80":8080}},"path":"/x/settings.toml"}"#.to_owned()
                } else if line.contains("update_settings") && line.contains("\"bind\":\"all\"") {
                    r#"{"ok":false,"error":"settings.toml: line 1: bind: no","field":"bind"}"#.to_owned()
                } else {
                    format!(r#"{{"ok":true,"status":{}}}"#, STATUS.replace('\n', ""))
                };
                let _ = writeln!(w, "{answer}");
            }
        }
    });
    // SAFETY: the tests of this file hold `SERIAL` while they set and use the variable, and
    // nothing else in this process reads or writes the environment meanwhile.
    unsafe { std::env::set_var("HOSTNET_ADMIN_SOCKET", &path) };
    (dir, seen)
}

static SERIAL: Mutex<()> = Mutex::new(());

fn invoke(cmd: &str, body: serde_json::Value) -> Result<serde_json::Value, serde_json::Value> {
    let app = hostnet_gui::builder(mock_builder()).build(mock_context(noop_assets())).unwrap();
    let webview = tauri::WebviewWindowBuilder::new(&app, "main", Default::default()).build().unwrap();
    let res = get_ipc_response(
        &webview,
        InvokeRequest {
            cmd: cmd.into(),
            callback: CallbackFn(0),
            error: CallbackFn(1),
            url: "tauri://localhost".parse().unwrap(),
            body: InvokeBody::Json(body),
            headers: Default::default(),
            invoke_key: INVOKE_KEY.to_string(),
        },
    );
    res.map(|b| b.deserialize::<serde_json::Value>().unwrap())
}

#[test]
fn status_is_mapped_for_the_window() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (_dir, _seen) = fake_admin();
    let view = invoke("get_status", serde_json::json!({})).unwrap();
    assert_eq!(view["enabled"], true);
    assert_eq!(view["banner"], serde_json::Value::Null);
    assert_eq!(view["forwards"][0]["direction"], "desktop → VM");
    assert_eq!(view["forwards"][0]["connections"], "1 open, 3 total");
    assert_eq!(view["forwards"][1]["direction"], "VM → desktop");
    assert_eq!(view["forwards"][1]["reason"], "in use by dnsmasq (pid 9)");
    // What the guest may not reach on this desktop, and why; limits the guest reached.
    assert_eq!(view["forwards"][2]["state"], "not_offered");
    assert_eq!(view["forwards"][2]["reason"], "127.0.0.1:5432: owned by another user");
    assert_eq!(
        view["limits"],
        serde_json::json!(["3 guest port(s) not forwarded over the limits on host ports"])
    );
    // The streams held for connections to come, in the words `hostnet-proxy status` uses.
    assert_eq!(
        view["streams"],
        "streams to the agent: 2 held for connections to come (at most 8); 298 connection(s) took one, 300 kept after a clean end, 1 closed unused"
    );
}

#[test]
fn the_guest_to_host_policy_is_validated_and_sent_whole() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (_dir, seen) = fake_admin();
    let mut s = serde_json::json!({"enabled":true,"bind":"loopback","udp":true,"guest_to_host":true,"ignore_ports":[],"remap":{},
        "take_freed_ports":true,"guest_to_host_policy":{"allow_ports":[],"deny_ports":["9222"],"only_allowed":true,"other_users":false}});
    // Only the allowed ports, and none allowed: caught in the window, next to the policy.
    let err = invoke("update_settings", serde_json::json!({ "settings": s.clone() })).unwrap_err();
    assert_eq!(err["field"], "guest_to_host_policy", "{err}");
    assert!(seen.lock().unwrap().iter().all(|l| !l.contains("update_settings")));
    s["guest_to_host_policy"]["allow_ports"] = serde_json::json!(["80", "8000-8100"]);
    invoke("update_settings", serde_json::json!({ "settings": s })).unwrap();
    let sent = seen.lock().unwrap().iter().find(|l| l.contains("update_settings")).cloned().unwrap();
    for part in [
        r#""allow_ports":["80","8000-8100"]"#,
        r#""deny_ports":["9222"]"#,
        r#""only_allowed":true"#,
        r#""take_freed_ports":true"#,
    ] {
        assert!(sent.contains(part), "{part} in {sent}");
    }
}

#[test]
fn the_toggle_sends_set_enabled() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (_dir, seen) = fake_admin();
    invoke("set_enabled", serde_json::json!({ "enabled": false })).unwrap();
    let log = seen.lock().unwrap().clone();
    assert!(log.iter().any(|l| l == r#"{"cmd":"set_enabled","enabled":false}"#), "{log:?}");
}

#[test]
fn settings_are_validated_before_and_by_the_proxy() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (_dir, seen) = fake_admin();
    let base = serde_json::json!({"enabled":true,"bind":"loopback","udp":true,"guest_to_host":true,"ignore_ports":[],"remap":{}});
    // Caught in the window: never sent.
    let mut bad = base.clone();
    bad["ignore_ports"] = serde_json::json!(["99999"]);
    let err = invoke("update_settings", serde_json::json!({ "settings": bad })).unwrap_err();
    assert_eq!(err["field"], "ignore_ports", "{err}");
    let mut clash = base.clone();
    clash["remap"] = serde_json::json!({"80": 9000, "81": 9000});
    let err = invoke("update_settings", serde_json::json!({ "settings": clash })).unwrap_err();
    assert_eq!(err["field"], "remap", "{err}");
    assert!(
        seen.lock().unwrap().iter().all(|l| !l.contains("update_settings")),
        "invalid settings never reach the proxy"
    );
    // Refused by the proxy: its field comes back.
    let mut all = base.clone();
    all["bind"] = serde_json::json!("all");
    let err = invoke("update_settings", serde_json::json!({ "settings": all })).unwrap_err();
    assert_eq!(err["field"], "bind", "{err}");
    // And a good one goes through.
    invoke("update_settings", serde_json::json!({ "settings": base })).unwrap();
}

#[test]
fn the_form_is_filled_from_the_proxys_settings() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (_dir, seen) = fake_admin();
    let settings = invoke("get_settings", serde_json::json!({})).unwrap();
    assert_eq!(settings["enabled"], false);
    assert_eq!(settings["ignore_ports"], serde_json::json!(["22"]));
    assert_eq!(settings["remap"]["80"], 8080);
    assert_eq!(seen.lock().unwrap().as_slice(), [r#"{"cmd":"get_settings"}"#]);
}

#[test]
fn no_proxy_is_reported_as_not_running() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: as in `fake_admin`: serialised by `SERIAL`.
    unsafe { std::env::set_var("HOSTNET_ADMIN_SOCKET", "/nonexistent/hostnet/admin.sock") };
    let err = invoke("get_status", serde_json::json!({})).unwrap_err();
    assert_eq!(err["kind"], "not_running", "{err}");
    assert!(err["message"].as_str().unwrap().contains("not running"));
}

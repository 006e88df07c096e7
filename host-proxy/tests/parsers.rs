//! Property tests for the proxy's own decoders: the settings file, port ranges and admin-API
//! requests. Any input is either accepted or refused with an error; nothing panics, and what is
//! accepted keeps its invariants and survives a round trip. (The wire decoders — preface,
//! frames, chunks, datagrams — have theirs in `protocol/`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use host_proxy::admin::Request;
use host_proxy::settings::{self, PortRange, Settings, SettingsFile};
use proptest::prelude::*;

/// A TOML value of any type the settings use, and some they do not.
fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        (0u32..70_000).prop_map(|n| n.to_string()),
        "\"(loopback|all|lan|)\"",
        "\"[0-9]{0,6}(-[0-9]{0,6})?\"",
        "\"[ -~]{0,12}\"".prop_map(|s| s.replace('\\', "/")),
        Just("1.5".to_owned()),
        Just("1979-05-27T07:32:00Z".to_owned()),
    ];
    leaf.prop_recursive(2, 16, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(", "))),
            proptest::collection::vec(("[0-9a-z]{1,6}", inner), 0..4).prop_map(|kv| {
                let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("\"{k}\" = {v}")).collect();
                format!("{{ {} }}", body.join(", "))
            }),
        ]
    })
}

/// A settings file made of the real keys (and a few wrong ones) with values of any type,
/// possibly a `[remap]` table with random guest ports, possibly cut short.
fn settings_text() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("enabled"),
        Just("bind"),
        Just("udp"),
        Just("guest_to_host"),
        Just("ignore_ports"),
        Just("remap"),
        Just("enabeld"),
        Just("max_connections"),
    ];
    let line = (key, toml_value()).prop_map(|(k, v)| format!("{k} = {v}"));
    let remap = proptest::collection::vec(("[0-9]{1,6}|[a-z]{1,3}", 0u32..70_000), 0..6);
    (proptest::collection::vec(line, 0..8), proptest::option::of(remap), any::<usize>()).prop_map(
        |(lines, remap, cut)| {
            let mut text = lines.join("\n");
            if let Some(remap) = remap {
                text.push_str("\n[remap]\n");
                for (g, h) in remap {
                    text.push_str(&format!("{g} = {h}\n"));
                }
            }
            // Sometimes a half-written file (cut on a character boundary).
            if cut % 4 == 0 && !text.is_empty() {
                let mut at = cut % text.len();
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.truncate(at);
            }
            text
        },
    )
}

/// What every accepted settings value must satisfy, and that it survives being saved.
fn check_accepted(s: &Settings) {
    assert!(s.validate().is_ok());
    let mut hosts = std::collections::BTreeSet::new();
    for (guest, &host) in &s.remap {
        assert!(guest.parse::<u16>().is_ok_and(|g| g > 0), "remap key {guest:?}");
        assert!(host > 0 && hosts.insert(host), "remap host port {host}");
    }
    for r in &s.ignore_ports {
        assert!(r.first >= 1 && r.first <= r.last, "{r:?}");
    }
    let text = toml::to_string(s).unwrap();
    assert_eq!(&Settings::parse(&text, Path::new("settings.toml")).unwrap(), s, "round trip of {text}");
}

/// A JSON value of any kind, for request fields.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        "[ -~]{0,10}".prop_map(serde_json::Value::from),
        "(loopback|all|[0-9]{1,5}(-[0-9]{1,5})?)".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                "(enabled|bind|udp|guest_to_host|ignore_ports|remap|[0-9]{1,5}|[a-z]{1,4})",
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A `settings` object for `update_settings`: the real keys with mostly plausible values,
/// sometimes of the wrong type or out of range, sometimes an unknown key.
fn settings_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let port = prop_oneof![4 => 1u32..65_536, 1 => 0u32..70_000];
    let range = prop_oneof![
        (1u32..65_536).prop_map(|p| p.to_string()),
        (1u32..65_536, 0u32..1000).prop_map(|(a, d)| format!("{a}-{}", a + d)),
        "[ -~]{0,8}",
    ];
    let value = prop_oneof![
        4 => any::<bool>().prop_map(|b| ("enabled", Value::from(b))),
        4 => any::<bool>().prop_map(|b| ("udp", Value::from(b))),
        4 => any::<bool>().prop_map(|b| ("guest_to_host", Value::from(b))),
        4 => "(loopback|all|lan)".prop_map(|b| ("bind", Value::from(b))),
        4 => proptest::collection::vec(range, 0..4).prop_map(|v| ("ignore_ports", Value::from(v))),
        4 => proptest::collection::btree_map("[0-9]{1,5}|x", port, 0..4).prop_map(|m| {
            ("remap", Value::Object(m.into_iter().map(|(k, v)| (k, Value::from(v))).collect()))
        }),
        1 => json_value().prop_map(|v| ("enabled", v)),
        1 => json_value().prop_map(|v| ("max_connections", v)),
    ];
    proptest::collection::vec(value, 0..6)
        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
}

/// A request line: a `cmd` the API knows (or not) with fields of any shape.
fn request_line() -> impl Strategy<Value = String> {
    let cmd = "(status|set_enabled|get_settings|update_settings|shutdown|)";
    let field = prop_oneof![
        6 => any::<bool>().prop_map(|b| ("enabled", serde_json::Value::from(b))),
        6 => settings_json().prop_map(|s| ("settings", s)),
        1 => json_value().prop_map(|v| ("enabled", v)),
        1 => json_value().prop_map(|v| ("settings", v)),
        1 => json_value().prop_map(|v| ("extra", v)),
        1 => "[ -~]{0,12}".prop_map(|c| ("cmd", serde_json::Value::from(c))),
    ];
    (cmd, proptest::collection::vec(field, 0..2)).prop_map(|(cmd, fields)| {
        let mut o: serde_json::Map<String, serde_json::Value> =
            fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        o.entry("cmd").or_insert(cmd.into());
        serde_json::Value::Object(o).to_string()
    })
}

proptest! {
    // Integration tests have no source file to persist failures next to: none, then.
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_text_is_a_settings_file_or_an_error(text in "\\PC{0,300}") {
        if let Ok(s) = Settings::parse(&text, Path::new("settings.toml")) {
            check_accepted(&s);
        }
    }

    #[test]
    fn settings_shaped_text_is_accepted_only_when_valid(text in settings_text()) {
        match Settings::parse(&text, Path::new("settings.toml")) {
            Ok(s) => check_accepted(&s),
            // Every refusal is a sentence naming the file.
            Err(e) => prop_assert!(e.to_string().starts_with("settings.toml: "), "{e}"),
        }
    }

    #[test]
    fn saving_over_any_file_gives_back_what_was_saved(old in "\\PC{0,200}", new in settings_text()) {
        let Ok(s) = Settings::parse(&new, Path::new("new.toml")) else { return Ok(()) };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("settings.toml");
        std::fs::write(&path, &old).unwrap();
        settings::save(&path, &s).unwrap();
        prop_assert_eq!(Settings::load(&path).unwrap(), s);
    }

    #[test]
    fn any_port_range_text_parses_or_is_refused(text in "\\PC{0,16}|[0-9 ]{0,6}-?[0-9 ]{0,6}") {
        if let Ok(r) = text.parse::<PortRange>() {
            prop_assert!(r.first >= 1 && r.first <= r.last);
            prop_assert_eq!(r.to_string().parse::<PortRange>().unwrap(), r);
        }
    }

    #[test]
    fn any_line_is_a_request_or_an_error(line in "\\PC{0,200}") {
        if let Ok(r) = serde_json::from_str::<Request>(&line) {
            let again = serde_json::to_string(&r).unwrap();
            prop_assert_eq!(serde_json::from_str::<Request>(&again).unwrap(), r);
        }
    }

    #[test]
    fn request_shaped_lines_are_accepted_only_when_valid(line in request_line()) {
        if let Ok(r) = serde_json::from_str::<Request>(&line) {
            // Only the fields its command takes: an unknown one is refused, for every command.
            let taken: &[&str] = match &r {
                Request::Status {} | Request::GetSettings {} => &["cmd"],
                Request::SetEnabled { .. } => &["cmd", "enabled"],
                Request::UpdateSettings { .. } => &["cmd", "settings"],
            };
            let sent: serde_json::Value = serde_json::from_str(&line).unwrap();
            let keys: Vec<&String> = sent.as_object().map(|o| o.keys().collect()).unwrap_or_default();
            prop_assert!(keys.iter().all(|k| taken.contains(&k.as_str())), "{} accepted as {:?}", line, r);
            if let Request::UpdateSettings { settings } = &r {
                // The API validates before applying; what it would apply keeps its invariants
                // or is refused.
                if settings.validate().is_ok() {
                    check_accepted(settings);
                }
            }
            let again = serde_json::to_string(&r).unwrap();
            prop_assert_eq!(serde_json::from_str::<Request>(&again).unwrap(), r);
        }
    }

    #[test]
    fn update_settings_requests_carry_only_valid_settings_or_are_refused(settings in settings_json()) {
        let line = serde_json::json!({ "cmd": "update_settings", "settings": settings }).to_string();
        match serde_json::from_str::<Request>(&line) {
            Ok(Request::UpdateSettings { settings }) => {
                if settings.validate().is_ok() {
                    check_accepted(&settings);
                }
            }
            Ok(other) => prop_assert!(false, "{line} parsed as {other:?}"),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

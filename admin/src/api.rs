//! What goes over the admin API, one JSON line each way (`docs/admin-api.md`): a [`Request`],
//! then a [`Response`]. Both serialise and deserialise, so the proxy, the command line and the
//! settings window share one definition and none of them reads fields by string key.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use hostnet_protocol::Proto;
use serde::{Deserialize, Serialize};

use crate::settings::Settings;

/// A request. Commands without arguments are empty struct variants, not unit variants:
/// serde ignores `deny_unknown_fields` on unit variants of an internally tagged enum, and
/// `{"cmd":"status","extra":1}` must be refused like any other unknown field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status {},
    SetEnabled { enabled: bool },
    GetSettings {},
    UpdateSettings { settings: Settings },
}

/// An answer. On the wire every answer is one object with `"ok"`: `{"ok":true,"status":…}`,
/// `{"ok":true,"settings":…,"path":…}`, or `{"ok":false,"error":"…","field":…}` (plus
/// `"busy":true` when the API turned the connection away).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WireResponse", into = "WireResponse")]
pub enum Response {
    /// `status`, `set_enabled` and `update_settings` answer with the status after the request.
    Status(Box<Status>),
    /// `get_settings`: the settings and the file they live in.
    Settings { settings: Settings, path: PathBuf },
    /// The request was refused, or could not be served.
    Error(ErrorReply),
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    /// A sentence for the user.
    pub error: String,
    /// The settings key the error is about (one of [`Settings::keys`]), for a form to show
    /// it next to that field.
    pub field: Option<String>,
    /// The API has [`crate::MAX_CLIENTS`] connections already: nothing was done, try again.
    pub busy: bool,
}

impl Response {
    /// A refusal that names no field.
    pub fn error(message: impl Into<String>) -> Response {
        Response::Error(ErrorReply { error: message.into(), field: None, busy: false })
    }

    /// A refusal about the settings key `field`.
    pub fn field_error(message: impl Into<String>, field: Option<&str>) -> Response {
        Response::Error(ErrorReply { error: message.into(), field: field.map(str::to_owned), busy: false })
    }

    /// The answer to a connection beyond [`crate::MAX_CLIENTS`], just before it is closed.
    pub fn busy() -> Response {
        Response::Error(ErrorReply {
            error: format!(
                "the admin API is busy: {} clients are connected; try again in a moment \
                 (a client silent for {:?} is closed)",
                crate::MAX_CLIENTS,
                crate::IDLE_TIMEOUT
            ),
            field: None,
            busy: true,
        })
    }

    pub fn is_busy(&self) -> bool {
        matches!(self, Response::Error(ErrorReply { busy: true, .. }))
    }

    /// The answer as one JSON line (without the newline).
    pub fn to_line(&self) -> String {
        // Serialising these types cannot fail (string keys, no custom serialisers that error);
        // should it ever, the client still gets a well-formed refusal.
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"ok":false,"error":"the proxy could not encode its answer: {e}","field":null}}"#)
        })
    }
}

/// The one object every answer is on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct WireResponse {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<Box<Status>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    settings: Option<Settings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Always written on an error (`null` when no key is concerned), never on success.
    #[serde(default, skip_serializing_if = "Field::is_absent")]
    field: Field,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    busy: bool,
}

/// `field`: absent (success), or present as a key or `null` (an error).
#[derive(Debug, Default)]
enum Field {
    #[default]
    Absent,
    Present(Option<String>),
}

impl Field {
    fn is_absent(&self) -> bool {
        matches!(self, Field::Absent)
    }
}

impl Serialize for Field {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Field::Absent | Field::Present(None) => s.serialize_none(),
            Field::Present(Some(k)) => s.serialize_str(k),
        }
    }
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Option::<String>::deserialize(d).map(Field::Present)
    }
}

impl From<Response> for WireResponse {
    fn from(r: Response) -> Self {
        let mut w = WireResponse {
            ok: true,
            status: None,
            settings: None,
            path: None,
            error: None,
            field: Field::Absent,
            busy: false,
        };
        match r {
            Response::Status(s) => w.status = Some(s),
            Response::Settings { settings, path } => (w.settings, w.path) = (Some(settings), Some(path)),
            Response::Error(e) => {
                w.ok = false;
                w.error = Some(e.error);
                w.field = Field::Present(e.field);
                w.busy = e.busy;
            }
        }
        w
    }
}

impl TryFrom<WireResponse> for Response {
    type Error = String;

    fn try_from(w: WireResponse) -> Result<Self, String> {
        let field = match w.field {
            Field::Absent => None,
            Field::Present(f) => f,
        };
        match w {
            WireResponse { ok: false, error, busy, .. } => Ok(Response::Error(ErrorReply {
                error: error.unwrap_or_else(|| "the proxy refused without a reason".to_owned()),
                field,
                busy,
            })),
            WireResponse { ok: true, status: Some(status), settings: None, .. } => {
                Ok(Response::Status(status))
            }
            WireResponse { ok: true, status: None, settings: Some(settings), path, .. } => {
                Ok(Response::Settings { settings, path: path.unwrap_or_default() })
            }
            WireResponse { ok: true, .. } => {
                Err("an \"ok\" answer carries exactly one of \"status\" and \"settings\"".to_owned())
            }
        }
    }
}

/// What `status` reports. A newer proxy may add fields; clients ignore what they do not know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// "Enable host networking".
    pub enabled: bool,
    pub agent: AgentLink,
    /// Why the last attempt to reach the agent failed, while [`AgentLink::Disconnected`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_error: Option<String>,
    pub settings_path: PathBuf,
    /// Problems the user should see (an invalid settings file, say).
    #[serde(default)]
    pub errors: Vec<String>,
    #[serde(default)]
    pub forwards: Vec<ForwardStatus>,
    /// Limits reached, each a sentence naming the limit and what changes it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<String>,
    /// The streams to the agent held for connections to come, when the proxy holds any
    /// (`--spare-streams`, `--reuse-streams`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<StreamPool>,
}

/// Streams to the agent the proxy holds for connections to come: opened ahead of need, or kept
/// after a connection on them ended cleanly (`docs/protocol.md`, section 3). Each is a stream
/// the agent holds open too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPool {
    /// Held now.
    pub held: usize,
    /// Held at most.
    pub limit: usize,
    /// Connections that took a held stream instead of setting up their own.
    pub taken: u64,
    /// Streams kept after their connection ended cleanly.
    pub kept: u64,
    /// Held streams closed unused: held too long, or the agent closed them.
    pub dropped: u64,
}

/// The one sentence `hostnet-proxy status` and the settings window show.
impl fmt::Display for StreamPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "streams to the agent: {} held for connections to come (at most {}); {} connection(s) took one, {} kept after a clean end, {} closed unused",
            self.held, self.limit, self.taken, self.kept, self.dropped
        )
    }
}

/// The control link to the agent in the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentLink {
    /// The agent's snapshot is applied; forwards follow it live.
    Connected,
    /// Trying to reach the agent.
    Connecting,
    /// The last attempt failed; retrying.
    Disconnected,
}

impl AgentLink {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentLink::Connected => "connected",
            AgentLink::Connecting => "connecting",
            AgentLink::Disconnected => "disconnected",
        }
    }
}

/// Which way a forward carries connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// A desktop port reaching a VM listener (host → guest).
    ToGuest,
    /// A VM process reaching a desktop listener as `localhost:PORT` (guest → host).
    ToHost,
}

impl Direction {
    /// As the status table prints it: `to guest`, `to host`.
    pub fn words(self) -> &'static str {
        match self {
            Direction::ToGuest => "to guest",
            Direction::ToHost => "to host",
        }
    }
}

/// Where a forward stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardState {
    /// Listening (to guest) or offered to the guest (to host), and relaying.
    Forwarding,
    /// The host port could not be bound (another program holds it, or privileges); retried.
    Conflict,
    /// The settings' `ignore_ports` names it.
    Ignored,
    /// Host networking (or UDP forwarding) is off in the settings.
    Disabled,
    /// Not forwarded: over a limit on the host ports the guest may take (`[limits]`); the
    /// reason names which.
    Limited,
    /// A desktop listener the guest→host policy does not offer the guest; the reason says why
    /// and which setting changes it.
    NotOffered,
}

impl ForwardState {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardState::Forwarding => "forwarding",
            ForwardState::Conflict => "conflict",
            ForwardState::Ignored => "ignored",
            ForwardState::Disabled => "disabled",
            ForwardState::Limited => "limited",
            ForwardState::NotOffered => "not_offered",
        }
    }
}

/// One forward as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardStatus {
    pub proto: Proto,
    pub direction: Direction,
    pub guest_port: u16,
    pub host_port: u16,
    pub state: ForwardState,
    /// Why it is not forwarding, or what is missing (one address of two held elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Host addresses the forward listens on (to guest) or connects to (to host).
    #[serde(default)]
    pub host_addresses: Vec<IpAddr>,
    #[serde(default)]
    pub connections_active: u64,
    #[serde(default)]
    pub connections_total: u64,
    /// Refused because a limit was reached: TCP connections, or UDP datagrams of new flows.
    #[serde(default)]
    pub connections_refused: u64,
    #[serde(default)]
    pub bytes_to_guest: u64,
    #[serde(default)]
    pub bytes_from_guest: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_status() -> Status {
        Status {
            enabled: true,
            agent: AgentLink::Disconnected,
            agent_error: Some("connection refused".into()),
            settings_path: "/home/me/.config/hostnet/settings.toml".into(),
            errors: vec!["settings.toml: line 1: bind: unknown variant".into()],
            forwards: vec![
                ForwardStatus {
                    proto: Proto::Tcp,
                    direction: Direction::ToGuest,
                    guest_port: 8000,
                    host_port: 8080,
                    state: ForwardState::Forwarding,
                    reason: None,
                    host_addresses: vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
                    connections_active: 1,
                    connections_total: 12,
                    connections_refused: 3,
                    bytes_to_guest: 5120,
                    bytes_from_guest: 80210,
                },
                ForwardStatus {
                    proto: Proto::Udp,
                    direction: Direction::ToHost,
                    guest_port: 53,
                    host_port: 53,
                    state: ForwardState::Conflict,
                    reason: Some("in use".into()),
                    host_addresses: vec![],
                    connections_active: 0,
                    connections_total: 0,
                    connections_refused: 0,
                    bytes_to_guest: 0,
                    bytes_from_guest: 0,
                },
            ],
            limits: vec!["3 guest→host stream(s) closed at once: 4096 were open, the limit".into()],
            streams: Some(StreamPool { held: 3, limit: 8, taken: 640, kept: 400, dropped: 2 }),
        }
    }

    #[test]
    fn every_response_round_trips() {
        let settings = Settings { udp: false, ..Settings::default() };
        for r in [
            Response::Status(Box::new(sample_status())),
            Response::Settings { settings, path: "/x/settings.toml".into() },
            Response::error("bad request: expected value"),
            Response::field_error("guest ports 80 and 81 are both remapped to host port 9000", Some("remap")),
            Response::busy(),
        ] {
            let line = r.to_line();
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(serde_json::from_str::<Response>(&line).unwrap(), r, "{line}");
        }
    }

    #[test]
    fn the_documented_wire_shapes_hold() {
        let v = |r: &Response| serde_json::to_value(r).unwrap();
        assert_eq!(
            v(&Response::field_error("no", Some("bind"))),
            serde_json::json!({"ok": false, "error": "no", "field": "bind"})
        );
        assert_eq!(v(&Response::error("no")), serde_json::json!({"ok": false, "error": "no", "field": null}));
        let busy = v(&Response::busy());
        assert_eq!((busy["ok"].clone(), busy["busy"].clone()), (false.into(), true.into()), "{busy}");
        let status = v(&Response::Status(Box::new(sample_status())));
        assert_eq!(status["ok"], true);
        assert!(status.get("field").is_none() && status.get("error").is_none(), "{status}");
        let f = &status["status"]["forwards"][0];
        assert_eq!(f["direction"], "to_guest");
        assert_eq!(f["state"], "forwarding");
        assert_eq!(f["proto"], "tcp");
        assert_eq!(f["host_addresses"][1], "::1");
        assert_eq!(status["status"]["agent"], "disconnected");
        assert_eq!(status["status"]["forwards"][1]["direction"], "to_host");
        let got = v(&Response::Settings { settings: Settings::default(), path: "/s.toml".into() });
        assert_eq!(got["path"], "/s.toml");
        assert_eq!(got["settings"]["bind"], "loopback");
    }

    #[test]
    fn a_status_from_the_docs_parses() {
        let line = r#"{"ok":true,"status":{"enabled":true,"agent":"connected","settings_path":"/x","errors":[],"forwards":[
          {"proto":"udp","direction":"to_host","guest_port":53,"host_port":53,"state":"conflict","reason":"in use by dnsmasq (pid 9)","host_addresses":[],"connections_active":0,"connections_total":0,"bytes_to_guest":0,"bytes_from_guest":0}]}}"#;
        let Response::Status(s) = serde_json::from_str(line).unwrap() else { panic!("not a status") };
        assert_eq!(s.agent, AgentLink::Connected);
        let f = &s.forwards[0];
        assert_eq!((f.direction, f.state, f.proto), (Direction::ToHost, ForwardState::Conflict, Proto::Udp));
        assert_eq!(f.connections_refused, 0, "a field an older proxy did not send defaults to 0");
        assert_eq!(f.reason.as_deref(), Some("in use by dnsmasq (pid 9)"));
    }

    #[test]
    fn malformed_answers_are_errors() {
        for line in [
            r#"{"ok":true}"#,
            r#"{"status":{}}"#,
            r#"{"ok":true,"status":{"enabled":true}}"#,
            r#"{"ok":true,"status":{"enabled":true,"agent":"asleep","settings_path":"/x"}}"#,
            r#"{"ok":true,"settings":{"enabeld":true},"path":"/x"}"#,
        ] {
            assert!(serde_json::from_str::<Response>(line).is_err(), "{line}");
        }
    }

    #[test]
    fn commands_without_arguments_keep_their_wire_shape() {
        for (line, want) in [
            (r#"{"cmd":"status"}"#, Request::Status {}),
            (r#"{"cmd":"get_settings"}"#, Request::GetSettings {}),
            (r#"{"cmd":"set_enabled","enabled":false}"#, Request::SetEnabled { enabled: false }),
        ] {
            assert_eq!(serde_json::from_str::<Request>(line).unwrap(), want);
            assert_eq!(serde_json::to_string(&want).unwrap(), line);
        }
        let update = Request::UpdateSettings { settings: Settings { enabled: false, ..Settings::default() } };
        let line = serde_json::to_string(&update).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), update);
    }

    #[test]
    fn an_unknown_field_is_refused_for_every_command() {
        for line in [
            r#"{"cmd":"status","extra":1}"#,
            r#"{"cmd":"status","enabled":false}"#,
            r#"{"cmd":"get_settings","path":"/etc/passwd"}"#,
            r#"{"cmd":"set_enabled","enabled":true,"extra":1}"#,
            r#"{"cmd":"update_settings","settings":{},"extra":1}"#,
            r#"{"cmd":"update_settings","settings":{"enabeld":true}}"#,
        ] {
            let e = serde_json::from_str::<Request>(line).unwrap_err();
            assert!(e.to_string().contains("unknown field"), "{line}: {e}");
        }
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
    }
}

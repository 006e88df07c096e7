//! hostnet's settings window (Tauri 2). It holds no networking logic: every command is one
//! request to the proxy's admin API (`docs/admin-api.md`), through `hostnet_admin`'s client.

use hostnet_admin::settings::Settings;
use hostnet_admin::{AgentLink, ClientError, Direction, Endpoint, Request, Response, Status};
use serde::Serialize;
use tauri::menu::{CheckMenuItem, Menu, MenuItem};
use tauri::tray::TrayIconBuilder;
use tauri::{Manager, Runtime};

/// An error the window shows: `not_running` (banner), `refused` (next to `field` if any).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UiError {
    pub kind: &'static str,
    pub message: String,
    pub field: Option<String>,
}

/// One row of the forwards table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ForwardRow {
    pub proto: String,
    /// "desktop → VM" or "VM → desktop".
    pub direction: &'static str,
    pub guest_port: u16,
    pub host_port: u16,
    pub state: String,
    pub reason: Option<String>,
    pub connections: String,
}

/// What the window renders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusView {
    pub enabled: bool,
    /// A banner across the top when something needs attention.
    pub banner: Option<String>,
    pub errors: Vec<String>,
    pub forwards: Vec<ForwardRow>,
    /// Limits the guest reached, each a sentence naming the setting that changes it.
    pub limits: Vec<String>,
    /// The streams to the agent held for connections to come, as a sentence, when there are.
    pub streams: Option<String>,
    pub settings_path: String,
}

/// The admin endpoint: `HOSTNET_ADMIN_SOCKET`, else the same default as `hostnet-proxy`.
pub fn endpoint() -> Result<Endpoint, UiError> {
    hostnet_admin::default_endpoint().map_err(|e| UiError {
        kind: "not_running",
        message: format!("hostnet's admin API cannot be found: {e}."),
        field: None,
    })
}

/// Maps the proxy's status to what the window shows.
pub fn view(status: &Status) -> StatusView {
    let banner = match status.agent {
        AgentLink::Connected => None,
        AgentLink::Connecting => Some("Connecting to the VM…".to_owned()),
        AgentLink::Disconnected => Some(format!(
            "The VM is not connected: hostnet is waiting for its agent{}",
            status.agent_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
        )),
    };
    let forwards = status
        .forwards
        .iter()
        .map(|f| ForwardRow {
            proto: f.proto.to_string().to_uppercase(),
            direction: match f.direction {
                Direction::ToGuest => "desktop → VM",
                Direction::ToHost => "VM → desktop",
            },
            guest_port: f.guest_port,
            host_port: f.host_port,
            state: f.state.as_str().to_owned(),
            reason: f.reason.clone(),
            connections: format!("{} open, {} total", f.connections_active, f.connections_total),
        })
        .collect();
    StatusView {
        enabled: status.enabled,
        banner,
        errors: status.errors.clone(),
        forwards,
        limits: status.limits.clone(),
        streams: status.streams.map(|p| p.to_string()),
        settings_path: status.settings_path.display().to_string(),
    }
}

/// One request; a refusal comes back as an error naming its field.
async fn call(req: &Request) -> Result<Response, UiError> {
    let endpoint = endpoint()?;
    let answer = hostnet_admin::request(&endpoint, req).await.map_err(|e| UiError {
        kind: match e {
            // Served by someone else: starting hostnet would not help; say what is wrong.
            ClientError::NotOurs { .. } | ClientError::Unsupported { .. } => "refused",
            _ => "not_running",
        },
        message: match &e {
            ClientError::TimedOut { .. } => format!("{e}; trying again."),
            ClientError::NotRunning { .. } => format!("{e}. Start hostnet-proxy."),
            _ => e.to_string(),
        },
        field: None,
    })?;
    match answer {
        Response::Error(e) => Err(UiError { kind: "refused", message: e.error, field: e.field }),
        answer => Ok(answer),
    }
}

fn status_of(answer: Response) -> Result<StatusView, UiError> {
    match answer {
        Response::Status(status) => Ok(view(&status)),
        other => Err(UiError {
            kind: "refused",
            message: format!("unexpected answer from the proxy: {other:?}"),
            field: None,
        }),
    }
}

/// The window's commands: each one admin-API request.
pub mod commands {
    use super::*;

    /// Current status.
    #[tauri::command]
    pub async fn get_status() -> Result<StatusView, UiError> {
        status_of(call(&Request::Status {}).await?)
    }

    /// The "Enable host networking" switch: applies at once, saved by the proxy.
    #[tauri::command]
    pub async fn set_enabled(enabled: bool) -> Result<StatusView, UiError> {
        status_of(call(&Request::SetEnabled { enabled }).await?)
    }

    /// The settings as the proxy has them.
    #[tauri::command]
    pub async fn get_settings() -> Result<Settings, UiError> {
        match call(&Request::GetSettings {}).await? {
            Response::Settings { settings, .. } => Ok(settings),
            other => Err(UiError {
                kind: "refused",
                message: format!("unexpected answer from the proxy: {other:?}"),
                field: None,
            }),
        }
    }

    /// Validates the form here first (the same rules as the proxy), then saves and applies.
    #[tauri::command]
    pub async fn update_settings(settings: serde_json::Value) -> Result<StatusView, UiError> {
        let settings = validate(settings)?;
        status_of(call(&Request::UpdateSettings { settings }).await?)
    }
}

/// The form's values as settings, or the first problem with the field it concerns.
pub fn validate(value: serde_json::Value) -> Result<Settings, UiError> {
    let field_of = |msg: &str| Settings::keys().iter().find(|k| msg.contains(*k)).map(|k| (*k).to_owned());
    let settings: Settings = serde_json::from_value(value).map_err(|e| {
        let message = e.to_string();
        let field =
            field_of(&message).or_else(|| message.contains("port").then(|| "ignore_ports".to_owned()));
        UiError { kind: "refused", message, field }
    })?;
    settings.validate().map_err(|(key, message)| UiError {
        kind: "refused",
        message,
        field: Some(key.to_owned()),
    })?;
    Ok(settings)
}

/// The tray/menu-bar entry: open the window, flip the switch, quit.
fn tray<R: Runtime>(app: &tauri::App<R>) -> tauri::Result<()> {
    let open = MenuItem::with_id(app, "open", "Open hostnet", true, None::<&str>)?;
    let toggle = CheckMenuItem::with_id(app, "toggle", "Enable host networking", true, true, None::<&str>)?;
    let quit = MenuItem::with_id(app, "quit", "Quit", true, None::<&str>)?;
    let menu = Menu::with_items(app, &[&open, &toggle, &quit])?;
    // The check mark shows the proxy's switch, not a guess.
    let shown = toggle.clone();
    tauri::async_runtime::spawn(async move {
        if let Ok(view) = commands::get_status().await {
            let _ = shown.set_checked(view.enabled);
        }
    });
    let mut builder = TrayIconBuilder::new().menu(&menu).tooltip("hostnet");
    if let Some(icon) = app.default_window_icon() {
        builder = builder.icon(icon.clone());
    }
    builder
        .on_menu_event(move |app, event| match event.id.as_ref() {
            "open" => {
                if let Some(w) = app.get_webview_window("main") {
                    let _ = w.show();
                    let _ = w.set_focus();
                }
            }
            "toggle" => {
                let enabled = toggle.is_checked().unwrap_or(true);
                let toggle = toggle.clone();
                tauri::async_runtime::spawn(async move {
                    // What the proxy did: back as it was if it refused or is not running.
                    let now = commands::set_enabled(enabled).await.map(|v| v.enabled).unwrap_or(!enabled);
                    let _ = toggle.set_checked(now);
                });
            }
            "quit" => app.exit(0),
            _ => {}
        })
        .build(app)?;
    Ok(())
}

/// Builds the app with its commands.
pub fn builder<R: Runtime>(b: tauri::Builder<R>) -> tauri::Builder<R> {
    b.invoke_handler(tauri::generate_handler![
        commands::get_status,
        commands::set_enabled,
        commands::get_settings,
        commands::update_settings
    ])
}

/// Runs the settings window.
pub fn run() {
    let result = builder(tauri::Builder::default())
        .setup(|app| {
            // No tray host (a bare X server, some desktops): the window still works.
            if let Err(e) = tray(app) {
                eprintln!("hostnet: no tray icon ({e}); the window works without it");
            }
            Ok(())
        })
        .run(tauri::generate_context!());
    if let Err(e) = result {
        eprintln!("hostnet: the settings window could not start: {e}");
        std::process::exit(1);
    }
}

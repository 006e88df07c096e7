//! hostnet's settings window (Tauri 2). It holds no networking logic: every command is one
//! request to the proxy's admin API (`docs/admin-api.md`), through `host_proxy::admin`.

use std::path::PathBuf;

use host_proxy::admin::{self, Request, Status};
use host_proxy::settings::Settings;
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
    pub guest_port: u64,
    pub host_port: u64,
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
    pub settings_path: String,
}

/// The admin socket: `HOSTNET_ADMIN_SOCKET`, else the same default as `hostnet-proxy`.
pub fn socket_path() -> PathBuf {
    std::env::var_os("HOSTNET_ADMIN_SOCKET").map(PathBuf::from).unwrap_or_else(admin::default_socket_path)
}

/// Maps the proxy's status to what the window shows.
pub fn view(status: &Status) -> StatusView {
    let banner = match status.agent.as_str() {
        "connected" => None,
        "connecting" => Some("Connecting to the VM…".to_owned()),
        _ => Some(format!(
            "The VM is not connected: hostnet is waiting for its agent{}",
            status.agent_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
        )),
    };
    let forwards = status
        .forwards
        .iter()
        .map(|f| {
            let num = |k: &str| f.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            let text = |k: &str| f.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            ForwardRow {
                proto: text("proto").to_uppercase(),
                direction: if text("direction") == "to_host" { "VM → desktop" } else { "desktop → VM" },
                guest_port: num("guest_port"),
                host_port: num("host_port"),
                state: text("state"),
                reason: f.get("reason").and_then(|v| v.as_str()).map(str::to_owned),
                connections: format!(
                    "{} open, {} total",
                    num("connections_active"),
                    num("connections_total")
                ),
            }
        })
        .collect();
    StatusView {
        enabled: status.enabled,
        banner,
        errors: status.errors.clone(),
        forwards,
        settings_path: status.settings_path.display().to_string(),
    }
}

async fn call(req: &Request) -> Result<serde_json::Value, UiError> {
    let path = socket_path();
    let answer = admin::request(&path, req).await.map_err(|e| UiError {
        kind: "not_running",
        message: if e.kind() == std::io::ErrorKind::TimedOut {
            // Running, but busy or stuck: starting another one would not help.
            format!("hostnet-proxy did not answer at {} ({e}); trying again.", path.display())
        } else {
            format!("hostnet is not running (no admin API at {}: {e}). Start hostnet-proxy.", path.display())
        },
        field: None,
    })?;
    if answer.get("ok").and_then(|v| v.as_bool()) == Some(true) {
        return Ok(answer);
    }
    Err(UiError {
        kind: "refused",
        message: answer.get("error").and_then(|v| v.as_str()).unwrap_or("the proxy refused").to_owned(),
        field: answer.get("field").and_then(|v| v.as_str()).map(str::to_owned),
    })
}

fn status_of(answer: &serde_json::Value) -> Result<StatusView, UiError> {
    let status: Status =
        serde_json::from_value(answer.get("status").cloned().unwrap_or_default()).map_err(|e| UiError {
            kind: "refused",
            message: format!("unexpected status from the proxy: {e}"),
            field: None,
        })?;
    Ok(view(&status))
}

/// The window's commands: each one admin-API request.
pub mod commands {
    use super::*;

    /// Current status.
    #[tauri::command]
    pub async fn get_status() -> Result<StatusView, UiError> {
        status_of(&call(&Request::Status {}).await?)
    }

    /// The "Enable host networking" switch: applies at once, saved by the proxy.
    #[tauri::command]
    pub async fn set_enabled(enabled: bool) -> Result<StatusView, UiError> {
        status_of(&call(&Request::SetEnabled { enabled }).await?)
    }

    /// The settings as the proxy has them.
    #[tauri::command]
    pub async fn get_settings() -> Result<serde_json::Value, UiError> {
        Ok(call(&Request::GetSettings {}).await?.get("settings").cloned().unwrap_or_default())
    }

    /// Validates the form here first (the same rules as the proxy), then saves and applies.
    #[tauri::command]
    pub async fn update_settings(settings: serde_json::Value) -> Result<StatusView, UiError> {
        let settings = validate(settings)?;
        status_of(&call(&Request::UpdateSettings { settings }).await?)
    }
}

/// The form's values as settings, or the first problem with the field it concerns.
pub fn validate(value: serde_json::Value) -> Result<Settings, UiError> {
    let field_of = |msg: &str| {
        ["enabled", "bind", "udp", "guest_to_host", "ignore_ports", "remap"]
            .iter()
            .find(|k| msg.contains(*k))
            .map(|k| (*k).to_owned())
    };
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
                tauri::async_runtime::spawn(async move {
                    let _ = commands::set_enabled(enabled).await;
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

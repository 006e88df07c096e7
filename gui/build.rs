fn main() {
    // Exactly the commands the window may call; capabilities/default.json allows these.
    tauri_build::try_build(tauri_build::Attributes::new().app_manifest(
        tauri_build::AppManifest::new().commands(&[
            "get_status",
            "set_enabled",
            "get_settings",
            "update_settings",
        ]),
    ))
    .unwrap_or_else(|e| panic!("tauri build step failed: {e}"));
}

//! `cargo afl fuzz` target: see `hostnet_fuzz::settings`.

fn main() {
    afl::fuzz!(|data: &[u8]| hostnet_fuzz::settings(data));
}

//! `cargo afl fuzz` target: see `hostnet_fuzz::handshake`.

fn main() {
    afl::fuzz!(|data: &[u8]| hostnet_fuzz::handshake(data));
}

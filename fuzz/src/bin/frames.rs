//! `cargo afl fuzz` target: see `hostnet_fuzz::frames`.

fn main() {
    afl::fuzz!(|data: &[u8]| hostnet_fuzz::frames(data));
}

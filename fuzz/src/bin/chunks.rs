//! `cargo afl fuzz` target: see `hostnet_fuzz::chunks`.

fn main() {
    afl::fuzz!(|data: &[u8]| hostnet_fuzz::chunks(data));
}

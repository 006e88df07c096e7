#!/usr/bin/env bash
# hostnet's developer entry point: sets the machine up, then builds and runs.
#
#   ./dev.sh demo [ARGS…]   build, then run `hostnet-proxy demo` (the netns stand-in for a VM)
#   ./dev.sh test           build, then run every check and test (what .ci/run runs)
#   ./dev.sh test --soak    the same, then the long soaks too (also: HOSTNET_SOAK=1)
#   ./dev.sh gui            build and open the settings window (run a demo first)
#   ./dev.sh setup          only install what the project needs
#
# Needs root: the demo and the end-to-end tests create network namespaces.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

require_root() {
    [ "$(id -u)" = 0 ] || die "./dev.sh $1 needs root (it creates network namespaces): run it as root, or with sudo ./dev.sh $1"
}

find_cargo() {
    command -v cargo >/dev/null && return
    # Under sudo, root's PATH lacks the invoking user's rustup toolchain.
    for home in "${CARGO_HOME:-}" "$HOME/.cargo" ${SUDO_USER:+"$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo"}; do
        if [ -n "$home" ] && [ -x "$home/bin/cargo" ]; then
            export PATH="$home/bin:$PATH"
            return
        fi
    done
    die "no Rust toolchain found: install one with rustup (stable), then run this again"
}

setup() {
    local missing=()
    command -v ip >/dev/null || missing+=(iproute2)
    dpkg-query -W -f='${Status}' netcat-openbsd 2>/dev/null | grep -q 'ok installed' || missing+=(netcat-openbsd)
    command -v setpriv >/dev/null || missing+=(util-linux)
    command -v nft >/dev/null || missing+=(nftables)
    command -v clang >/dev/null || missing+=(clang)      # the listener-events BPF program
    command -v curl >/dev/null || missing+=(curl)
    command -v python3 >/dev/null || missing+=(python3)          # also checks the launchd plist
    command -v systemd-analyze >/dev/null || missing+=(systemd)   # verifies the systemd units
    command -v xz >/dev/null || missing+=(xz-utils)        # guest image: kernel modules
    command -v depmod >/dev/null || missing+=(kmod)        # guest image: modules.dep
    command -v strip >/dev/null || missing+=(binutils)
    command -v socat >/dev/null || missing+=(socat)          # the benchmark's peer relay
    # The settings window (Tauri 2 / WebKitGTK) and its end-to-end test under Xvfb.
    for pkg in libwebkit2gtk-4.1-dev libayatana-appindicator3-dev pkg-config xvfb xauth imagemagick xdotool; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
    done
    command -v gcc >/dev/null || missing+=(gcc libc6-dev)
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        command -v apt-get >/dev/null || die "please install: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    find_cargo
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    setup)
        require_root setup
        setup
        say "ready"
        ;;
    demo)
        require_root demo
        setup
        say "building hostnet (release)"
        cargo build --release --locked -p host-proxy -p guest-agent
        say "starting the demo (Ctrl-C stops it and removes everything it created)"
        exec ./target/release/hostnet-proxy demo "$@"
        ;;
    gui)
        setup
        cargo run --locked -p hostnet-gui
        ;;
    test)
        soak="${HOSTNET_SOAK:-0}"
        for arg in "$@"; do
            case "$arg" in
                --soak) soak=1 ;;
                *) die "unknown option for ./dev.sh test: $arg (only --soak)" ;;
            esac
        done
        require_root test
        setup
        say "checking formatting"
        cargo fmt --all --check
        say "clippy"
        cargo clippy --workspace --all-targets --locked -- -D warnings
        say "building"
        cargo build --workspace --locked
        say "preparing the real VM (QEMU, vhost-device-vsock, guest image)"
        ./installer/vm-tools
        ./installer/build-guest-image
        say "testing (unit, property, in-process and end-to-end)"
        cargo test --workspace --locked
        say "replaying the fuzz targets' seeds and saved crashes (fuzzing itself: fuzz/run)"
        (cd fuzz && CARGO_TARGET_DIR=../target cargo test --locked -q)
        if [ "$soak" = 1 ]; then
            say "soaks (long: the tests marked #[ignore = \"soak …\"])"
            cargo test --workspace --locked -- --ignored
        fi
        say "benchmark, quick form (reports ratios; noise does not fail the run)"
        cargo build --release --locked -q -p host-proxy -p guest-agent -p hostnet-tests \
            --bin hostnet-proxy --bin hostnet-agent --bin hostnet-bench
        ./target/release/hostnet-bench --quick --json target/bench-quick.json \
            || echo "WARNING: the quick benchmark did not complete (see above)" >&2
        ;;
    *)
        sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac

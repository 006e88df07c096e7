#!/usr/bin/env bash
# hostnet's developer entry point: sets the machine up, then builds and runs.
#
#   ./dev.sh demo [ARGS…]   build, then run `hostnet-proxy demo` (the netns stand-in for a VM)
#   ./dev.sh demo --windows the same, with the desktop half being the Windows build under Wine
#   ./dev.sh test           build, then run every check and test (what .ci/run runs)
#   ./dev.sh test --soak    the same, then the long soaks too (also: HOSTNET_SOAK=1)
#   ./dev.sh gui            build and open the settings window (run a demo first)
#   ./dev.sh wine ARGS…     run the Windows hostnet-proxy.exe under Wine (e.g. status --json)
#   ./dev.sh setup          only install what the project needs
#
# Needs root (the demo and the end-to-end tests create network namespaces): run as root, or
# as a user with sudo — it asks for root itself.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Becomes root: as is when root already, else through sudo (keeping the user's Rust toolchain
# reachable), else says how.
become_root() {
    [ "$(id -u)" = 0 ] && return
    if command -v sudo >/dev/null; then
        say "./dev.sh $1 needs root (network namespaces): asking sudo"
        exec sudo --preserve-env=PATH,CARGO_HOME,RUSTUP_HOME,HOSTNET_SOAK,RUST_LOG,CI "$0" "$@"
    fi
    die "./dev.sh $1 needs root (it creates network namespaces) and sudo is not installed: run it as root"
}

find_cargo() {
    # Under sudo, root's HOME lacks the invoking user's rustup toolchain and its settings.
    local user_home=""
    [ -n "${SUDO_USER:-}" ] && user_home="$(getent passwd "$SUDO_USER" | cut -d: -f6)"
    if [ -z "${RUSTUP_HOME:-}" ] && [ ! -d "$HOME/.rustup" ] && [ -n "$user_home" ] && [ -d "$user_home/.rustup" ]; then
        export RUSTUP_HOME="$user_home/.rustup"
    fi
    command -v cargo >/dev/null && return
    for home in "${CARGO_HOME:-}" "$HOME/.cargo" ${user_home:+"$user_home/.cargo"}; do
        if [ -n "$home" ] && [ -x "$home/bin/cargo" ]; then
            export PATH="$home/bin:$PATH"
            return
        fi
    done
    die "no Rust toolchain found: install one with rustup (stable), then run this again"
}

# Installs the Debian packages named (those not installed yet).
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return
    say "installing Debian packages: ${missing[*]}"
    command -v apt-get >/dev/null || die "please install: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# What the demo needs: the namespace, the agent's interception, its listener-events program,
# and the tools the README's workflow types.
setup_demo() {
    apt_install iproute2 netcat-openbsd nftables clang curl python3 util-linux gcc libc6-dev
    find_cargo
}

# The macOS and Windows targets (checked; Windows also linked with MinGW and run under Wine).
DESKTOP_TARGETS=(aarch64-apple-darwin x86_64-apple-darwin x86_64-pc-windows-gnu)
WINDOWS_TARGET=x86_64-pc-windows-gnu
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc
# objc2's build script compiles Objective-C for Apple targets: clang takes -arch, gcc does not.
export CC_aarch64_apple_darwin=clang CC_x86_64_apple_darwin=clang

setup_windows() {
    apt_install gcc-mingw-w64-x86-64 wine64
    find_cargo
    local installed
    installed="$(rustup target list --installed 2>/dev/null || true)"
    for t in "$@"; do
        grep -qx "$t" <<<"$installed" || { say "adding the Rust target $t"; rustup target add "$t" >/dev/null; }
    done
}

# Builds the Windows proxy (PROFILE: debug or release) and, beside it, the stand-in DLL Wine 8
# needs (tests/wine/bcryptprimitives.c; never shipped).
build_windows() {
    local profile="$1" flag=()
    [ "$profile" = release ] && flag=(--release)
    say "building the Windows proxy ($profile, $WINDOWS_TARGET)"
    cargo build "${flag[@]}" --locked --target "$WINDOWS_TARGET" -p host-proxy --bin hostnet-proxy
    x86_64-w64-mingw32-gcc -O2 -shared -Wl,--kill-at -o "target/$WINDOWS_TARGET/$profile/bcryptprimitives.dll" \
        tests/wine/bcryptprimitives.c -ladvapi32
}

# Everything: the demo's, the tests' (systemd units, the guest image, the benchmark's peer,
# the settings window under Xvfb, capsh for the unprivileged run of the in-process tests) and
# the other desktops' (targets, MinGW, Wine).
setup() {
    setup_demo
    apt_install systemd xz-utils kmod binutils socat libcap2-bin \
        libwebkit2gtk-4.1-dev libayatana-appindicator3-dev pkg-config xvfb xauth imagemagick xdotool
    setup_windows "${DESKTOP_TARGETS[@]}"
}

# The desktop half: what must build on macOS and Windows (the settings window's tests drive
# Linux binaries, so only its library and program are checked there).
DESKTOP_CRATES=(-p hostnet-protocol -p hostnet-net -p hostnet-admin -p host-proxy)

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    setup)
        become_root setup "$@"
        setup
        say "ready"
        ;;
    demo)
        become_root demo "$@"
        setup_demo
        say "building hostnet (release)"
        cargo build --release --locked -p host-proxy -p guest-agent
        for arg in "$@"; do
            if [ "$arg" = --windows ]; then
                setup_windows "$WINDOWS_TARGET"
                build_windows release
            fi
        done
        say "starting the demo (Ctrl-C stops it and removes everything it created)"
        exec ./target/release/hostnet-proxy demo "$@"
        ;;
    wine)
        # The Windows proxy as the demo runs it: as root (the demo's user), in the same Wine
        # prefix — a named pipe is only seen within its prefix.
        become_root wine "$@"
        exe="target/$WINDOWS_TARGET/release/hostnet-proxy.exe"
        [ -f "$exe" ] || die "$exe not built yet: run ./dev.sh demo --windows first"
        export WINEPREFIX="${WINEPREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/hostnet/wine}"
        [ -d "$WINEPREFIX" ] || die "no Wine prefix at $WINEPREFIX: run ./dev.sh demo --windows first (as the same user)"
        WINEDEBUG=-all exec /usr/lib/wine/wine64 "$exe" "$@"
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
        become_root test "$@"
        setup
        say "checking formatting"
        cargo fmt --all --check
        say "clippy"
        cargo clippy --workspace --all-targets --locked -- -D warnings
        for t in "${DESKTOP_TARGETS[@]}"; do
            say "clippy for $t (the desktop crates)"
            cargo clippy --locked --target "$t" --all-targets "${DESKTOP_CRATES[@]}" -- -D warnings
            cargo clippy --locked --target "$t" --lib --bins -p hostnet-gui -- -D warnings
        done
        say "building"
        cargo build --workspace --locked
        build_windows debug
        say "preparing the real VM (QEMU, vhost-device-vsock, guest image)"
        ./installer/vm-tools
        ./installer/build-guest-image
        say "testing (unit, property, in-process and end-to-end)"
        cargo test --workspace --locked --no-fail-fast   # every failure shown, not only the first
        say "the in-process tests again without network or admin privileges (they must need none)"
        capsh --drop=cap_net_admin,cap_sys_admin,cap_bpf -- -c \
            'exec cargo test --locked -q -p hostnet-tests --test inproc'
        say "replaying the fuzz targets' seeds and saved crashes (fuzzing itself: fuzz/run)"
        (cd fuzz && CARGO_TARGET_DIR=../target cargo test --locked -q)
        if [ "$soak" = 1 ]; then
            say "soaks (long: the tests marked #[ignore = \"soak …\"])"
            cargo test --workspace --locked -- --ignored
        fi
        say "benchmark, quick form, the real VM included (reports ratios; noise does not fail the run)"
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

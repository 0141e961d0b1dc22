#!/usr/bin/env bash
# Installs what a fresh machine needs to build Conflux: the pinned toolchain and
# its wasm32-wasip2 target (rust-toolchain.toml), Node.js >= 20 and Python >=
# 3.10 with venv for the TypeScript and Python SDKs (Debian's packages; their
# npm and PyPI dependencies are installed by scripts/build-ts.sh and
# scripts/build-python.sh). protoc is vendored by the build (protoc-bin-vendored). Debian's chromium and chromium-driver are installed
# for the dashboard's browser test, and fuse3 (fusermount3) for the power-cut
# tests when not running as root (root mounts FUSE with mount(2) directly).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null; then
    echo "error: cargo/rustup not found; install Rust with rustup first" >&2
    exit 1
fi
# rustup reads rust-toolchain.toml and installs the pinned channel, its
# components and the wasm32-wasip2 target on first use; make that explicit.
rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install
rustup target add wasm32-wasip2 >/dev/null
# The dashboard's end-to-end test renders it in headless Chromium over
# WebDriver: Debian's chromium and chromium-driver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    echo "==> installing chromium and chromium-driver (for the dashboard's browser test)"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# The power-cut tests mount a FUSE filesystem (tests/powercut-fs): /dev/fuse,
# and as a non-root user the setuid fusermount3 from Debian's fuse3.
if [ "$(id -u)" -ne 0 ] && ! command -v fusermount3 >/dev/null && ! command -v fusermount >/dev/null; then
    echo "==> installing fuse3 (fusermount3, for the power-cut tests)"
    sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive sudo apt-get install -y -qq fuse3 >/dev/null
fi
if [ ! -e /dev/fuse ]; then
    echo "warning: /dev/fuse is missing: the power-cut tests (tests/powercut.rs) will fail" >&2
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
# The TypeScript SDK builds with componentize-js, which needs Node.js >= 20.
node_ok() {
    command -v node >/dev/null && command -v npm >/dev/null &&
        [ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ]
}
if ! node_ok; then
    echo "==> installing nodejs and npm (for the TypeScript SDK)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
    node_ok || { echo "error: Node.js >= 20 is needed; apt installed $(node --version 2>/dev/null || echo none)" >&2; exit 1; }
fi
# The Python SDK builds with componentize-py in a venv: Python >= 3.10 with venv.
python_ok() {
    command -v python3 >/dev/null &&
        python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1
}
if ! python_ok; then
    echo "==> installing python3 and python3-venv (for the Python SDK)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-venv >/dev/null
    python_ok || { echo "error: Python >= 3.10 with venv is needed" >&2; exit 1; }
fi

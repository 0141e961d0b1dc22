#!/usr/bin/env bash
# Installs what a fresh machine needs to build Conflux: the pinned toolchain and
# its wasm32-wasip2 target (rust-toolchain.toml). protoc is vendored by the
# build (protoc-bin-vendored), so there is no system package to install.
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

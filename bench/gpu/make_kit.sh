#!/usr/bin/env bash
# Gathers, on a machine with network, what the GPU machine lacks into .gpu-kit/ (git-ignored, sent along with
# the repository): the etcd server binary and the wheels of aetcd, grpcio, grpcio-health-checking,
# grpcio-reflection, protobuf and prometheus_client for CPython 3.12 on x86-64. The GPU machine has the rest
# (torch, triton, transformers, safetensors, tokenizers, uvloop, numpy, pytest). ../shared/gpu-kit is used when
# present.
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=.gpu-kit
SHARED=${GPU_KIT_SOURCE:-../shared/gpu-kit}  # an empty or missing folder: download
rm -rf "$KIT" && mkdir -p "$KIT/bin" "$KIT/wheels"
if [ -d "$SHARED" ]; then
    cp -r "$SHARED/bin/." "$KIT/bin/" && cp -r "$SHARED/wheels/." "$KIT/wheels/"
else
    python3 -m pip download -q --no-deps -d "$KIT/wheels" --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --implementation cp \
        aetcd==1.0.0 grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==6.33.6
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download etcd-server >/dev/null && dpkg -x etcd-server_*.deb root)
    cp "$tmp/root/usr/bin/etcd" "$KIT/bin/etcd"
    rm -rf "$tmp"
fi
# Pure Python, and newer than ../shared/gpu-kit: fetched when the kit lacks it.
ls "$KIT"/wheels/prometheus_client-*.whl > /dev/null 2>&1 ||
    python3 -m pip download -q --no-deps -d "$KIT/wheels" --only-binary=:all: prometheus_client==0.26.0
ls -R "$KIT"

#!/usr/bin/env bash
# Compile check of the shard server's CUDA path on a machine without a GPU (not part of CI:
# about 1.6 GB of packages and 15 minutes on 2 cores).
#
# Installs Debian bookworm's nvidia-cuda-toolkit (CUDA 11.8, from `non-free`) when nvcc is
# missing, builds switchyard-shard with `--features cuda`, then checks the binary: it links
# the CUDA libraries, `--device cuda` fails with a clear reason when there is no GPU, and
# `--device auto` falls back to the CPU and answers a request.
#   bash scripts/check-cuda.sh            # CUDA_COMPUTE_CAP=80 unless set
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"   # nothing to query without a GPU
target="${CARGO_TARGET_DIR:-target}"

if ! command -v nvcc >/dev/null; then
  echo "== installing nvidia-cuda-toolkit (Debian non-free)"
  src=/etc/apt/sources.list.d/switchyard-nonfree.sources
  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: contrib non-free\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' >"$src"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit
fi
nvcc --version | tail -1

echo "== building switchyard-shard --features cuda (compute capability $CUDA_COMPUTE_CAP)"
cargo build --locked -p switchyard-shard --features cuda
bin="$target/debug/switchyard-shard"
ldd "$bin" | grep -E 'libcuda|libcublas' || { echo "not linked against CUDA" >&2; exit 1; }

[ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ] || scripts/fetch-model.sh models
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
if nvidia-smi -L >/dev/null 2>&1; then
  echo "== a GPU is present: serving with --device cuda"
  device=cuda
else
  echo "== no GPU: --device cuda must refuse, --device auto must serve from the CPU"
  if out=$("$bin" serve --listen 127.0.0.1:0 --model "$model" --device cuda 2>&1); then
    echo "--device cuda started without a GPU" >&2; exit 1
  fi
  grep -q "cannot open CUDA device" <<<"$out" || { echo "unclear error: $out" >&2; exit 1; }
  device=auto
fi
log=$(mktemp)
"$bin" serve --listen 127.0.0.1:0 --model "$model" --device "$device" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 120); do grep -q '^ready ' "$log" && break; sleep 1; done
addr=$(sed -n 's/^ready //p' "$log" | head -1)
[ -n "$addr" ] || { cat "$log" >&2; exit 1; }
curl -sf "http://$addr/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":12,"temperature":0}'
echo
echo "== CUDA build checked (device: $device)"
# Leave the CPU build in target/debug, where the tests expect it (a relink: both builds'
# artifacts stay in the target folder).
cargo build --locked -q -p switchyard-shard

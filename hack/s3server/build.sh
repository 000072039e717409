#!/usr/bin/env bash
# Build (or locate) the S3-compatible test server: versitygw (Apache-2.0,
# https://github.com/versity/versitygw) from the Go module proxy, pinned by go.mod/go.sum here.
# Its posix backend keeps buckets as directories and objects as files (multipart uploads, ETags,
# object versions with --versioning-dir), so multi-GB uploads go to disk, not memory.
#
# Prints the folder holding the `versitygw` binary as the LAST line of stdout; progress goes to
# stderr. The binary lives outside the checkout:
#   ${QJOB_CACHE:-$HOME/.cache/qjob-operator}/s3server/versitygw-<version>-<hash>
# where <hash> covers go.mod, go.sum and this script; an existing folder is reused as is.
# A separate cache key from hack/localcluster/build.sh, so changing one never rebuilds the other.
#
# Environment:
#   QJOB_S3_BIN_DIR   use an existing folder holding `versitygw` instead of building
#   QJOB_CACHE        cache root (default $HOME/.cache/qjob-operator)
#   QJOB_BUILD_JOBS   go build -p value (default 1: the first build shares small machines)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { echo "s3server/build.sh: $*" >&2; }
version="$(awk '$1 == "github.com/versity/versitygw" {print $2}' "$here/go.mod")"

if [[ -n "${QJOB_S3_BIN_DIR:-}" ]]; then
  [[ -x "$QJOB_S3_BIN_DIR/versitygw" ]] || { log "QJOB_S3_BIN_DIR=$QJOB_S3_BIN_DIR has no versitygw"; exit 1; }
  cd "$QJOB_S3_BIN_DIR" && pwd
  exit 0
fi

hash="$(cd "$here" && cat build.sh go.mod go.sum | sha256sum | cut -c1-12)"
cache="${QJOB_CACHE:-$HOME/.cache/qjob-operator}"
out="$cache/s3server/versitygw-$version-$hash"
if [[ -x "$out/versitygw" ]]; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache/s3server"
exec 9>"$cache/s3server/.build.lock"
if ! flock -n 9; then
  log "another build is running; waiting for it ($cache/s3server/.build.lock)"
  flock 9
fi
if [[ -x "$out/versitygw" ]]; then
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { log "go is not installed (need Go >= 1.26)"; exit 1; }
log "building versitygw $version into $out (first build: a few minutes, ~200 MiB of modules)"
tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false"
start=$SECONDS
(cd "$here" && nice go build -p "${QJOB_BUILD_JOBS:-1}" -trimpath \
  -ldflags "-s -w -X main.Version=$version" -o "$tmp/versitygw" github.com/versity/versitygw/cmd/versitygw)
printf 'versitygw=%s\ngo=%s\nbuild_seconds=%s\n' "$version" "$(go env GOVERSION)" "$((SECONDS - start))" >"$tmp/VERSIONS"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
log "done in $((SECONDS - start))s: $out"
echo "$out"

#!/usr/bin/env bash
# Instructions (callgrind) and syscalls (perf raw_syscalls:sys_enter) per request, one request in
# flight, HTTP/1.1 and h2c. Default targets: strait,envoy,haproxy,nginx; pass --peers to choose.
#   benches/count.sh [--peers strait] [-n 1000] [--json out.json] [--keep dir-for-callgrind-dumps [--lines]]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export STRAIT_BIN="${STRAIT_BIN:-${CARGO_TARGET_DIR:-$here/../target}/release/strait}"
if [[ -z "${ENVOY_BIN:-}" ]]; then
    ENVOY_BIN="$(command -v envoy || true)"
    [[ -z "$ENVOY_BIN" && -x /work/venv-envoy/bin/envoy ]] && ENVOY_BIN=/work/venv-envoy/bin/envoy
    export ENVOY_BIN
fi
for tool in valgrind callgrind_control perf h2load nginx taskset python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y valgrind linux-perf nghttp2-client nginx)" >&2; exit 2; }
done
exec python3 "$here/count.py" "$@"

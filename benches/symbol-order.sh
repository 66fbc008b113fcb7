#!/usr/bin/env bash
# Writes benches/symbol-order.txt: the functions a release build of Strait runs, from start-up
# through HTTP/1.1, h2c, gRPC (HTTP/2 upstream), uploads, new connections and admin requests, in
# three groups: the request path (hottest first), then what only start-up runs, then what only
# admin pages and shutdown run. Once serving, Strait unmaps the pages start-up ran
# (src/memory.rs); a request-path function placed among start-up code would map a window of it
# back. Admin-only code (the descriptor pool behind /config_dump) should not be resident at
# all unless a page is served. build.rs hands the list to the linker (lld's --symbol-ordering-file), which
# places those functions together at the start of .text: the kernel maps a binary's pages 64 KiB
# around each page a process touches, so code run scattered over the whole 9 MB .text maps most
# of it, and grouped it maps a fraction (BENCHMARKS.md, "Memory: symbol ordering").
# Rerun after changes to the request path or start-up (inlining moves code between functions),
# and after a rustc or dependency update (names carry the crates' disambiguators, which change
# with them): a stale list only groups less well, names that no longer exist are ignored. Names
# are v0-mangled (.cargo/config.toml), so editing a function's body does not rename it.
#   cargo build --release && benches/symbol-order.sh && cargo build --release
# Profile a plain `cargo build --release` binary: building examples or benches with it turns on
# dev-dependency features (tokio's among them), which changes the crates' hashes in every name.
# Needs valgrind, nginx, curl and h2load.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${STRAIT_BIN:-${CARGO_TARGET_DIR:-$here/../target}/release/strait}"
for tool in valgrind callgrind_control nginx curl h2load python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done
[[ -x "$bin" ]] || { echo "no release build at $bin: cargo build --release" >&2; exit 2; }
work="$(mktemp -d)"
cleanup() {
    [[ -n "${ngx:-}" ]] && kill "$ngx" 2>/dev/null || true
    [[ -n "${pid:-}" ]] && kill -9 "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The bench configuration, on ports of its own (28xxx) so a running bench is not disturbed.
sed -e 's/18001/28101/; s/18000/28100/; s/18080/28180/; s/18082/28182/' \
    "$here/peers/strait-envoy.yaml" > "$work/bootstrap.yaml"
sed -e 's/18080/28180/; s/18082/28182/; s/18081/28181/' "$here/peers/upstream-nginx.conf" > "$work/up.conf"
mkdir -p "$work/ng/logs" "$work/ng/tmp"
nginx -p "$work/ng" -c "$work/up.conf" &
ngx=$!
for _ in $(seq 100); do
    curl -fs -o /dev/null http://127.0.0.1:28180/ && break
    sleep 0.05
done

valgrind --tool=callgrind --demangle=no --dump-line=no --callgrind-out-file="$work/cg.out" \
    "$bin" -c "$work/bootstrap.yaml" --concurrency 1 --drain-time-s 1 -l error \
    > "$work/strait.log" 2>&1 &
pid=$!
for _ in $(seq 600); do
    curl -fs -o /dev/null http://127.0.0.1:28101/ready && break
    sleep 0.1
done
# Part 1: start-up, up to the first readiness probe. Nothing proxied yet: what the first request
# runs once (CPU feature detection, say) belongs with the request path, which is all that stays
# mapped once Strait has unmapped what start-up ran (src/memory.rs).
callgrind_control --dump=startup "$pid" >/dev/null 2>&1
url=http://127.0.0.1:28100/
# Every request must succeed: a profile of error paths would order the wrong functions.
load() {
    local out
    out="$(h2load "$@")"
    grep -q " 0 failed, 0 errored" <<< "$out" && grep -q "0 4xx, 0 5xx" <<< "$out" ||
        { echo "requests failed while profiling: $*" >&2; echo "$out" >&2; exit 1; }
}
load --h1 -c2 -n400 "$url"
load -c2 -m4 -n400 "$url"
# The benches' concurrency too (wrk -c50, h2load -c10 -m10): more connections than the pool keeps
# idle, and the allocator's cross-thread paths, run only there.
load --h1 -c50 -n5000 "$url"
load -c10 -m10 -n5000 "$url"
printf '\x00\x00\x00\x00\x0a0123456789' > "$work/grpc.bin"
load -c2 -m4 -n200 -d "$work/grpc.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
    http://127.0.0.1:28100/bench.Echo/Unary
head -c 1048576 /dev/zero > "$work/1m.bin"
for _ in 1 2 3; do
    curl -fs -o /dev/null --data-binary @"$work/1m.bin" "$url"
    curl -fs -o /dev/null -H 'Connection: close' "$url"
done
# Clients that go away with requests in flight (wrk and h2load at the end of a timed run) and
# readiness probes, which a sidecar answers all day.
h2load --h1 -c50 -D 2 "$url" >/dev/null 2>&1 || true
h2load -c10 -m10 -D 2 "$url" >/dev/null 2>&1 || true
for _ in 1 2 3; do
    curl -fs -o /dev/null http://127.0.0.1:28101/ready
done
# Part 2: the request path, with the connections' teardown: under callgrind the proxy may still
# be closing the clients' connections when they exit, so give it a moment before the dump.
sleep 2
callgrind_control --dump=requests "$pid" >/dev/null 2>&1
for p in ready stats stats/prometheus clusters config_dump server_info; do
    curl -fs -o /dev/null "http://127.0.0.1:28101/$p"
done
kill -TERM "$pid"
wait "$pid" || true
pid=

python3 - "$work" "$here/symbol-order.txt" "$(basename "$bin")" <<'PY'
import glob, re, sys
work, dst, binname = sys.argv[1:4]


def part_number(path):
    tail = path.rsplit(".", 1)[1]
    return int(tail) if tail.isdigit() else 1 << 30  # an unnumbered file is the final part


def profile(src):
    """Self cost (Ir) per function of the binary in one callgrind part."""
    names, objs, fn_obj, cost = {}, {}, {}, {}
    cur = cur_ob = None
    skip = False
    for line in open(src, errors="replace"):
        m = re.match(r"(c?fn|c?ob)=\((\d+)\)(?: (.*))?", line)
        if m:
            kind, fid, name = m.groups()
            table = objs if kind.endswith("ob") else names
            if name:
                table[fid] = name.strip()
            if kind == "ob":
                cur_ob = fid
            elif kind == "fn":
                cur = fid
                fn_obj[fid] = cur_ob
            continue
        if line.startswith("calls="):
            skip = True  # the next cost line is the call's inclusive cost
            continue
        if line[:1].isdigit() or line[:1] in "+-*":
            if skip:
                skip = False
            elif cur is not None:
                fields = line.split()
                if len(fields) > 1:
                    cost[cur] = cost.get(cur, 0) + int(fields[1])
    # Callgrind names recursion levels `name'2`, `name'3`: one symbol.
    by_name = {}
    for f, c in cost.items():
        if c > 0 and objs.get(fn_obj.get(f), "").endswith("/" + binname):
            name = re.sub(r"'\d+$", "", names[f])
            by_name[name] = by_name.get(name, 0) + c
    return by_name


# Parts in dump order: start-up, requests, then admin pages and shutdown (the final dump).
parts = sorted(glob.glob(f"{work}/cg.out*"), key=part_number)
if len(parts) != 3:
    sys.exit(f"expected 3 callgrind parts (start-up, requests, the rest), found {parts}")
startup, requests, rest = (profile(p) for p in parts)
# The main thread's loop (tokio's block_on, inlined into main) and the task that unmaps what
# start-up ran (src/memory.rs) run on after that unmapping: placed among start-up code they
# would map a window of it back.
after_unmap = {n for n in set(startup) - set(requests) if re.search(r"_6strait(4main|6memory)", n)}
only_startup = set(startup) - set(requests) - after_unmap
only_rest = set(rest) - set(requests) - set(startup)
ours = sorted(requests, key=lambda n: -requests[n])
ours += sorted(after_unmap, key=lambda n: -startup[n])
ours += sorted(only_startup, key=lambda n: -startup[n])
ours += sorted(only_rest, key=lambda n: -rest[n])
with open(dst, "w") as out:
    for n in ours:
        out.write(n + "\n")
print(f"{len(ours)} functions written to {dst}: {len(requests)} on the request path, "
      f"{len(after_unmap)} run after start-up is unmapped, {len(only_startup)} start-up only, "
      f"{len(only_rest)} admin pages / shutdown only")
PY

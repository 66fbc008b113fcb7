#!/usr/bin/env python3
"""Per-request instruction and syscall counts, one request in flight: user-space instructions from
callgrind on the running proxy (instrumentation off during startup and warm-up, counters zeroed,
N sequential requests, dump) and syscalls from perf's raw_syscalls:sys_enter tracepoint.

Protocols (--protos): h1 (HTTP/1.1 both ways), h2c (h2c downstream, HTTP/1.1 upstream), grpc (h2c
downstream and HTTP/2 upstream: bench.py's gRPC workload, unary calls of a 15-byte framed message
to /bench.Echo/Unary, which the peers route to the upstream's h2c port), newconn (HTTP/1.1 with
`Connection: close`: a new downstream connection per request, upstream connections pooled)."""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (shared peer definitions and process helpers)

WARMUP = 200


PROTOS = ("h1", "h2c", "grpc", "newconn")


def grpc_message(work):
    """The request body of bench.py's gRPC workload: a framed 10-byte message."""
    path = os.path.join(work, "grpc-msg.bin")
    with open(path, "wb") as f:
        f.write(b"\x00\x00\x00\x00\x0a" + b"0123456789")
    return path


def client(proto, peer, n, work=None):
    """One connection, one request at a time (newconn: a connection per request)."""
    if proto == "newconn":
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "newconn_client.py")
        return ["taskset", "-c", bench.LOAD_CPU, sys.executable, script, "-n", str(n),
                str(peer.h1_port)]
    port = peer.h1_port if proto == "h1" else peer.h2_port
    argv = ["h2load", "-t1", "-c1", "-m1", "-n", str(n), f"http://127.0.0.1:{port}/"]
    if proto == "h1":
        argv.insert(1, "--h1")
    if proto == "grpc":
        argv[-1] = f"http://127.0.0.1:{port}/bench.Echo/Unary"
        argv[1:1] = ["-d", grpc_message(work or tempfile.gettempdir()),
                     "-H", "content-type: application/grpc", "-H", "te: trailers"]
    return ["taskset", "-c", bench.LOAD_CPU] + argv


def run_client(argv):
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600).stdout
    m = re.search(r"(\d+) succeeded", out)
    ok = int(m.group(1)) if m else 0
    if ok != int(argv[argv.index("-n") + 1]):
        raise RuntimeError(f"client did not complete all requests:\n{out[-1500:]}")


def callgrind_total(path):
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def control(*args):
    subprocess.run(["callgrind_control", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True, timeout=120)


def instructions(peer, work, n, keep_dir, lines=False, protos=("h1", "h2c")):
    """Ir per request for each protocol, from one callgrind run of the proxy."""
    cg_out = os.path.join(work, f"callgrind.{peer.name}.%p")
    vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={cg_out}",
          "--dump-line=" + ("yes" if lines else "no")]
    peer.argv = vg + peer.argv
    peer.ready_timeout = 300.0
    peer.start(work)
    pid = str(peer.pid)
    res = {}
    try:
        for proto in protos:
            run_client(client(proto, peer, WARMUP, work))
            control("-i", "on", pid)
            control("-z", pid)
            run_client(client(proto, peer, n, work))
            control("-d", proto, pid)
            control("-i", "off", pid)
            dumps = sorted(glob.glob(os.path.join(work, f"callgrind.{peer.name}.{pid}.*")),
                           key=os.path.getmtime)
            if not dumps:
                raise RuntimeError("callgrind wrote no dump")
            res[proto] = callgrind_total(dumps[-1]) / n
            if keep_dir:
                shutil.copy(dumps[-1], os.path.join(keep_dir, f"callgrind.{peer.name}.{proto}.out"))
    finally:
        peer.stop()
    return res


def syscalls(peer, work, n, protos=("h1", "h2c")):
    peer.start(work)
    res = {}
    try:
        for proto in protos:
            run_client(client(proto, peer, WARMUP, work))
            out = os.path.join(work, "perf.csv")
            subprocess.run(["perf", "stat", "-e", "raw_syscalls:sys_enter", "-x", ",", "-o", out,
                            "-p", str(peer.pid), "--"] + client(proto, peer, n, work),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=600)
            with open(out) as f:
                for line in f:
                    parts = line.strip().split(",")
                    if len(parts) > 2 and parts[2] == "raw_syscalls:sys_enter":
                        res[proto] = int(parts[0]) / n
            if proto not in res:
                raise RuntimeError("perf printed no raw_syscalls:sys_enter count")
    finally:
        peer.stop()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", default="strait,envoy,haproxy,nginx")
    ap.add_argument("-n", type=int, default=1000, help="sequential requests counted per protocol")
    ap.add_argument("--no-instructions", action="store_true")
    ap.add_argument("--protos", default="h1,h2c",
                    help=f"comma-separated, of {','.join(PROTOS)} (grpc: h2c down, HTTP/2 up)")
    ap.add_argument("--keep", help="copy callgrind dumps here")
    ap.add_argument("--lines", action="store_true",
                    help="with --keep: record source lines in the dumps (callgrind_annotate --auto=yes)")
    ap.add_argument("--json", help="write the counts here")
    ap.add_argument("--strait-bin", default=os.environ.get("STRAIT_BIN", os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target")), "release", "strait")))
    ap.add_argument("--strait-config", default=os.environ.get("STRAIT_CONFIG"),
                    help="bootstrap for the strait rows (default peers/strait-envoy.yaml)")
    ap.add_argument("--envoy-bin", default=os.environ.get("ENVOY_BIN", shutil.which("envoy") or "envoy"))
    ap.add_argument("--haproxy-bin", default=os.environ.get("HAPROXY_BIN", shutil.which("haproxy") or "haproxy"))
    ap.add_argument("--nginx-bin", default=os.environ.get("NGINX_BIN", shutil.which("nginx") or "/usr/sbin/nginx"))
    args = ap.parse_args()
    args.peers = [p for p in args.peers.split(",") if p]
    args.protos = [p for p in args.protos.split(",") if p]
    for p in args.protos:
        if p not in PROTOS:
            sys.exit(f"unknown protocol {p!r}; known: {', '.join(PROTOS)}")
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)

    for port in (bench.UPSTREAM_H1, bench.UPSTREAM_H2, bench.PROXY_PORT, bench.PROXY_ADMIN, bench.NGINX_H2_PORT):
        if not bench.port_free(port):
            sys.exit(f"port {port} is in use")
    work = tempfile.mkdtemp(prefix="strait-count.")
    os.makedirs(os.path.join(work, "tmp"), exist_ok=True)
    up_log = open(os.path.join(work, "upstream.log"), "ab")
    upstream = subprocess.Popen(["taskset", "-c", bench.LOAD_CPU, args.nginx_bin, "-p", work + "/", "-c",
                                 os.path.join(bench.PEERS_DIR, "upstream-nginx.conf")],
                                cwd=work, stdout=up_log, stderr=up_log, stdin=subprocess.DEVNULL)
    counts = {}
    try:
        bench.wait_ok(bench.UPSTREAM_H1, proc=upstream)
        for name in args.peers:
            counts[name] = {}
            try:
                peer = bench.make_peers(argparse.Namespace(**{**vars(args), "peers": [name]}), work)[0]
                sc = syscalls(peer, work, args.n, args.protos)
                counts[name].update({f"syscalls_{k}": v for k, v in sc.items()})
                if not args.no_instructions:
                    peer = bench.make_peers(argparse.Namespace(**{**vars(args), "peers": [name]}), work)[0]
                    ins = instructions(peer, work, args.n, args.keep, args.lines, args.protos)
                    counts[name].update({f"instructions_{k}": v for k, v in ins.items()})
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                bench.log(f"{name}: {e}\n{bench.tail(os.path.join(work, name + '.log'))}")
            bench.log(f"{name}: {counts[name]}")
            time.sleep(0.2)
    finally:
        bench.stop(upstream)
    cols = args.protos
    print("\n| target | " + " | ".join(f"instructions/request {p}" for p in cols) + " | "
          + " | ".join(f"syscalls/request {p}" for p in cols) + " |")
    print("|---|" + "---:|" * (2 * len(cols)))
    for name, c in counts.items():
        def f(k, nd):
            v = c.get(k)
            return "–" if v is None else f"{v:,.{nd}f}"
        print(f"| {name} | " + " | ".join(f(f"instructions_{p}", 0) for p in cols) + " | "
              + " | ".join(f(f"syscalls_{p}", 2) for p in cols) + " |")
    print(f"\n{args.n} sequential requests on one connection after {WARMUP} unmeasured ones; "
          "instructions: callgrind Ir, all threads, user space; syscalls: perf raw_syscalls:sys_enter.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(counts, f, indent=1, sort_keys=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

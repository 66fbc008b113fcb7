//! Shared support for Strait's end-to-end tests: the real `strait` binary on a generated
//! bootstrap, real upstream servers on 127.0.0.1:0, real clients (hyper, curl, h2load).
//! Every wait here is bounded, and nothing sleeps where a signal exists to wait on.
//!
//! Differential runs: `STRAIT_TEST_BIN=/path/to/envoy cargo test --test routing` runs the same
//! tests against Envoy itself (the spec), which checks the tests' expectations.
#![allow(dead_code)]

pub mod filters;
pub mod xds;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Upper bound for any single exchange or wait in these tests.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`TIMEOUT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    within_for(TIMEOUT, what, fut).await
}

/// Reads what the proxy sends a raw upstream up to the end of its request head.
pub async fn read_request_head(c: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.ends_with(b"\r\n\r\n") {
        let n = within("the request head", c.read(&mut buf)).await.unwrap();
        assert!(n > 0, "the proxy closed before its request head");
        head.extend_from_slice(&buf[..n]);
    }
    head
}

pub async fn within_for<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

// === Bodies ===

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];

/// `n` bytes of `x`, produced lazily in 64 KiB chunks (never held in memory at once).
pub fn generated(n: u64) -> Body {
    let stream = futures_util::stream::unfold(n, |left| async move {
        if left == 0 {
            return None;
        }
        let take = left.min(CHUNK.len() as u64) as usize;
        let frame: Result<Frame<Bytes>, BoxError> =
            Ok(Frame::data(Bytes::from_static(&CHUNK[..take])));
        Some((frame, left - take as u64))
    });
    StreamBody::new(stream).boxed()
}

/// Reads a body to its end, counting bytes without keeping them. Returns (bytes, trailers).
pub async fn drain_body<B>(mut body: B) -> Result<(u64, Option<HeaderMap>), BoxError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut n = 0u64;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        match frame.into_data() {
            Ok(d) => n += d.len() as u64,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    Ok((n, trailers))
}

// === Responses and the hyper client ===

/// A whole response as a client saw it.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        match serde_json::from_slice(&self.body) {
            Ok(v) => v,
            Err(e) => panic!("response body is not JSON ({e}): {:?}", self.text()),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Which demo upstream answered (the `x-upstream` header set by [`Reply::Echo`]).
    pub fn upstream(&self) -> Option<&str> {
        self.header("x-upstream")
    }
}

/// A hyper client (HTTP/1.1 keep-alive, or HTTP/2 with prior knowledge).
#[derive(Clone)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<HttpConnector, Body>,
}

impl Client {
    pub fn http1() -> Client {
        Self::build(false)
    }

    pub fn h2c() -> Client {
        Self::build(true)
    }

    fn build(h2: bool) -> Client {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(h2)
            .build(conn);
        Client { inner }
    }

    /// Sends and reads the whole response, or the error (bounded by [`TIMEOUT`]).
    pub async fn try_send(&self, req: Request<Body>) -> Result<Resp, BoxError> {
        let fut = async {
            let resp = self.inner.request(req).await?;
            let (parts, body) = resp.into_parts();
            let collected = body.collect().await?;
            let trailers = collected.trailers().cloned();
            Ok(Resp {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body: collected.to_bytes(),
                trailers,
            })
        };
        match tokio::time::timeout(TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err("client timed out".into()),
        }
    }

    pub async fn send(&self, req: Request<Body>) -> Resp {
        let what = format!("{} {}", req.method(), req.uri());
        match self.try_send(req).await {
            Ok(r) => r,
            Err(e) => panic!("{what}: {e}"),
        }
    }

    /// Sends and returns the streaming response (headers only awaited).
    pub async fn send_streaming(&self, req: Request<Body>) -> Response<Incoming> {
        let what = format!("{} {}", req.method(), req.uri());
        match within(&what, self.inner.request(req)).await {
            Ok(r) => r,
            Err(e) => panic!("{what}: {e}"),
        }
    }

    /// A bodiless GET whose response body is left to the caller to read.
    pub async fn get_streaming(&self, url: &str) -> Response<Incoming> {
        self.send_streaming(req(Method::GET, url, &[], empty()))
            .await
    }

    pub async fn get(&self, url: &str) -> Resp {
        self.get_with(url, &[]).await
    }

    pub async fn get_with(&self, url: &str, headers: &[(&str, &str)]) -> Resp {
        self.send(req(Method::GET, url, headers, empty())).await
    }

    pub async fn post(&self, url: &str, body: impl Into<Bytes>) -> Resp {
        self.send(req(Method::POST, url, &[], full(body))).await
    }
}

/// One HTTP/1.1 connection to `addr`, used for requests in sequence (unlike [`Client`], whose
/// pool may open a second connection when a request races the first one's return to the pool).
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Body>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Conn {
        let stream = match connect(addr).await {
            Ok(s) => s,
            Err(e) => panic!("connect {addr}: {e}"),
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = match within(
            "handshake",
            hyper::client::conn::http1::handshake(TokioIo::new(stream)),
        )
        .await
        {
            Ok(x) => x,
            Err(e) => panic!("handshake {addr}: {e}"),
        };
        tokio::spawn(conn);
        Conn { sender }
    }

    /// Sends on this connection and reads the whole response. An absolute URL is sent in origin
    /// form with its authority as `Host`, as a browser or curl would.
    pub async fn send(&mut self, mut req: Request<Body>) -> Result<Resp, BoxError> {
        if let Some(authority) = req.uri().authority().cloned() {
            if !req.headers().contains_key("host") {
                req.headers_mut()
                    .insert("host", HeaderValue::from_str(authority.as_str())?);
            }
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            *req.uri_mut() = pq.parse()?;
        }
        let fut = async {
            self.sender.ready().await?;
            let resp = self.sender.send_request(req).await?;
            let (parts, body) = resp.into_parts();
            let collected = body.collect().await?;
            let trailers = collected.trailers().cloned();
            Ok(Resp {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body: collected.to_bytes(),
                trailers,
            })
        };
        match tokio::time::timeout(TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err("request on connection timed out".into()),
        }
    }
}

/// Builds a request; header names/values are test literals (a bad one is a test bug).
pub fn req(method: Method, url: &str, headers: &[(&str, &str)], body: Body) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    match b.body(body) {
        Ok(r) => r,
        Err(e) => panic!("bad test request {url}: {e}"),
    }
}

// === The proxy under test ===

/// A running `strait` process (or Envoy, see the module doc), killed on drop.
pub struct Strait {
    child: tokio::process::Child,
    pid: u32,
    dir: tempfile::TempDir,
    admin: SocketAddr,
    listeners: HashMap<String, SocketAddr>,
    admin_client: Client,
}

fn binary() -> String {
    std::env::var("STRAIT_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_strait").to_string())
}

/// Whether the tests run against Envoy (the differential pass) rather than Strait.
#[allow(dead_code)]
pub fn under_envoy() -> bool {
    binary().ends_with("envoy")
}

impl Strait {
    /// Starts the proxy with `yaml` and waits (bounded) until `/ready` answers 200.
    pub async fn start(yaml: &str) -> Strait {
        Self::start_with(yaml, &[]).await
    }

    pub async fn start_with(yaml: &str, extra_args: &[&str]) -> Strait {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let cfg = dir.path().join("bootstrap.yaml");
        let admin_path = dir.path().join("admin-address");
        write(&cfg, yaml);
        let stdout = create(&dir.path().join("stdout.log"));
        let stderr = create(&dir.path().join("stderr.log"));
        let bin = binary();
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.arg("-c")
            .arg(&cfg)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["-l", "info", "--concurrency", "2", "--drain-time-s", "5"])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        if bin.ends_with("envoy") {
            // Parallel Envoys would fight over the hot-restart shared memory.
            cmd.arg("--disable-hot-restart");
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("spawn {bin}: {e}"),
        };
        let pid = child.id().unwrap_or(0);
        let admin_client = Client::http1();
        let deadline = Instant::now() + TIMEOUT;
        let admin = loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "proxy exited during start-up with {status}\nstderr:\n{}\nconfig:\n{yaml}",
                    read(&dir.path().join("stderr.log"))
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "proxy not ready within {TIMEOUT:?}\nstderr:\n{}",
                    read(&dir.path().join("stderr.log"))
                );
            }
            // The admin address file and then `/ready` are the start-up signals; poll them.
            if let Some(addr) = std::fs::read_to_string(&admin_path)
                .ok()
                .and_then(|s| s.trim().parse::<SocketAddr>().ok())
            {
                let url = format!("http://{addr}/ready");
                if let Ok(r) = admin_client
                    .try_send(req(Method::GET, &url, &[], empty()))
                    .await
                {
                    if r.status == StatusCode::OK {
                        break addr;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut s = Strait {
            child,
            pid,
            dir,
            admin,
            listeners: HashMap::new(),
            admin_client,
        };
        let l = s.admin_get("/listeners?format=json").await.json();
        for st in l["listener_statuses"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let name = st["name"].as_str().unwrap_or_default().to_string();
            let sa = &st["local_address"]["socket_address"];
            let ip = sa["address"].as_str().unwrap_or_default();
            let port = sa["port_value"].as_u64().unwrap_or(0);
            match format!("{ip}:{port}").parse::<SocketAddr>() {
                Ok(a) => {
                    s.listeners.insert(name, a);
                }
                Err(e) => panic!("bad /listeners entry {st}: {e}"),
            }
        }
        s
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    pub fn listener(&self, name: &str) -> SocketAddr {
        match self.listeners.get(name) {
            Some(a) => *a,
            None => panic!("no listener {name:?} in {:?}", self.listeners),
        }
    }

    /// `http://<ingress listener><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listener("ingress"))
    }

    pub async fn admin_get(&self, path: &str) -> Resp {
        let url = format!("http://{}{path}", self.admin);
        self.admin_client.get(&url).await
    }

    pub async fn admin_post(&self, path: &str) -> Resp {
        let url = format!("http://{}{path}", self.admin);
        self.admin_client
            .send(req(Method::POST, &url, &[], empty()))
            .await
    }

    /// Every integer stat from `/stats` (text `name: value` lines).
    pub async fn stats(&self) -> HashMap<String, i64> {
        let text = self.admin_get("/stats").await.text();
        text.lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(": ")?;
                Some((k.to_string(), v.trim().parse::<i64>().ok()?))
            })
            .collect()
    }

    pub async fn stat(&self, name: &str) -> Option<i64> {
        self.stats().await.get(name).copied()
    }

    /// Polls `/stats` until `name` equals `want` (stats are updated when a stream ends, which
    /// can be just after the client saw the response). Returns the last value seen.
    pub async fn wait_stat(&self, name: &str, want: i64) -> Option<i64> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = self.stat(name).await;
            if v == Some(want) || Instant::now() > deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn stdout(&self) -> String {
        read(&self.dir.path().join("stdout.log"))
    }

    pub fn stderr(&self) -> String {
        read(&self.dir.path().join("stderr.log"))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Waits (bounded; access logs are written in the background) until `file` has at least `n`
    /// lines containing `needle`, and returns those lines.
    pub async fn wait_lines(&self, file: &Path, needle: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let lines: Vec<String> = read(file)
                .lines()
                .filter(|l| l.contains(needle))
                .map(str::to_string)
                .collect();
            if lines.len() >= n {
                return lines;
            }
            if Instant::now() > deadline {
                panic!(
                    "expected {n} line(s) with {needle:?} in {file:?}, got:\n{}",
                    read(file)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Lines of the proxy's stderr (its log) containing `needle` (waits for at least `n`).
    pub async fn log_lines(&self, needle: &str, n: usize) -> Vec<String> {
        let f = self.dir.path().join("stderr.log");
        self.wait_lines(&f, needle, n).await
    }

    /// Access-log lines on stdout containing `needle` (waits for at least `n`).
    pub async fn access_log(&self, needle: &str, n: usize) -> Vec<String> {
        let f = self.dir.path().join("stdout.log");
        self.wait_lines(&f, needle, n).await
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid as i32);
        match pid.map(|p| rustix::process::kill_process(p, sig)) {
            Some(Ok(())) => {}
            other => panic!("signal {sig:?} to {}: {other:?}", self.pid),
        }
    }

    pub fn sigterm(&self) {
        self.signal(rustix::process::Signal::TERM);
    }

    pub fn sigint(&self) {
        self.signal(rustix::process::Signal::INT);
    }

    /// Waits (bounded, 30 s) for the process to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        match within_for(Duration::from_secs(30), "proxy exit", self.child.wait()).await {
            Ok(s) => s,
            Err(e) => panic!("wait: {e}"),
        }
    }

    /// Resets the proxy's peak RSS (VmHWM) to its current RSS, so start-up peaks do not count.
    /// False where the kernel does not support it.
    pub fn reset_peak_rss(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5").is_ok()
    }

    /// (VmRSS, VmHWM) of the proxy process in KiB, from /proc/<pid>/status.
    pub fn memory_kb(&self) -> (u64, u64) {
        let status = read(Path::new(&format!("/proc/{}/status", self.pid)));
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/{}/status", self.pid))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Strait {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let tail = |s: String| s[s.len().saturating_sub(6000)..].to_string();
            eprintln!("--- proxy stderr (tail) ---\n{}", tail(self.stderr()));
            eprintln!("--- proxy stdout (tail) ---\n{}", tail(self.stdout()));
        }
    }
}

fn write(path: &Path, s: &str) {
    if let Err(e) = std::fs::write(path, s) {
        panic!("write {path:?}: {e}");
    }
}

fn create(path: &Path) -> std::fs::File {
    match std::fs::File::create(path) {
        Ok(f) => f,
        Err(e) => panic!("create {path:?}: {e}"),
    }
}

pub fn read(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

// === Upstreams ===

/// What a scripted upstream answers.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with header `x-upstream: NAME` and a JSON body describing the request:
    /// `{"upstream","method","path","authority","version","headers":{name:[values]},"body","trailers"}`.
    Echo,
    /// This status, empty body, `x-upstream` header.
    Status(u16),
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Bytes,
    },
    /// Waits, then answers.
    Delay(Duration, Box<Reply>),
    /// Drops the stream without answering (HTTP/1.1: connection closed; HTTP/2: RST_STREAM).
    Reset,
    /// Streams the request body back.
    EchoBody,
    /// Reads the request body without keeping it; answers `{"bytes":N,"trailers":{..}}`.
    CountBody,
    /// Streams N generated bytes.
    Stream(u64),
    /// Body `trailers follow`, then these trailers.
    Trailers(Vec<(String, String)>),
    /// Never answers.
    Hang,
}

/// A request as an upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    /// Path and query.
    pub path: String,
    /// `:authority` (HTTP/2) or `Host` (HTTP/1.1).
    pub authority: Option<String>,
    pub version: Version,
    pub headers: HeaderMap,
}

struct UpState {
    name: String,
    accepts: AtomicUsize,
    requests: AtomicUsize,
    /// Notified on every request, after `requests` counts it.
    arrived: tokio::sync::Notify,
    active: AtomicUsize,
    max_active: AtomicUsize,
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Reply>,
    seen: Mutex<Vec<Seen>>,
}

/// A real HTTP server on 127.0.0.1:0 speaking HTTP/1.1 and h2c (prior knowledge), answering from a
/// script, counting connections and requests. Stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<UpState>,
    task: tokio::task::JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Upstream {
    /// Answers every request with [`Reply::Echo`] unless scripted otherwise.
    pub async fn start(name: &str) -> Upstream {
        Self::start_with(name, Reply::Echo).await
    }

    pub async fn start_with(name: &str, default: Reply) -> Upstream {
        let listener = bind().await;
        let addr = local_addr(&listener);
        let state = Arc::new(UpState {
            name: name.to_string(),
            accepts: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            arrived: tokio::sync::Notify::new(),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(default),
            seen: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            // Connections live in the set so that dropping the upstream closes them all.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        st.accepts.fetch_add(1, Ordering::SeqCst);
                        let st = st.clone();
                        conns.spawn(async move {
                            let svc = hyper::service::service_fn(move |r| handle(st.clone(), r));
                            let builder =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Upstream { addr, state, task }
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Queues replies for the next requests, in order; afterwards the default applies.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        lock(&self.state.script).extend(replies);
    }

    pub fn set_default(&self, reply: Reply) {
        *lock(&self.state.default) = reply;
    }

    /// TCP connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.state.accepts.load(Ordering::SeqCst)
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until this upstream has received `n` requests: the signal that a request
    /// the proxy forwards is in flight upstream.
    pub async fn wait_requests(&self, n: usize) {
        within(
            &format!("{n} request(s) at upstream {}", self.name()),
            async {
                loop {
                    let arrived = self.state.arrived.notified();
                    tokio::pin!(arrived);
                    arrived.as_mut().enable();
                    if self.requests() >= n {
                        return;
                    }
                    arrived.await;
                }
            },
        )
        .await
    }

    /// Most requests ever in flight at once.
    pub fn max_concurrent(&self) -> usize {
        self.state.max_active.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }

    pub fn last_seen(&self) -> Seen {
        match self.seen().pop() {
            Some(s) => s,
            None => panic!("upstream {} saw no request", self.name()),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct ActiveGuard(Arc<UpState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(st: Arc<UpState>, req: Request<Incoming>) -> Result<Response<Body>, BoxError> {
    st.requests.fetch_add(1, Ordering::SeqCst);
    st.arrived.notify_waiters();
    let now = st.active.fetch_add(1, Ordering::SeqCst) + 1;
    st.max_active.fetch_max(now, Ordering::SeqCst);
    let _guard = ActiveGuard(st.clone());
    let (parts, body) = req.into_parts();
    let authority = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
        parts
            .headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
    });
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "/".to_string());
    lock(&st.seen).push(Seen {
        method: parts.method.clone(),
        path: path.clone(),
        authority: authority.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
    });
    let scripted = lock(&st.script).pop_front();
    let mut reply = scripted.unwrap_or_else(|| lock(&st.default).clone());
    while let Reply::Delay(d, next) = reply {
        tokio::time::sleep(d).await;
        reply = *next;
    }
    let name = st.name.clone();
    let resp = |status: u16, body: Body| -> Result<Response<Body>, BoxError> {
        Ok(Response::builder()
            .status(status)
            .header("x-upstream", name.as_str())
            .body(body)?)
    };
    match reply {
        Reply::Echo => {
            let collected = body.collect().await?;
            let trailers = collected.trailers().map(headers_json);
            let bytes = collected.to_bytes();
            let v = json!({
                "upstream": st.name,
                "method": parts.method.as_str(),
                "path": path,
                "authority": authority,
                "version": format!("{:?}", parts.version),
                "headers": headers_json(&parts.headers),
                "body": String::from_utf8_lossy(&bytes),
                "trailers": trailers,
            });
            let mut r = resp(200, full(v.to_string()))?;
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            Ok(r)
        }
        Reply::Status(code) => resp(code, empty()),
        Reply::Full {
            status,
            headers,
            body: b,
        } => {
            let mut r = resp(status, full(b))?;
            for (k, v) in headers {
                r.headers_mut().append(
                    HeaderName::from_bytes(k.as_bytes())?,
                    HeaderValue::from_str(&v)?,
                );
            }
            Ok(r)
        }
        Reply::Delay(..) => Err("unreachable".into()),
        Reply::Reset => Err("scripted reset".into()),
        Reply::EchoBody => resp(200, body.map_err(BoxError::from).boxed()),
        Reply::CountBody => {
            let (n, trailers) = drain_body(body).await?;
            let v = json!({"bytes": n, "trailers": trailers.as_ref().map(headers_json)});
            resp(200, full(v.to_string()))
        }
        Reply::Stream(n) => resp(200, generated(n)),
        Reply::Trailers(list) => {
            let mut t = HeaderMap::new();
            for (k, v) in list {
                t.append(
                    HeaderName::from_bytes(k.as_bytes())?,
                    HeaderValue::from_str(&v)?,
                );
            }
            let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                Ok(Frame::data(Bytes::from_static(b"trailers follow"))),
                Ok(Frame::trailers(t)),
            ];
            resp(
                200,
                StreamBody::new(futures_util::stream::iter(frames)).boxed(),
            )
        }
        Reply::Hang => {
            std::future::pending::<()>().await;
            Err("unreachable".into())
        }
    }
}

/// `{name: [values...]}` for a header map.
pub fn headers_json(h: &HeaderMap) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in h {
        let entry = m.entry(k.as_str()).or_insert_with(|| json!([]));
        if let Value::Array(a) = entry {
            a.push(Value::String(
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            ));
        }
    }
    Value::Object(m)
}

/// A TCP listener that accepts connections and never answers. Stops when dropped.
pub struct Blackhole {
    pub addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let listener = bind().await;
        let addr = local_addr(&listener);
        let accepts = Arc::new(AtomicUsize::new(0));
        let a = accepts.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
        Blackhole {
            addr,
            accepts,
            task,
        }
    }

    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address nothing listens on: connecting is refused. The port stays bound, without a
/// listen, for the rest of the process, so no listener started later can be given it.
pub async fn closed_port() -> SocketAddr {
    let bound = tokio::net::TcpSocket::new_v4().and_then(|s| {
        s.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        Ok((s.local_addr()?, s))
    });
    match bound {
        Ok((addr, socket)) => {
            std::mem::forget(socket);
            addr
        }
        Err(e) => panic!("reserve a closed port: {e}"),
    }
}

pub async fn bind() -> TcpListener {
    match TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => panic!("bind 127.0.0.1:0: {e}"),
    }
}

pub fn local_addr(l: &TcpListener) -> SocketAddr {
    match l.local_addr() {
        Ok(a) => a,
        Err(e) => panic!("local_addr: {e}"),
    }
}

/// Opens a plain TCP connection (bounded), or returns the error.
pub async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    match tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

// === Bootstrap builder ===

/// A bootstrap with admin on 127.0.0.1:0 and one listener `ingress` on 127.0.0.1:0 (stat_prefix
/// `ingress`, codec AUTO, default-format access log to stdout). JSON is valid YAML, so the
/// builder assembles JSON values.
#[derive(Debug, Clone)]
pub struct Config {
    route_config: Value,
    clusters: Vec<Value>,
    hcm: serde_json::Map<String, Value>,
    access_logs: Vec<Value>,
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

impl Config {
    pub fn new() -> Config {
        Config {
            route_config: json!({"name": "local", "virtual_hosts": []}),
            clusters: Vec::new(),
            hcm: serde_json::Map::new(),
            access_logs: vec![json!({
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
                }
            })],
        }
    }

    /// One virtual host `default` for `*` with these routes.
    pub fn routes(self, routes: Value) -> Config {
        self.vhosts(json!([{"name": "default", "domains": ["*"], "routes": routes}]))
    }

    pub fn vhosts(mut self, vhosts: Value) -> Config {
        self.route_config["virtual_hosts"] = vhosts;
        self
    }

    /// The whole inline `route_config` (for route-configuration-level fields).
    pub fn route_config(mut self, rc: Value) -> Config {
        self.route_config = rc;
        self
    }

    /// A STATIC HTTP/1.1 cluster.
    pub fn cluster(mut self, name: &str, addrs: &[SocketAddr]) -> Config {
        self.clusters.push(cluster(name, addrs));
        self
    }

    /// A STATIC cluster speaking HTTP/2 (prior knowledge) upstream.
    pub fn cluster_h2(mut self, name: &str, addrs: &[SocketAddr]) -> Config {
        let mut c = cluster(name, addrs);
        c["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        });
        self.clusters.push(c);
        self
    }

    pub fn cluster_json(mut self, c: Value) -> Config {
        self.clusters.push(c);
        self
    }

    /// Sets a field of the HttpConnectionManager.
    pub fn hcm(mut self, key: &str, v: Value) -> Config {
        self.hcm.insert(key.to_string(), v);
        self
    }

    pub fn access_logs(mut self, logs: Vec<Value>) -> Config {
        self.access_logs = logs;
        self
    }

    pub fn json(&self) -> Value {
        let mut hcm = serde_json::Map::new();
        hcm.insert(
            "@type".into(),
            json!("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"),
        );
        hcm.insert("stat_prefix".into(), json!("ingress"));
        hcm.insert("codec_type".into(), json!("AUTO"));
        hcm.insert("access_log".into(), Value::Array(self.access_logs.clone()));
        hcm.insert("route_config".into(), self.route_config.clone());
        hcm.insert(
            "http_filters".into(),
            json!([{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
            }]),
        );
        for (k, v) in &self.hcm {
            hcm.insert(k.clone(), v.clone());
        }
        json!({
            "node": {"id": "test", "cluster": "test"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [{
                    "name": "ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": Value::Object(hcm),
                    }]}]
                }],
                "clusters": self.clusters,
            }
        })
    }

    pub fn yaml(&self) -> String {
        // Pretty JSON: readable in failure output, and valid YAML.
        serde_json::to_string_pretty(&self.json()).unwrap_or_default()
    }

    pub async fn start(&self) -> Strait {
        Strait::start(&self.yaml()).await
    }
}

/// A STATIC HTTP/1.1 cluster over `addrs`, round robin, 1 s connect timeout.
pub fn cluster(name: &str, addrs: &[SocketAddr]) -> Value {
    let eps: Vec<Value> = addrs
        .iter()
        .map(|a| {
            json!({"endpoint": {"address": {"socket_address": {
                "address": a.ip().to_string(), "port_value": a.port()
            }}}})
        })
        .collect();
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]}
    })
}

// === External tools ===

/// True when `tool` runs. When absent: prints `skipped: TOOL not installed` and returns false so
/// the test can return — except under CI (`CI` set), where a missing tool fails the test, so a
/// green CI never hides a missing install step.
pub fn tool(tool: &str) -> bool {
    let ok = std::process::Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("{tool} is not installed, and CI must run every test");
        }
        eprintln!("skipped: {tool} not installed");
    }
    ok
}

/// Runs a command (bounded by `limit`); returns (status, stdout, stderr).
pub async fn run(limit: Duration, program: &str, args: &[String]) -> (ExitStatus, String, String) {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match within_for(limit, program, out).await {
        Ok(o) => (
            o.status,
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => panic!("{program}: {e}"),
    }
}

/// The Envoy binary for differential tests: `ENVOY_BIN` (CI sets it), else `envoy` on `PATH`;
/// `None` when neither exists, and the caller skips with a message.
pub fn envoy_bin() -> Option<String> {
    if let Ok(b) = std::env::var("ENVOY_BIN") {
        return std::path::Path::new(&b).exists().then_some(b);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("envoy"))
        .find(|c| c.is_file())
        .map(|c| c.display().to_string())
}

/// One route, `/` to cluster `up`, with the route `idle_timeout` `idle` (e.g. `"1s"`): the
/// stream idle timeout the stalled-client tests meet. The caller adds cluster `up`.
pub fn idle_timeout_route(idle: &str) -> Config {
    Config::new().routes(json!([
        {"match": {"prefix": "/"}, "route": {"cluster": "up", "idle_timeout": idle}}
    ]))
}

/// How a stalled download must end: the access log's response flag and the counter that counts
/// it (`SI` / `http.ingress.downstream_rq_idle_timeout` for the stream idle timeout).
pub struct StallEnd<'a> {
    pub flag: &'a str,
    pub counter: &'a str,
}

/// The stream idle timeout's [`StallEnd`].
pub const IDLE_TIMEOUT: StallEnd<'static> = StallEnd {
    flag: "SI",
    counter: "http.ingress.downstream_rq_idle_timeout",
};

/// A client asks `client` for a download of `bytes` from `up` through `strait`, takes the
/// response head and stops reading. The stream must end at the proxy's timeout as in Envoy:
/// logged `200 <flag>` (`request_line` is the request as the access log quotes it, e.g.
/// `GET /stall HTTP/2`), counted in `end.counter`, the upstream request released, and what the
/// client buffered ending in an error rather than a clean end.
pub async fn stalled_download_is_cut(
    strait: &Strait,
    up: &Upstream,
    client: &Client,
    request_line: &str,
    bytes: u64,
    end: StallEnd<'_>,
) {
    up.script([Reply::Stream(bytes)]);
    let resp = client.get_streaming(&strait.url("/stall")).await;
    assert_eq!(resp.status(), 200);
    // Held, not read: the client's buffers (its window, its socket) fill, then the proxy's.
    let body = resp.into_body();
    strait
        .access_log(&format!("\"{request_line}\" 200 {} ", end.flag), 1)
        .await;
    assert_eq!(strait.wait_stat(end.counter, 1).await, Some(1));
    assert_eq!(
        strait.wait_stat("cluster.up.upstream_rq_active", 0).await,
        Some(0)
    );
    let read = within("reading the stalled body", drain_body(body)).await;
    assert!(read.is_err(), "{read:?}");
}

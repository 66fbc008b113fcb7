//! Access logging: Envoy's default text format, custom `text_format_source`, and `json_format`,
//! to stdout, stderr or a file. Formatting happens after the response ends, off the hot path of
//! the response body; writes go through a buffered background writer so a request never waits on
//! disk.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName};
use strait_xds::model::{AccessLog, AccessLogSink, FormatToken, JsonValueFormat, LogFormat};

use crate::response_flags::ResponseFlags;

/// Everything one access-log line may print, filled by the data path when a stream ends.
#[derive(Debug)]
pub struct Record<'a> {
    pub start_time: SystemTime,
    pub method: &'a http::Method,
    /// Path and query as received (before rewrites).
    pub path: &'a str,
    pub authority: &'a str,
    pub scheme: &'a str,
    pub version: http::Version,
    /// Request headers as forwarded (after hygiene and route mutations).
    pub request_headers: &'a HeaderMap,
    /// 0 when no response was sent.
    pub response_code: u16,
    pub response_headers: Option<&'a HeaderMap>,
    pub response_trailers: Option<&'a HeaderMap>,
    pub response_flags: ResponseFlags,
    /// `%RESPONSE_CODE_DETAILS%`, e.g. `via_upstream`, `route_not_found`.
    pub response_code_details: &'a str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    /// Time until the last request byte was received.
    pub request_duration: Option<Duration>,
    /// Time until the first response byte was received from upstream.
    pub response_duration: Option<Duration>,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<&'a str>,
    pub upstream_local_address: Option<SocketAddr>,
    pub upstream_transport_failure_reason: Option<&'a str>,
    pub downstream_remote_address: SocketAddr,
    pub downstream_direct_remote_address: SocketAddr,
    pub downstream_local_address: SocketAddr,
    pub route_name: &'a str,
}

// === Formatting ===

/// One operator's value before it is rendered as text or typed JSON.
enum Val<'a> {
    Str(Cow<'a, str>),
    Num(u64),
    /// Printed `-` in text, `null` in typed JSON.
    Missing,
}

fn truncate(s: Cow<'_, str>, max_len: Option<usize>) -> Cow<'_, str> {
    match max_len {
        Some(n) if s.len() > n => {
            // Envoy truncates bytes; back off to a char boundary so the line stays valid UTF-8.
            let mut end = n;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            Cow::Owned(s[..end].to_string())
        }
        _ => s,
    }
}

fn header<'a>(map: Option<&'a HeaderMap>, name: &HeaderName) -> Option<Cow<'a, str>> {
    map?.get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
}

fn header_pair<'a>(
    map: Option<&'a HeaderMap>,
    primary: &HeaderName,
    fallback: Option<&HeaderName>,
    max_len: Option<usize>,
) -> Val<'a> {
    match header(map, primary).or_else(|| fallback.and_then(|f| header(map, f))) {
        Some(v) => Val::Str(truncate(v, max_len)),
        None => Val::Missing,
    }
}

/// A request header or pseudo-header by its lower-cased name (`:path` is the path as received).
fn request_value<'a>(rec: &'a Record<'_>, name: &str) -> Option<Cow<'a, str>> {
    let pseudo = |s: &'a str| (!s.is_empty()).then_some(Cow::Borrowed(s));
    match name {
        ":method" => pseudo(rec.method.as_str()),
        ":path" => pseudo(rec.path),
        ":authority" => pseudo(rec.authority),
        ":scheme" => pseudo(rec.scheme),
        _ => rec
            .request_headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes())),
    }
}

fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

fn opt_str<'a>(s: Option<&'a str>) -> Val<'a> {
    match s {
        Some(s) if !s.is_empty() => Val::Str(Cow::Borrowed(s)),
        _ => Val::Missing,
    }
}

fn addr<'a>(a: Option<SocketAddr>, with_port: bool) -> Val<'a> {
    match a {
        Some(a) if with_port => Val::Str(Cow::Owned(a.to_string())),
        Some(a) => Val::Str(Cow::Owned(a.ip().to_string())),
        None => Val::Missing,
    }
}

fn millis(d: Option<Duration>) -> Val<'static> {
    match d {
        Some(d) => Val::Num(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        None => Val::Missing,
    }
}

fn value<'a>(tok: &'a FormatToken, rec: &'a Record<'_>, hostname: &'a str) -> Val<'a> {
    use FormatToken as T;
    match tok {
        T::Literal(s) => Val::Str(Cow::Borrowed(s)),
        T::StartTime => Val::Str(Cow::Owned(
            humantime::format_rfc3339_millis(rec.start_time).to_string(),
        )),
        T::ReqHeader {
            primary,
            fallback,
            max_len,
        } => header_pair(
            Some(rec.request_headers),
            primary,
            fallback.as_ref(),
            *max_len,
        ),
        T::ReqHeaderOrPseudo {
            primary,
            fallback,
            max_len,
        } => {
            let v = request_value(rec, primary)
                .or_else(|| fallback.as_deref().and_then(|f| request_value(rec, f)));
            match v {
                Some(v) => Val::Str(truncate(v, *max_len)),
                None => Val::Missing,
            }
        }
        T::RespHeader {
            primary,
            fallback,
            max_len,
        } => header_pair(rec.response_headers, primary, fallback.as_ref(), *max_len),
        T::RespTrailer {
            primary,
            fallback,
            max_len,
        } => header_pair(rec.response_trailers, primary, fallback.as_ref(), *max_len),
        T::Protocol => Val::Str(Cow::Borrowed(protocol(rec.version))),
        T::ResponseCode => Val::Num(u64::from(rec.response_code)),
        T::ResponseCodeDetails => opt_str(Some(rec.response_code_details)),
        T::ResponseFlags => Val::Str(Cow::Owned(rec.response_flags.to_string())),
        T::BytesReceived => Val::Num(rec.bytes_received),
        T::BytesSent => Val::Num(rec.bytes_sent),
        T::Duration => millis(Some(rec.duration)),
        T::RequestDuration => millis(rec.request_duration),
        T::ResponseDuration => millis(rec.response_duration),
        T::UpstreamHost => addr(rec.upstream_host, true),
        T::UpstreamCluster => opt_str(rec.upstream_cluster),
        T::UpstreamLocalAddress => addr(rec.upstream_local_address, true),
        T::UpstreamTransportFailureReason => opt_str(rec.upstream_transport_failure_reason),
        T::DownstreamRemoteAddress => addr(Some(rec.downstream_remote_address), true),
        T::DownstreamRemoteAddressWithoutPort => addr(Some(rec.downstream_remote_address), false),
        T::DownstreamDirectRemoteAddress => addr(Some(rec.downstream_direct_remote_address), true),
        T::DownstreamDirectRemoteAddressWithoutPort => {
            addr(Some(rec.downstream_direct_remote_address), false)
        }
        T::DownstreamLocalAddress => addr(Some(rec.downstream_local_address), true),
        T::DownstreamLocalAddressWithoutPort => addr(Some(rec.downstream_local_address), false),
        T::RouteName => opt_str(Some(rec.route_name)),
        T::Hostname => opt_str(Some(hostname)),
    }
}

fn push_text(out: &mut String, v: &Val<'_>) {
    match v {
        Val::Str(s) => out.push_str(s),
        Val::Num(n) => {
            let _ = write!(out, "{n}");
        }
        Val::Missing => out.push('-'),
    }
}

fn push_json_str(out: &mut String, s: &str) {
    // Serialising a &str cannot fail; the fallback keeps the line valid JSON regardless.
    match serde_json::to_string(s) {
        Ok(q) => out.push_str(&q),
        Err(_) => out.push_str("\"\""),
    }
}

/// Formats one access-log line (with its trailing newline for JSON; text formats carry their
/// own, as Envoy's default format does).
pub fn format_line(format: &LogFormat, rec: &Record<'_>, hostname: &str) -> String {
    let mut out = String::with_capacity(256);
    match format {
        LogFormat::Text(tokens) => {
            for t in tokens {
                push_text(&mut out, &value(t, rec, hostname));
            }
        }
        LogFormat::Json(fields) => {
            out.push('{');
            for (i, (key, v)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_json_str(&mut out, key);
                out.push(':');
                match v {
                    JsonValueFormat::Typed(t) => match value(t, rec, hostname) {
                        Val::Str(s) => push_json_str(&mut out, &s),
                        Val::Num(n) => {
                            let _ = write!(out, "{n}");
                        }
                        Val::Missing => out.push_str("null"),
                    },
                    JsonValueFormat::Text(tokens) => {
                        let mut s = String::new();
                        for t in tokens {
                            push_text(&mut s, &value(t, rec, hostname));
                        }
                        push_json_str(&mut out, &s);
                    }
                }
            }
            out.push_str("}\n");
        }
    }
    out
}

// === Writer ===

/// Lines a sink may have queued before new ones are dropped (and counted).
const QUEUE_LINES: usize = 16 * 1024;

enum Msg {
    Line(String),
    /// Answered once every line queued before it has been written and flushed.
    Flush(SyncSender<()>),
}

struct Sink {
    format: LogFormat,
    tx: SyncSender<Msg>,
}

/// The access logs of one HTTP connection manager. Cheap to share; each sink has its own
/// writer thread, which exits once the logger is dropped and its queue is drained.
pub struct AccessLogger {
    sinks: Vec<Sink>,
    hostname: String,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for AccessLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLogger")
            .field("sinks", &self.sinks.len())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl AccessLogger {
    /// `None` when `cfg` is empty. Files are opened (append, create) here, so a bad path fails
    /// at config time rather than on the first request.
    pub fn new(cfg: &[AccessLog]) -> std::io::Result<Option<Arc<AccessLogger>>> {
        if cfg.is_empty() {
            return Ok(None);
        }
        let dropped = Arc::new(AtomicU64::new(0));
        let mut sinks = Vec::with_capacity(cfg.len());
        for log in cfg {
            let out: Box<dyn Write + Send> = match &log.sink {
                AccessLogSink::Stdout => Box::new(std::io::stdout()),
                AccessLogSink::Stderr => Box::new(std::io::stderr()),
                AccessLogSink::File(path) => {
                    let f = OpenOptions::new()
                        .append(true)
                        .create(true)
                        .open(path)
                        .map_err(|e| {
                            std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                        })?;
                    Box::new(BufWriter::new(f))
                }
            };
            let (tx, rx) = sync_channel::<Msg>(QUEUE_LINES);
            let dropped = dropped.clone();
            std::thread::Builder::new()
                .name("strait-access-log".into())
                .spawn(move || write_loop(rx, out, &dropped))?;
            sinks.push(Sink {
                format: log.format.clone(),
                tx,
            });
        }
        Ok(Some(Arc::new(AccessLogger {
            sinks,
            hostname: hostname(),
            dropped,
        })))
    }

    /// Formats and queues one line per sink; never waits on IO. A full queue drops the line
    /// and counts it in [`AccessLogger::dropped`].
    pub fn log(&self, rec: &Record<'_>) {
        for sink in &self.sinks {
            let line = format_line(&sink.format, rec, &self.hostname);
            if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
                sink.tx.try_send(Msg::Line(line))
            {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Blocks until every line logged before the call is written and flushed (for shutdown, so
    /// the last requests are not lost, and for tests). Do not call on an async worker thread:
    /// use `spawn_blocking`.
    pub fn flush(&self) {
        for sink in &self.sinks {
            let (ack_tx, ack_rx) = sync_channel(1);
            if sink.tx.send(Msg::Flush(ack_tx)).is_ok() {
                // An error means the writer is gone; nothing more can be flushed.
                let _ = ack_rx.recv();
            }
        }
    }

    /// Lines lost because a queue was full or a write failed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Writes whatever is queued, then flushes, so a reader sees each line within one wake-up.
fn write_loop(rx: Receiver<Msg>, mut out: Box<dyn Write + Send>, dropped: &AtomicU64) {
    let mut warned = false;
    while let Ok(first) = rx.recv() {
        let mut failed = 0u64;
        let mut acks = Vec::new();
        let mut handle = |msg: Msg, out: &mut Box<dyn Write + Send>| match msg {
            Msg::Line(line) => {
                if out.write_all(line.as_bytes()).is_err() {
                    failed += 1;
                }
            }
            Msg::Flush(ack) => acks.push(ack),
        };
        handle(first, &mut out);
        while let Ok(msg) = rx.try_recv() {
            handle(msg, &mut out);
        }
        if out.flush().is_err() {
            failed += 1;
        }
        for ack in acks {
            let _ = ack.send(());
        }
        if failed > 0 {
            dropped.fetch_add(failed, Ordering::Relaxed);
            if !warned {
                tracing::warn!("access log write failed; lines are being dropped");
                warned = true;
            }
        }
    }
}

/// `%HOSTNAME%`: the kernel's host name, read once.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    use http::HeaderValue;
    use FormatToken as T;

    fn lit(s: &str) -> T {
        T::Literal(s.into())
    }

    fn req(name: &str) -> T {
        T::ReqHeader {
            primary: HeaderName::from_bytes(name.as_bytes()).unwrap(),
            fallback: None,
            max_len: None,
        }
    }

    fn pseudo(primary: &str, fallback: Option<&str>) -> T {
        T::ReqHeaderOrPseudo {
            primary: primary.into(),
            fallback: fallback.map(Into::into),
            max_len: None,
        }
    }

    /// Envoy's default format, as translation builds it.
    fn default_format() -> LogFormat {
        LogFormat::Text(vec![
            lit("["),
            T::StartTime,
            lit("] \""),
            pseudo(":method", None),
            lit(" "),
            pseudo("x-envoy-original-path", Some(":path")),
            lit(" "),
            T::Protocol,
            lit("\" "),
            T::ResponseCode,
            lit(" "),
            T::ResponseFlags,
            lit(" "),
            T::BytesReceived,
            lit(" "),
            T::BytesSent,
            lit(" "),
            T::Duration,
            lit(" "),
            T::RespHeader {
                primary: HeaderName::from_static("x-envoy-upstream-service-time"),
                fallback: None,
                max_len: None,
            },
            lit(" \""),
            req("x-forwarded-for"),
            lit("\" \""),
            req("user-agent"),
            lit("\" \""),
            req("x-request-id"),
            lit("\" \""),
            pseudo(":authority", None),
            lit("\" \""),
            T::UpstreamHost,
            lit("\"\n"),
        ])
    }

    struct Owned {
        method: http::Method,
        req: HeaderMap,
        resp: HeaderMap,
    }

    fn owned() -> Owned {
        let mut req = HeaderMap::new();
        req.insert("user-agent", HeaderValue::from_static("curl/7.88.1"));
        req.insert("x-request-id", HeaderValue::from_static("f69f-1"));
        let mut resp = HeaderMap::new();
        resp.insert(
            "x-envoy-upstream-service-time",
            HeaderValue::from_static("3"),
        );
        Owned {
            method: http::Method::GET,
            req,
            resp,
        }
    }

    fn record(o: &Owned) -> Record<'_> {
        let mut flags = ResponseFlags::default();
        flags.set(ResponseFlags::UPSTREAM_CONNECTION_FAILURE);
        Record {
            start_time: UNIX_EPOCH + Duration::from_millis(1_460_751_420_310),
            method: &o.method,
            path: "/down?x=1",
            authority: "localhost:18000",
            scheme: "http",
            version: http::Version::HTTP_11,
            request_headers: &o.req,
            response_code: 503,
            response_headers: Some(&o.resp),
            response_trailers: None,
            response_flags: flags,
            response_code_details: "",
            bytes_received: 0,
            bytes_sent: 98,
            duration: Duration::from_micros(12_900),
            request_duration: Some(Duration::from_millis(1)),
            response_duration: None,
            upstream_host: Some("127.0.0.1:18099".parse().unwrap()),
            upstream_cluster: Some("up"),
            upstream_local_address: None,
            upstream_transport_failure_reason: None,
            downstream_remote_address: "[::1]:5000".parse().unwrap(),
            downstream_direct_remote_address: "[::1]:5000".parse().unwrap(),
            downstream_local_address: "127.0.0.1:10000".parse().unwrap(),
            route_name: "",
        }
    }

    #[test]
    fn default_format_like_envoy() {
        let o = owned();
        let line = format_line(&default_format(), &record(&o), "h");
        assert_eq!(
            line,
            "[2016-04-15T20:17:00.310Z] \"GET /down?x=1 HTTP/1.1\" 503 UF 0 98 12 3 \"-\" \
             \"curl/7.88.1\" \"f69f-1\" \"localhost:18000\" \"127.0.0.1:18099\"\n"
        );
    }

    #[test]
    fn json_typed_and_text_values_in_configured_order() {
        let o = owned();
        let mut o2 = owned();
        o2.req.insert(
            "x-envoy-original-path",
            HeaderValue::from_bytes("/orig/é".as_bytes()).unwrap(),
        );
        let fmt = LogFormat::Json(vec![
            ("z_code".into(), JsonValueFormat::Typed(T::ResponseCode)),
            (
                "a_path".into(),
                JsonValueFormat::Typed(pseudo("x-envoy-original-path", Some(":path"))),
            ),
            (
                "missing".into(),
                JsonValueFormat::Typed(T::ResponseDuration),
            ),
            ("req_ms".into(), JsonValueFormat::Typed(T::RequestDuration)),
            ("route".into(), JsonValueFormat::Typed(T::RouteName)),
            ("flags".into(), JsonValueFormat::Typed(T::ResponseFlags)),
            (
                "peer".into(),
                JsonValueFormat::Typed(T::DownstreamRemoteAddressWithoutPort),
            ),
            (
                "mixed".into(),
                JsonValueFormat::Text(vec![
                    pseudo(":method", None),
                    lit(" \"q\" "),
                    T::UpstreamLocalAddress,
                    lit(" "),
                    T::UpstreamCluster,
                ]),
            ),
            (
                "ua".into(),
                JsonValueFormat::Typed(T::ReqHeader {
                    primary: HeaderName::from_static("user-agent"),
                    fallback: None,
                    max_len: Some(4),
                }),
            ),
        ]);
        let line = format_line(&fmt, &record(&o), "h");
        assert_eq!(
            line,
            "{\"z_code\":503,\"a_path\":\"/down?x=1\",\"missing\":null,\"req_ms\":1,\
             \"route\":null,\"flags\":\"UF\",\"peer\":\"::1\",\
             \"mixed\":\"GET \\\"q\\\" - up\",\"ua\":\"curl\"}\n"
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["z_code"], 503);
        // The header wins over the :path fallback; truncation keeps UTF-8 valid.
        let line = format_line(&fmt, &record(&o2), "h");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["a_path"], "/orig/é");
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate(Cow::Borrowed("aé"), Some(2)), "a");
        assert_eq!(truncate(Cow::Borrowed("abc"), Some(5)), "abc");
        assert_eq!(truncate(Cow::Borrowed("abc"), Some(0)), "");
    }

    #[test]
    fn writes_lines_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        std::fs::write(&path, "existing\n").unwrap();
        let cfg = [
            AccessLog {
                sink: AccessLogSink::File(path.clone()),
                format: default_format(),
            },
            AccessLog {
                sink: AccessLogSink::File(path.clone()),
                format: LogFormat::Json(vec![(
                    "code".into(),
                    JsonValueFormat::Typed(T::ResponseCode),
                )]),
            },
        ];
        let logger = AccessLogger::new(&cfg).unwrap().unwrap();
        let o = owned();
        for _ in 0..3 {
            logger.log(&record(&o));
        }
        logger.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 7, "{text}");
        assert_eq!(lines[0], "existing");
        assert_eq!(lines.iter().filter(|l| **l == "{\"code\":503}").count(), 3);
        assert_eq!(lines.iter().filter(|l| l.starts_with("[2016-")).count(), 3);
        assert_eq!(logger.dropped(), 0);

        assert!(AccessLogger::new(&[]).unwrap().is_none());
        let bad = [AccessLog {
            sink: AccessLogSink::File(dir.path().join("no/such/dir/x.log")),
            format: default_format(),
        }];
        let err = AccessLogger::new(&bad).unwrap_err();
        assert!(err.to_string().contains("no/such/dir"), "{err}");
    }
}

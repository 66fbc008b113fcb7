//! The chain driver: order, early stop, waiting, hook selection, per-route disabling, body
//! buffering, and the registry's handling of unknown and wrapped configs.

mod common;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use envoy_types::pb::envoy::config::route::v3::FilterConfig;
use envoy_types::pb::envoy::extensions::filters::http::buffer::v3::Buffer;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use http::{HeaderValue, StatusCode};
use prost::Message;
use strait_filters::{
    Action, BodyFlow, ChainEntry, FilterChain, FilterContext, HeaderEdits, Hooks, HttpFilter,
    LocalReply, PerFilterConfigs, PerRoute,
};

type Log = Arc<Mutex<Vec<String>>>;

/// Records every call; behaves as told.
struct Probe {
    name: &'static str,
    hooks: Hooks,
    log: Log,
    on_request: fn() -> Action,
}

impl Probe {
    fn new(name: &'static str, hooks: Hooks, log: &Log) -> Arc<Probe> {
        Arc::new(Probe {
            name,
            hooks,
            log: log.clone(),
            on_request: || Action::Continue,
        })
    }
    fn with(name: &'static str, log: &Log, on_request: fn() -> Action) -> Arc<Probe> {
        Arc::new(Probe {
            name,
            hooks: Hooks::ALL,
            log: log.clone(),
            on_request,
        })
    }
    fn push(&self, hook: &str) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{}:{hook}", self.name));
    }
}

impl HttpFilter for Probe {
    fn hooks(&self) -> Hooks {
        self.hooks
    }
    fn on_request_headers(&self, _: &mut FilterContext, r: &mut http::request::Parts) -> Action {
        self.push("req");
        r.headers
            .append("x-seen", HeaderValue::from_static(self.name));
        (self.on_request)()
    }
    fn on_request_body(&self, _: &mut FilterContext, _: &mut Bytes, _: bool) -> Action {
        self.push("body");
        Action::Continue
    }
    fn on_response_headers(&self, _: &mut FilterContext, _: &mut http::response::Parts) -> Action {
        self.push("resp");
        Action::Continue
    }
}

fn log() -> Log {
    Arc::new(Mutex::new(Vec::new()))
}

fn taken(l: &Log) -> Vec<String> {
    std::mem::take(&mut *l.lock().unwrap())
}

#[tokio::test]
async fn request_hooks_run_in_order_and_response_hooks_in_reverse() {
    let l = log();
    let chain = FilterChain::new(vec![
        entry("a", Probe::new("a", Hooks::ALL, &l)),
        entry("b", Probe::new("b", Hooks::ALL, &l)),
        entry("c", Probe::new("c", Hooks::ALL, &l)),
    ]);
    let mut c = ctx();
    let mut r = req("GET", "/", &[]);
    run(&chain, &mut c, &mut r).await.unwrap();
    let seen: Vec<_> = r
        .headers
        .get_all("x-seen")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(seen, ["a", "b", "c"]);
    let mut p = resp(200);
    chain.run_response_headers(&mut c, &mut p).await.unwrap();
    assert_eq!(
        taken(&l),
        ["a:req", "b:req", "c:req", "c:resp", "b:resp", "a:resp"]
    );
}

#[tokio::test]
async fn a_reply_stops_the_chain() {
    let l = log();
    let chain = FilterChain::new(vec![
        entry("a", Probe::new("a", Hooks::ALL, &l)),
        entry(
            "deny",
            Probe::with("deny", &l, || {
                Action::reply(LocalReply::new(StatusCode::IM_A_TEAPOT, "no", "test_deny"))
            }),
        ),
        entry("c", Probe::new("c", Hooks::ALL, &l)),
    ]);
    let reply = run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap_err();
    assert_eq!(reply.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(reply.details, "test_deny");
    assert_eq!(taken(&l), ["a:req", "deny:req"]);
}

#[tokio::test]
async fn wait_futures_are_awaited_and_their_edits_applied() {
    let l = log();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let rx = Arc::new(Mutex::new(Some(rx)));
    struct Waiter(Arc<Mutex<Option<tokio::sync::oneshot::Receiver<()>>>>);
    impl HttpFilter for Waiter {
        fn hooks(&self) -> Hooks {
            Hooks::REQUEST_HEADERS
        }
        fn on_request_headers(
            &self,
            _: &mut FilterContext,
            _: &mut http::request::Parts,
        ) -> Action {
            let rx = self.0.lock().unwrap().take().unwrap();
            Action::Wait(Box::pin(async move {
                rx.await.unwrap();
                let mut e = HeaderEdits::default();
                e.set.push((
                    http::HeaderName::from_static("x-waited"),
                    HeaderValue::from_static("yes"),
                ));
                e.response_headers.push((
                    http::HeaderName::from_static("x-later"),
                    HeaderValue::from_static("1"),
                ));
                Action::ContinueWith(Box::new(e))
            }))
        }
    }
    let chain = FilterChain::new(vec![
        entry("w", Arc::new(Waiter(rx))),
        entry("b", Probe::new("b", Hooks::ALL, &l)),
    ]);
    let mut c = ctx();
    let mut r = req("GET", "/", &[]);
    let mut fut = Box::pin(run(&chain, &mut c, &mut r));
    // The chain must be parked on the future, not past it.
    assert!(futures_poll_once(fut.as_mut()).await.is_none());
    assert!(taken(&l).is_empty());
    tx.send(()).unwrap();
    fut.await.unwrap();
    assert_eq!(header(&r.headers, "x-waited"), Some("yes"));
    assert_eq!(taken(&l), ["b:req"]);
    let mut p = resp(200);
    chain.run_response_headers(&mut c, &mut p).await.unwrap();
    assert_eq!(header(&p.headers, "x-later"), Some("1"));
}

/// Polls a future once; `None` if pending.
async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
    let mut f = f;
    std::future::poll_fn(|cx| match std::pin::Pin::new(&mut f).poll(cx) {
        std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

#[tokio::test]
async fn filters_are_called_only_for_the_hooks_they_declare() {
    let l = log();
    let chain = FilterChain::new(vec![
        entry(
            "req_only",
            Probe::new("req_only", Hooks::REQUEST_HEADERS, &l),
        ),
        entry(
            "resp_only",
            Probe::new("resp_only", Hooks::RESPONSE_HEADERS, &l),
        ),
    ]);
    assert!(!chain.has_hook(Hooks::REQUEST_BODY));
    assert!(chain.has_hook(Hooks::RESPONSE_HEADERS));
    let mut c = ctx();
    run(&chain, &mut c, &mut req("GET", "/", &[]))
        .await
        .unwrap();
    let mut body = Bytes::from_static(b"data");
    assert_eq!(
        chain
            .run_request_body(&mut c, &mut body, true)
            .await
            .unwrap(),
        BodyFlow::Forward
    );
    chain
        .run_response_headers(&mut c, &mut resp(200))
        .await
        .unwrap();
    assert_eq!(taken(&l), ["req_only:req", "resp_only:resp"]);
}

#[tokio::test]
async fn per_route_disabled_skips_and_disabled_by_default_needs_enabling() {
    let l = log();
    let chain = FilterChain::new(vec![
        entry("a", Probe::new("a", Hooks::ALL, &l)),
        ChainEntry {
            name: "b".into(),
            filter: Probe::new("b", Hooks::ALL, &l),
            disabled_by_default: true,
        },
    ]);
    run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap();
    assert_eq!(taken(&l), ["a:req"]);

    let route = [
        (
            "a".to_string(),
            PerRoute {
                config: None,
                disabled: Some(true),
            },
        ),
        (
            "b".to_string(),
            PerRoute {
                config: None,
                disabled: Some(false),
            },
        ),
    ];
    let mut c = ctx();
    c.set_route("r", Some(Arc::new(PerFilterConfigs::resolve([&route[..]]))));
    run(&chain, &mut c, &mut req("GET", "/", &[]))
        .await
        .unwrap();
    assert_eq!(taken(&l), ["b:req"]);
}

#[test]
fn most_specific_per_route_level_wins() {
    let cfg = |v: u32| PerRoute {
        config: Some(Arc::new(v)),
        disabled: None,
    };
    let route_config = [("f".to_string(), cfg(1)), ("g".to_string(), cfg(1))];
    let vhost = [("f".to_string(), cfg(2))];
    let route = [("g".to_string(), cfg(3))];
    let r = PerFilterConfigs::resolve([&route_config[..], &vhost[..], &route[..]]);
    let val = |n: &str| {
        *r.get(n)
            .unwrap()
            .config
            .clone()
            .unwrap()
            .downcast::<u32>()
            .unwrap()
    };
    assert_eq!(val("f"), 2);
    assert_eq!(val("g"), 3);
    assert!(r.get("h").is_none());
}

#[tokio::test]
async fn filter_state_is_shared_and_local_state_is_per_instance() {
    struct Counter;
    #[derive(Default)]
    struct Mine(u32);
    #[derive(Default)]
    struct Shared(u32);
    impl HttpFilter for Counter {
        fn hooks(&self) -> Hooks {
            Hooks::REQUEST_HEADERS
        }
        fn on_request_headers(
            &self,
            ctx: &mut FilterContext,
            _: &mut http::request::Parts,
        ) -> Action {
            ctx.local::<Mine>().0 += 1;
            ctx.state().get_or_default::<Shared>().0 += 1;
            Action::Continue
        }
    }
    let chain = FilterChain::new(vec![
        entry("one", Arc::new(Counter)),
        entry("two", Arc::new(Counter)),
    ]);
    let mut c = ctx();
    run(&chain, &mut c, &mut req("GET", "/", &[]))
        .await
        .unwrap();
    assert_eq!(c.state().get::<Shared>().map(|s| s.0), Some(2));
    // Each instance saw only its own local value (1, not 2).
    assert!(c.local_ref::<Mine>().is_some_and(|m| m.0 == 1));
}

#[tokio::test]
async fn buffer_holds_chunks_until_end_of_stream() {
    let env = Env::new();
    let chain = env.chain(
        "buf",
        strait_filters::builtin::buffer::TYPE_URL,
        &Buffer {
            max_request_bytes: Some(UInt32Value { value: 10 }),
        },
    );
    let mut c = ctx();
    run(&chain, &mut c, &mut req("POST", "/", &[]))
        .await
        .unwrap();
    let mut a = Bytes::from_static(b"abc");
    assert_eq!(
        chain.run_request_body(&mut c, &mut a, false).await.unwrap(),
        BodyFlow::Held
    );
    let mut b = Bytes::from_static(b"def");
    assert_eq!(
        chain.run_request_body(&mut c, &mut b, true).await.unwrap(),
        BodyFlow::Forward
    );
    assert_eq!(&b[..], b"abcdef");

    // Over the limit: 413 while streaming, and at once from Content-Length.
    let mut c = ctx();
    let mut big = Bytes::from_static(b"0123456789x");
    let reply = chain
        .run_request_body(&mut c, &mut big, false)
        .await
        .unwrap_err();
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    let reply = run(
        &chain,
        &mut ctx(),
        &mut req("POST", "/", &[("content-length", "11")]),
    )
    .await
    .unwrap_err();
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(env
        .try_build(
            strait_filters::builtin::buffer::TYPE_URL,
            &Buffer {
                max_request_bytes: None
            }
        )
        .is_err());
}

#[test]
fn unknown_types_are_rejected_with_their_path() {
    let env = Env::new();
    let err = env
        .registry
        .build(
            "x",
            "type.googleapis.com/foo.Bar",
            &[],
            "hcm.http_filters[3].typed_config",
            &env.cx(),
        )
        .err()
        .unwrap();
    assert_eq!(err.path, "hcm.http_filters[3].typed_config");
    assert!(err.message.contains("foo.Bar"), "{err}");
    let err = env
        .registry
        .build_per_route("type.googleapis.com/foo.Bar", &[], "p", &env.cx())
        .unwrap_err();
    assert_eq!(err.path, "p");
}

#[test]
fn filter_config_wrapper_is_unwrapped() {
    let env = Env::new();
    let cx = env.cx();
    let url = strait_filters::FILTER_CONFIG_TYPE_URL;
    let disabled = FilterConfig {
        config: None,
        is_optional: false,
        disabled: true,
    }
    .encode_to_vec();
    let p = env
        .registry
        .build_per_route(url, &disabled, "p", &cx)
        .unwrap()
        .unwrap();
    assert!(p.disabled == Some(true) && p.config.is_none());

    let unknown = Any {
        type_url: "type.googleapis.com/foo.Bar".into(),
        value: vec![],
    };
    let optional = FilterConfig {
        config: Some(unknown.clone()),
        is_optional: true,
        disabled: false,
    }
    .encode_to_vec();
    assert!(env
        .registry
        .build_per_route(url, &optional, "p", &cx)
        .unwrap()
        .is_none());
    let required = FilterConfig {
        config: Some(unknown),
        is_optional: false,
        disabled: false,
    }
    .encode_to_vec();
    assert_eq!(
        env.registry
            .build_per_route(url, &required, "p", &cx)
            .unwrap_err()
            .path,
        "p.config"
    );

    let buffer = Any {
        type_url: strait_filters::builtin::buffer::PER_ROUTE_TYPE_URL.into(),
        value: envoy_types::pb::envoy::extensions::filters::http::buffer::v3::BufferPerRoute {
            r#override: Some(envoy_types::pb::envoy::extensions::filters::http::buffer::v3::buffer_per_route::Override::Disabled(true)),
        }
        .encode_to_vec(),
    };
    let wrapped = FilterConfig {
        config: Some(buffer),
        is_optional: false,
        disabled: false,
    }
    .encode_to_vec();
    let p = env
        .registry
        .build_per_route(url, &wrapped, "p", &cx)
        .unwrap()
        .unwrap();
    assert_eq!(p.disabled, Some(true));
}

/// Envoy's `PerFilterConfigs`: naming a filter at a level enables it, `disabled: true` skips the
/// wrapped config unparsed, and a `FilterConfig` with neither config nor `disabled` is an error.
#[test]
fn per_route_configs_enable_and_disabled_skips_the_config() {
    let env = Env::new();
    let cx = env.cx();
    let url = strait_filters::FILTER_CONFIG_TYPE_URL;
    let plain = BufferPerRouteMax(100);
    let p = env
        .registry
        .build_per_route(
            strait_filters::builtin::buffer::PER_ROUTE_TYPE_URL,
            &plain.encode(),
            "p",
            &cx,
        )
        .unwrap()
        .unwrap();
    assert_eq!(p.disabled, Some(false), "a plain per-route config enables");
    let garbage = Any {
        type_url: strait_filters::builtin::buffer::PER_ROUTE_TYPE_URL.into(),
        value: vec![0xff, 0xff, 0xff],
    };
    let disabled = FilterConfig {
        config: Some(garbage),
        is_optional: false,
        disabled: true,
    }
    .encode_to_vec();
    let p = env
        .registry
        .build_per_route(url, &disabled, "p", &cx)
        .unwrap()
        .unwrap();
    assert!(p.disabled == Some(true) && p.config.is_none());
    let empty = FilterConfig::default().encode_to_vec();
    let err = env
        .registry
        .build_per_route(url, &empty, "p", &cx)
        .unwrap_err();
    assert_eq!(err.path, "p");
    let enable_only = FilterConfig {
        config: Some(Any::default()),
        is_optional: false,
        disabled: false,
    }
    .encode_to_vec();
    let p = env
        .registry
        .build_per_route(url, &enable_only, "p", &cx)
        .unwrap()
        .unwrap();
    assert!(p.disabled == Some(false) && p.config.is_none());
}

struct BufferPerRouteMax(u32);

impl BufferPerRouteMax {
    fn encode(&self) -> Vec<u8> {
        use envoy_types::pb::envoy::extensions::filters::http::buffer::v3::{
            buffer_per_route::Override, Buffer, BufferPerRoute,
        };
        BufferPerRoute {
            r#override: Some(Override::Buffer(Buffer {
                max_request_bytes: Some(UInt32Value { value: self.0 }),
            })),
        }
        .encode_to_vec()
    }
}

/// A level that only enables or disables a filter does not hide a less specific level's config
/// (Envoy's `mostSpecificPerFilterConfig` falls through); `disabled` is the most specific say.
#[test]
fn config_and_disabled_resolve_level_by_level() {
    let rc = [(
        "f".to_string(),
        PerRoute {
            config: Some(Arc::new(7u32)),
            disabled: Some(false),
        },
    )];
    let vh = [(
        "f".to_string(),
        PerRoute {
            config: None,
            disabled: Some(true),
        },
    )];
    let rt = [(
        "f".to_string(),
        PerRoute {
            config: None,
            disabled: Some(false),
        },
    )];
    let all = PerFilterConfigs::resolve([&rc[..], &vh[..], &rt[..]]);
    let cfg = all.config("f").cloned().unwrap().downcast::<u32>().unwrap();
    assert_eq!(*cfg, 7);
    assert_eq!(all.disabled("f"), Some(false));
    assert_eq!(all.configs("f").count(), 1);
    let upto_vhost = PerFilterConfigs::resolve([&rc[..], &vh[..]]);
    assert_eq!(upto_vhost.disabled("f"), Some(true));
    assert_eq!(upto_vhost.disabled("g"), None);
}

/// A filter reads the matched route's name, target cluster and metadata from its context.
#[tokio::test]
async fn filters_see_the_route_entry_and_its_metadata() {
    use envoy_types::pb::envoy::config::core::v3::Metadata as PbMetadata;
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    use strait_filters::{Metadata, RouteEntry};

    /// Tags requests with the owning team from route metadata `acme.team.owner`, and the tier
    /// from typed metadata `acme.tier` (a `UInt32Value`).
    struct Owner;
    impl HttpFilter for Owner {
        fn hooks(&self) -> Hooks {
            Hooks::REQUEST_HEADERS
        }
        fn on_request_headers(
            &self,
            ctx: &mut FilterContext,
            r: &mut http::request::Parts,
        ) -> Action {
            let Some(route) = ctx.route() else {
                return Action::Continue;
            };
            let md = &route.metadata;
            if let Some(owner) = md
                .value("acme.team", &["owner", "name"])
                .and_then(|v| v.as_str())
            {
                if let Ok(v) = HeaderValue::from_str(owner) {
                    r.headers.insert("x-owner", v);
                }
            }
            if let Some(Ok(tier)) = md.typed::<UInt32Value>("acme.tier") {
                r.headers.insert("x-tier", HeaderValue::from(tier.value));
            }
            let cluster = route.cluster.as_deref().unwrap_or("-");
            let tag = format!("{}@{cluster}", ctx.route_name());
            if let Ok(v) = HeaderValue::from_str(&tag) {
                r.headers.insert("x-route", v);
            }
            Action::Continue
        }
    }

    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    let owner = Struct {
        fields: [("name".to_string(), string("payments"))].into(),
    };
    let team = Struct {
        fields: [(
            "owner".to_string(),
            Value {
                kind: Some(Kind::StructValue(owner)),
            },
        )]
        .into(),
    };
    let proto = PbMetadata {
        filter_metadata: [("acme.team".to_string(), team)].into(),
        typed_filter_metadata: [(
            "acme.tier".to_string(),
            Any {
                type_url: "type.googleapis.com/google.protobuf.UInt32Value".into(),
                value: UInt32Value { value: 2 }.encode_to_vec(),
            },
        )]
        .into(),
    };
    let metadata = Metadata::from_proto(&proto);
    assert_eq!(metadata.to_proto(), proto, "round trip");
    let chain = FilterChain::new(vec![entry("owner", Arc::new(Owner))]);

    let mut c = ctx();
    c.set_route_entry(Arc::new(RouteEntry {
        name: "pay".into(),
        cluster: Some("payments-v1".into()),
        metadata,
        ..RouteEntry::default()
    }));
    let mut r = req("GET", "/", &[]);
    run(&chain, &mut c, &mut r).await.unwrap();
    assert_eq!(header(&r.headers, "x-owner"), Some("payments"));
    assert_eq!(header(&r.headers, "x-tier"), Some("2"));
    assert_eq!(header(&r.headers, "x-route"), Some("pay@payments-v1"));

    // No route matched: the filter sees none.
    let mut r = req("GET", "/", &[]);
    run(&chain, &mut ctx(), &mut r).await.unwrap();
    assert!(r.headers.is_empty());
}

#[test]
fn every_builtin_type_url_is_registered() {
    let r = strait_filters::Registry::builtin();
    for url in [
        strait_filters::builtin::buffer::TYPE_URL,
        strait_filters::builtin::cors::TYPE_URL,
        strait_filters::builtin::ext_authz::TYPE_URL,
        strait_filters::builtin::fault::TYPE_URL,
        strait_filters::builtin::header_mutation::TYPE_URL,
        strait_filters::builtin::local_ratelimit::TYPE_URL,
        strait_filters::builtin::rbac::TYPE_URL,
    ] {
        assert!(r.knows(url), "{url}");
    }
}

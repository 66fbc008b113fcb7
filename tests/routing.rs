//! Route selection as a client sees it: which upstream answered (or 404) for each host, path,
//! header and query; direct responses; redirects; path and host rewrites; header mutations at
//! the route-configuration, virtual-host and route levels.

mod common;

use common::{Client, Config, Upstream};
use http::Method;
use serde_json::json;

/// Upstreams `a`..`e` plus the three domain-matching ones, and a proxy routing to them.
struct Table {
    strait: common::Strait,
    _ups: Vec<Upstream>,
}

async fn table() -> Table {
    let names = [
        "a", "b", "c", "d", "e", "exact", "suffix", "suffix2", "prefix",
    ];
    let mut ups = Vec::new();
    let mut cfg = Config::new();
    for n in names {
        let up = Upstream::start(n).await;
        cfg = cfg.cluster(n, &[up.addr]);
        ups.push(up);
    }
    let to = |c: &str| json!({"cluster": c});
    let cfg = cfg.vhosts(json!([
        {"name": "exact", "domains": ["api.example.com", "api.example.com:8080"],
         "routes": [{"match": {"prefix": "/"}, "route": to("exact")}]},
        {"name": "suffix", "domains": ["*.example.com"],
         "routes": [{"match": {"prefix": "/"}, "route": to("suffix")}]},
        {"name": "suffix2", "domains": ["*.foo.example.com"],
         "routes": [{"match": {"prefix": "/"}, "route": to("suffix2")}]},
        {"name": "prefix", "domains": ["www.*"],
         "routes": [{"match": {"prefix": "/"}, "route": to("prefix")}]},
        {"name": "any", "domains": ["*"], "routes": [
            {"match": {"path": "/exact"}, "route": to("a")},
            {"match": {"prefix": "/pfx/"}, "route": to("b")},
            {"match": {"safe_regex": {"regex": "/re/[0-9]+"}}, "route": to("c")},
            {"match": {"path_separated_prefix": "/sep"}, "route": to("d")},
            {"match": {"prefix": "/CaSe", "case_sensitive": false}, "route": to("e")},
            {"match": {"prefix": "/hdr", "headers": [{"name": "x-present", "present_match": true}]},
             "route": to("a")},
            {"match": {"prefix": "/hdr", "headers": [{"name": "x-env", "string_match": {"exact": "prod"}}]},
             "route": to("b")},
            {"match": {"prefix": "/hdr", "headers": [{"name": "x-env", "string_match": {"prefix": "stag", "ignore_case": true}}]},
             "route": to("c")},
            {"match": {"prefix": "/inv", "headers": [
                {"name": "x-env", "string_match": {"exact": "prod"}, "invert_match": true}]},
             "route": to("c")},
            {"match": {"prefix": "/inv"}, "route": to("d")},
            {"match": {"prefix": "/m", "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]},
             "route": to("e")},
            {"match": {"prefix": "/q", "query_parameters": [{"name": "debug", "present_match": true}]},
             "route": to("a")},
            {"match": {"prefix": "/q", "query_parameters": [{"name": "v", "string_match": {"exact": "2"}}]},
             "route": to("b")},
            {"match": {"prefix": "/q"}, "route": to("c")}
        ]}
    ]));
    Table {
        strait: cfg.start().await,
        _ups: ups,
    }
}

/// (method, host, path, extra headers, expected upstream or `None` for 404)
type Row = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    Option<&'static str>,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_matching_table() {
    let t = table().await;
    let client = Client::http1();
    let rows: &[Row] = &[
        // Domains: exact, then longest suffix wildcard, then prefix wildcard, then `*`.
        ("GET", "api.example.com", "/x", &[], Some("exact")),
        ("GET", "API.Example.COM", "/x", &[], Some("exact")),
        ("GET", "api.example.com:8080", "/x", &[], Some("exact")),
        ("GET", "other.example.com", "/x", &[], Some("suffix")),
        ("GET", "bar.foo.example.com", "/x", &[], Some("suffix2")),
        ("GET", "www.example.com", "/x", &[], Some("suffix")),
        ("GET", "www.example.org", "/x", &[], Some("prefix")),
        ("GET", "example.com", "/nope", &[], None),
        // Paths.
        ("GET", "h", "/exact", &[], Some("a")),
        ("GET", "h", "/exact?x=1", &[], Some("a")),
        ("GET", "h", "/exact/more", &[], None),
        ("GET", "h", "/EXACT", &[], None),
        ("GET", "h", "/pfx/a/b", &[], Some("b")),
        ("GET", "h", "/pfx", &[], None),
        ("GET", "h", "/re/123", &[], Some("c")),
        ("GET", "h", "/re/123?q=1", &[], Some("c")),
        ("GET", "h", "/re/12x", &[], None),
        ("GET", "h", "/sep", &[], Some("d")),
        ("GET", "h", "/sep/x", &[], Some("d")),
        ("GET", "h", "/sep?x=1", &[], Some("d")),
        ("GET", "h", "/separate", &[], None),
        ("GET", "h", "/case/x", &[], Some("e")),
        ("GET", "h", "/CASE", &[], Some("e")),
        // Headers: present, exact, prefix with ignore_case, invert, pseudo-header.
        ("GET", "h", "/hdr", &[("x-present", "")], Some("a")),
        ("GET", "h", "/hdr", &[("x-env", "prod")], Some("b")),
        ("GET", "h", "/hdr", &[("x-env", "STAGING")], Some("c")),
        ("GET", "h", "/hdr", &[("x-env", "dev")], None),
        ("GET", "h", "/hdr", &[], None),
        ("GET", "h", "/inv", &[("x-env", "dev")], Some("c")),
        ("GET", "h", "/inv", &[("x-env", "prod")], Some("d")),
        ("POST", "h", "/m", &[], Some("e")),
        ("GET", "h", "/m", &[], None),
        // Query parameters.
        ("GET", "h", "/q?debug", &[], Some("a")),
        ("GET", "h", "/q?a=1&debug=0", &[], Some("a")),
        ("GET", "h", "/q?v=2", &[], Some("b")),
        ("GET", "h", "/q?v=3", &[], Some("c")),
        ("GET", "h", "/q", &[], Some("c")),
    ];
    let mut failures = Vec::new();
    for (method, host, path, headers, want) in rows {
        let mut h: Vec<(&str, &str)> = vec![("host", host)];
        h.extend_from_slice(headers);
        let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
        let r = client
            .send(common::req(
                method.clone(),
                &t.strait.url(path),
                &h,
                common::empty(),
            ))
            .await;
        let got = match r.status.as_u16() {
            200 => r.upstream().map(str::to_string),
            404 => None,
            other => Some(format!("status {other}")),
        };
        if got.as_deref() != *want {
            failures.push(format!(
                "{method} host={host} {path} {headers:?}: want {want:?}, got {got:?}"
            ));
        }
        if r.status == 404 {
            assert!(r.body.is_empty(), "Envoy's 404 for no route has no body");
        }
    }
    assert!(
        failures.is_empty(),
        "routing mismatches:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_virtual_host_is_404() {
    let up = Upstream::start("a").await;
    let strait = Config::new()
        .vhosts(json!([{"name": "only", "domains": ["only.test"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "a"}}]}]))
        .cluster("a", &[up.addr])
        .start()
        .await;
    let client = Client::http1();
    let r = client
        .get_with(&strait.url("/"), &[("host", "only.test")])
        .await;
    assert_eq!(r.upstream(), Some("a"));
    let r = client
        .get_with(&strait.url("/"), &[("host", "other.test")])
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(up.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_response_and_redirects() {
    let strait = Config::new()
        .routes(json!([
            {"match": {"path": "/direct"},
             "direct_response": {"status": 418, "body": {"inline_string": "short and stout"}}},
            {"match": {"path": "/empty"}, "direct_response": {"status": 204}},
            {"match": {"path": "/old"},
             "redirect": {"path_redirect": "/new", "response_code": "FOUND"}},
            {"match": {"prefix": "/moved/"}, "redirect": {"prefix_rewrite": "/here/"}},
            {"match": {"path": "/secure"}, "redirect": {"https_redirect": true}},
            {"match": {"path": "/elsewhere"},
             "redirect": {"host_redirect": "other.test", "port_redirect": 8443,
                          "strip_query": true, "response_code": "PERMANENT_REDIRECT"}}
        ]))
        .start()
        .await;
    let client = Client::http1();
    let host = [("host", "redir.test")];

    let r = client.get(&strait.url("/direct")).await;
    assert_eq!(r.status, 418);
    assert_eq!(r.text(), "short and stout");
    let r = client.get(&strait.url("/empty")).await;
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());

    let r = client.get_with(&strait.url("/old?a=1"), &host).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("http://redir.test/new?a=1"));

    let r = client.get_with(&strait.url("/moved/x/y"), &host).await;
    assert_eq!(r.status, 301, "default redirect code");
    assert_eq!(r.header("location"), Some("http://redir.test/here/x/y"));

    let r = client.get_with(&strait.url("/secure"), &host).await;
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("https://redir.test/secure"));

    let r = client.get_with(&strait.url("/elsewhere?a=1"), &host).await;
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some("http://other.test:8443/elsewhere")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_are_seen_by_the_upstream() {
    let up = Upstream::start("a").await;
    let strait = Config::new()
        .routes(json!([
            {"match": {"prefix": "/rw/"}, "route": {"cluster": "a", "prefix_rewrite": "/v2/"}},
            {"match": {"prefix": "/strip"}, "route": {"cluster": "a", "prefix_rewrite": "/"}},
            {"match": {"prefix": "/rx/"}, "route": {"cluster": "a", "regex_rewrite": {
                "pattern": {"regex": "^/rx/(\\w+)/(\\w+)$"}, "substitution": "/swapped/\\2/\\1"}}},
            {"match": {"prefix": "/hostrw"},
             "route": {"cluster": "a", "host_rewrite_literal": "rewritten.test"}},
            {"match": {"prefix": "/"}, "route": {"cluster": "a"}}
        ]))
        .cluster("a", &[up.addr])
        .start()
        .await;
    let client = Client::http1();

    client.get(&strait.url("/rw/x?y=1")).await;
    assert_eq!(up.last_seen().path, "/v2/x?y=1");
    client.get(&strait.url("/strip/deep")).await;
    assert_eq!(up.last_seen().path, "//deep");
    client.get(&strait.url("/rx/one/two")).await;
    assert_eq!(up.last_seen().path, "/swapped/two/one");

    client
        .get_with(&strait.url("/hostrw"), &[("host", "original.test")])
        .await;
    let seen = up.last_seen();
    assert_eq!(seen.authority.as_deref(), Some("rewritten.test"));
    // Without a rewrite the client's Host is forwarded as is.
    client
        .get_with(&strait.url("/plain"), &[("host", "original.test")])
        .await;
    assert_eq!(up.last_seen().authority.as_deref(), Some("original.test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_mutations_at_three_levels() {
    let up = Upstream::start("a").await;
    let add = |k: &str, v: &str| json!({"header": {"key": k, "value": v}});
    let strait = Config::new()
        .route_config(json!({
            "name": "local",
            "request_headers_to_add": [add("x-level", "route-config")],
            "request_headers_to_remove": ["x-drop-rc"],
            "response_headers_to_add": [add("x-resp-rc", "1")],
            "virtual_hosts": [{
                "name": "default", "domains": ["*"],
                "request_headers_to_add": [add("x-level", "vhost")],
                "request_headers_to_remove": ["x-drop-vh"],
                "response_headers_to_add": [add("x-resp-vh", "1")],
                "routes": [{
                    "match": {"prefix": "/"},
                    "route": {"cluster": "a"},
                    "request_headers_to_add": [
                        add("x-level", "route"),
                        {"header": {"key": "x-over", "value": "proxy"},
                         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
                        {"header": {"key": "x-if-absent", "value": "proxy"},
                         "append_action": "ADD_IF_ABSENT"}
                    ],
                    "request_headers_to_remove": ["x-drop-route"],
                    "response_headers_to_add": [add("x-resp-route", "1")],
                    "response_headers_to_remove": ["x-upstream"]
                }]
            }]
        }))
        .cluster("a", &[up.addr])
        .start()
        .await;
    let r = Client::http1()
        .get_with(
            &strait.url("/"),
            &[
                ("x-drop-rc", "1"),
                ("x-drop-vh", "1"),
                ("x-drop-route", "1"),
                ("x-keep", "1"),
                ("x-over", "client"),
                ("x-if-absent", "client"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = up.last_seen();
    let all = |name: &str| -> Vec<String> {
        seen.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    };
    // Envoy's default (most_specific_header_mutations_wins: false): route, then virtual host,
    // then route configuration.
    assert_eq!(all("x-level"), ["route", "vhost", "route-config"]);
    assert_eq!(all("x-over"), ["proxy"]);
    assert_eq!(all("x-if-absent"), ["client"]);
    assert_eq!(all("x-keep"), ["1"]);
    for gone in ["x-drop-rc", "x-drop-vh", "x-drop-route"] {
        assert!(all(gone).is_empty(), "{gone} should have been removed");
    }
    assert_eq!(r.header("x-resp-rc"), Some("1"));
    assert_eq!(r.header("x-resp-vh"), Some("1"));
    assert_eq!(r.header("x-resp-route"), Some("1"));
    assert_eq!(r.header("x-upstream"), None, "removed by the route");
}

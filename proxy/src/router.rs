//! Route selection and the request/response changes a route asks for, with Envoy's semantics:
//! virtual host by Host/:authority, first matching route, path rewrites, redirects and header
//! mutations. `select` runs per request: it takes no locks and allocates only to join a header
//! that appears more than once.

use std::borrow::Cow;

use http::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use http::request::Parts;
use strait_xds::model::{
    AppendAction, DomainMatcher, ForwardAction, HeaderMatchSpec, HeaderMatcher, HeaderMutations,
    HeaderValueOption, PathMatch, QueryParameterMatcher, QueryParameterSpec, Redirect,
    RedirectPath, Route, RouteConfig, RouteMatch, VirtualHost,
};

/// The outcome of route selection.
#[derive(Debug, Clone, Copy)]
pub enum Selected<'a> {
    /// No virtual host's domains match the request's host (Envoy answers 404, flag NR).
    NoVirtualHost,
    /// A virtual host matched but none of its routes did (404, NR).
    NoRoute,
    Route {
        vhost: &'a VirtualHost,
        route: &'a Route,
    },
}

// === Selection ===

/// Selects the virtual host by the request's authority, then its first matching route.
pub fn select<'a>(rc: &'a RouteConfig, req: &Parts) -> Selected<'a> {
    let Some(vhost) = find_virtual_host(rc, req) else {
        return Selected::NoVirtualHost;
    };
    let path = req.uri.path_and_query().map_or("", |pq| pq.as_str());
    match vhost
        .routes
        .iter()
        .find(|r| route_matches(&r.matcher, req, path))
    {
        Some(route) => Selected::Route { vhost, route },
        None => Selected::NoRoute,
    }
}

/// The request's authority: the URI's (HTTP/2 `:authority`, HTTP/1.1 absolute-form) else `Host`.
fn request_host(req: &Parts) -> Option<&[u8]> {
    match req.uri.authority() {
        Some(a) => Some(a.as_str().as_bytes()),
        None => req.headers.get(HOST).map(HeaderValue::as_bytes),
    }
}

// === Hash policy ===

/// The request's hash for RING_HASH / MAGLEV clusters, as Envoy's `HashPolicyImpl::generateHash`:
/// each policy that yields a value is xxHash64'd and folded in (rotate left 1, XOR); a terminal
/// policy that produced a hash ends the walk. `None` when no policy applies (the LB then picks
/// at random). Allocates only to sort a header that appears more than once.
pub fn hash_key(
    policies: &[strait_xds::model::HashPolicy],
    req: &Parts,
    client: std::net::IpAddr,
) -> Option<u64> {
    use crate::lb::hash::{combine, xxhash64};
    use strait_xds::model::HashSource;
    let mut acc = None;
    for p in policies {
        let h = match &p.source {
            HashSource::Header(name) => header_hash(req, name),
            HashSource::Cookie(name) => {
                cookie_value(&req.headers, name).map(|v| xxhash64(v.as_bytes()))
            }
            HashSource::SourceIp => {
                let mut buf = [0u8; 64];
                let ip = format_ip(client, &mut buf);
                Some(xxhash64(ip))
            }
            HashSource::QueryParameter(name) => {
                query_value(req.uri.query().unwrap_or(""), name).map(|v| xxhash64(v.as_bytes()))
            }
        };
        if let Some(h) = h {
            acc = Some(combine(acc, h));
        }
        if p.terminal && acc.is_some() {
            break;
        }
    }
    acc
}

fn header_hash(req: &Parts, name: &str) -> Option<u64> {
    use crate::lb::hash::xxhash64;
    let pseudo: Option<&[u8]> = match name {
        ":authority" => request_host(req),
        ":path" => Some(
            req.uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .as_bytes(),
        ),
        ":method" => Some(req.method.as_str().as_bytes()),
        ":scheme" => req.uri.scheme_str().map(str::as_bytes),
        _ => None,
    };
    if name.starts_with(':') {
        return pseudo.map(xxhash64);
    }
    let mut values = req.headers.get_all(name).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(xxhash64(first.as_bytes()));
    };
    // Envoy sorts the values so that their order does not change the hash.
    let mut all: Vec<&[u8]> = vec![first.as_bytes(), second.as_bytes()];
    all.extend(values.map(HeaderValue::as_bytes));
    all.sort_unstable();
    let mut h = xxhash_rust::xxh64::Xxh64::new(0);
    for v in all {
        h.update(v);
    }
    Some(h.digest())
}

/// The value of cookie `name` in the `cookie` headers (Envoy's `parseCookieValue`: first match,
/// surrounding double quotes removed).
fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    for v in headers.get_all(http::header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for pair in v.split(';') {
            let pair = pair.trim_start_matches(' ');
            if let Some((k, val)) = pair.split_once('=') {
                if k == name {
                    let val = val
                        .strip_prefix('"')
                        .and_then(|x| x.strip_suffix('"'))
                        .unwrap_or(val);
                    return Some(val);
                }
            }
        }
    }
    None
}

/// The first value of query parameter `name` (not percent-decoded, as Envoy's
/// `parseQueryString`); a bare `name` has the empty value.
fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|kv| match kv.split_once('=') {
        Some((k, v)) if k == name => Some(v),
        None if kv == name => Some(""),
        _ => None,
    })
}

/// Envoy's `addressAsString` (no brackets, no port) into a stack buffer.
fn format_ip(ip: std::net::IpAddr, buf: &mut [u8; 64]) -> &[u8] {
    use std::io::Write as _;
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(cur, "{ip}");
    let n = cur.position() as usize;
    &buf[..n]
}

/// Envoy's search order: exact, longest suffix wildcard, longest prefix wildcard, then `*`.
/// Like Envoy without `ignore_port_in_host_matching`, a port in the host is part of the match.
/// The request's authority is looked up only when a domain other than `*` needs it.
fn find_virtual_host<'a>(rc: &'a RouteConfig, req: &Parts) -> Option<&'a VirtualHost> {
    let mut any = None;
    let mut only_any = true;
    for vh in &rc.virtual_hosts {
        for d in &vh.domains {
            if *d == DomainMatcher::Any {
                any = any.or(Some(vh));
            } else {
                only_any = false;
            }
        }
    }
    // As in Envoy, a request without authority only reaches a lone `*` virtual host.
    if only_any {
        return any;
    }
    let host = request_host(req)?;
    let mut best_suffix: Option<(usize, &VirtualHost)> = None;
    let mut best_prefix: Option<(usize, &VirtualHost)> = None;
    for vh in &rc.virtual_hosts {
        for d in &vh.domains {
            match d {
                DomainMatcher::Exact(e) => {
                    if host.eq_ignore_ascii_case(e.as_bytes()) {
                        return Some(vh);
                    }
                }
                // `<` rather than `<=`: the `*` must stand for at least one character.
                DomainMatcher::Suffix(s) => {
                    let n = s.len();
                    if n < host.len()
                        && best_suffix.is_none_or(|(l, _)| n > l)
                        && host[host.len() - n..].eq_ignore_ascii_case(s.as_bytes())
                    {
                        best_suffix = Some((n, vh));
                    }
                }
                DomainMatcher::Prefix(p) => {
                    let n = p.len();
                    if n < host.len()
                        && best_prefix.is_none_or(|(l, _)| n > l)
                        && host[..n].eq_ignore_ascii_case(p.as_bytes())
                    {
                        best_prefix = Some((n, vh));
                    }
                }
                DomainMatcher::Any => {}
            }
        }
    }
    best_suffix.or(best_prefix).map(|(_, vh)| vh).or(any)
}

/// The path without query string and fragment, as Envoy's path matchers see it.
fn path_only(path_and_query: &str) -> &str {
    // A byte scan: `str::find` with a char set costs a generic searcher's set-up per call.
    match path_and_query.bytes().position(|b| b == b'?' || b == b'#') {
        Some(i) => &path_and_query[..i],
        None => path_and_query,
    }
}

fn starts_with(s: &str, prefix: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        s.starts_with(prefix)
    } else {
        s.len() >= prefix.len()
            && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    }
}

fn route_matches(m: &RouteMatch, req: &Parts, path_and_query: &str) -> bool {
    let path = path_only(path_and_query);
    let cs = m.case_sensitive;
    let path_ok = match &m.path {
        PathMatch::Prefix(p) => starts_with(path, p, cs),
        PathMatch::Path(p) => {
            if cs {
                path == p
            } else {
                path.eq_ignore_ascii_case(p)
            }
        }
        // Translation anchors the pattern, so `is_match` is RE2's FullMatch.
        PathMatch::Regex(r) => r.is_match(path),
        PathMatch::PathSeparatedPrefix(p) => {
            starts_with(path, p, cs) && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
        }
    };
    path_ok
        && m.headers
            .iter()
            .all(|h| header_matches(h, req, path_and_query))
        && m.query_parameters
            .iter()
            .all(|q| query_matches(q, query_of(path_and_query)))
}

/// A header's value for matching: pseudo-headers from the request line, and several values of
/// one header joined with `,` as Envoy does. `None` when absent.
fn header_value_for_match<'r>(
    name: &str,
    req: &'r Parts,
    path_and_query: &'r str,
) -> Option<Cow<'r, str>> {
    match name {
        ":method" => return Some(Cow::Borrowed(req.method.as_str())),
        ":path" => return Some(Cow::Borrowed(path_and_query)),
        ":scheme" => return Some(Cow::Borrowed(req.uri.scheme_str().unwrap_or("http"))),
        ":authority" | "host" => {
            return request_host(req).map(String::from_utf8_lossy);
        }
        _ => {}
    }
    let mut values = req.headers.get_all(name).iter();
    let first = values.next()?;
    let first = String::from_utf8_lossy(first.as_bytes());
    let Some(second) = values.next() else {
        return Some(first);
    };
    let mut joined = first.into_owned();
    for v in std::iter::once(second).chain(values) {
        joined.push(',');
        joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
    Some(Cow::Owned(joined))
}

/// Envoy's `HeaderUtility::matchHeaders`: a missing header fails every value matcher, inverted
/// or not; only `present_match` can match an absent header.
fn header_matches(h: &HeaderMatcher, req: &Parts, path_and_query: &str) -> bool {
    let value = header_value_for_match(&h.name, req, path_and_query);
    match (&h.spec, value) {
        (HeaderMatchSpec::Present(want), v) => (v.is_some() == *want) != h.invert,
        (HeaderMatchSpec::StringMatch(_), None) => false,
        (HeaderMatchSpec::StringMatch(sm), Some(v)) => sm.matches(&v) != h.invert,
    }
}

fn query_of(path_and_query: &str) -> &str {
    let Some(q) = path_and_query.find('?').map(|i| &path_and_query[i + 1..]) else {
        return "";
    };
    q.split('#').next().unwrap_or("")
}

/// Envoy matches the first value of the parameter, undecoded; a key without `=` has value "".
fn query_matches(m: &QueryParameterMatcher, query: &str) -> bool {
    let first = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .find(|(k, _)| *k == m.name)
        .map(|(_, v)| v);
    match (&m.spec, first) {
        (_, None) => false,
        (QueryParameterSpec::Present, Some(_)) => true,
        (QueryParameterSpec::StringMatch(sm), Some(v)) => sm.matches(v),
    }
}

// === Rewrites ===

/// The length of the path prefix a route's match consumed, which `prefix_rewrite` replaces:
/// the configured prefix (or path) for prefix / path_separated_prefix / path matches, the whole
/// path without query for regex matches (Envoy's `matched_path`).
fn matched_len(route: &Route, path_and_query: &str) -> usize {
    match &route.matcher.path {
        PathMatch::Prefix(p) | PathMatch::Path(p) | PathMatch::PathSeparatedPrefix(p) => p.len(),
        PathMatch::Regex(_) => path_only(path_and_query).len(),
    }
}

/// Replaces the first `n` bytes of `path_and_query`, keeping the rest (the query string).
fn replace_head(path_and_query: &str, n: usize, with: &str) -> Option<String> {
    let tail = path_and_query.get(n..)?;
    let mut out = String::with_capacity(with.len() + tail.len());
    out.push_str(with);
    out.push_str(tail);
    Some(out)
}

/// Applies an RE2-style substitution (`\0`..`\9` groups, `\\` for a backslash) to the path part,
/// keeping the query string, like Envoy's `regex_rewrite`.
fn regex_replace_path(re: &regex::Regex, sub: &str, path_and_query: &str) -> String {
    let path = path_only(path_and_query);
    let replaced = re.replace_all(path, Re2Substitution(sub));
    let mut out = String::with_capacity(replaced.len() + path_and_query.len() - path.len());
    out.push_str(&replaced);
    out.push_str(&path_and_query[path.len()..]);
    out
}

/// Interprets RE2's rewrite syntax directly, so Envoy's substitution strings need no conversion
/// to the `regex` crate's `$1` syntax (whose `$` would otherwise need escaping).
struct Re2Substitution<'s>(&'s str);

impl regex::Replacer for Re2Substitution<'_> {
    fn replace_append(&mut self, caps: &regex::Captures<'_>, dst: &mut String) {
        let mut chars = self.0.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                dst.push(c);
                continue;
            }
            match chars.next() {
                Some(d @ '0'..='9') => {
                    let group = d as usize - '0' as usize;
                    if let Some(m) = caps.get(group) {
                        dst.push_str(m.as_str());
                    }
                }
                Some(other) => dst.push(other),
                None => dst.push('\\'),
            }
        }
    }
}

/// New path-and-query after `prefix_rewrite` / `regex_rewrite`; `None` when neither is
/// configured or the result equals the input. The query string is always kept.
pub fn rewrite_path(action: &ForwardAction, route: &Route, path_and_query: &str) -> Option<String> {
    let new = if let Some(prefix) = action.prefix_rewrite.as_deref().filter(|p| !p.is_empty()) {
        replace_head(path_and_query, matched_len(route, path_and_query), prefix)?
    } else if let Some((re, sub)) = &action.regex_rewrite {
        regex_replace_path(re, sub, path_and_query)
    } else {
        return None;
    };
    (new != path_and_query).then_some(new)
}

// === Redirects ===

/// The host for a redirect when `host_redirect` is unset (Envoy's `processRequestHost`): the
/// request's host, without its port when a new port is given or when the scheme changes and the
/// port was the old scheme's default.
fn redirect_host<'h>(
    host: &'h str,
    request_scheme: &str,
    new_scheme: &str,
    new_port: bool,
) -> &'h str {
    let port_start = if host.starts_with('[') {
        host.rfind("]:").map(|i| i + 1)
    } else {
        host.rfind(':')
    };
    let Some(i) = port_start else {
        return host;
    };
    let port = &host[i..];
    let mut remove = new_port;
    if new_scheme != request_scheme {
        remove |= request_scheme == "https" && port == ":443";
        remove |= request_scheme == "http" && port == ":80";
    }
    if remove {
        &host[..i]
    } else {
        host
    }
}

/// The `Location` of a redirect route, as Envoy's `Http::Utility::newUri` builds it. `scheme` is
/// the request's scheme (`x-forwarded-proto` as Envoy sets it).
pub fn redirect_location(r: &Redirect, req: &Parts, scheme: &str, route: &Route) -> String {
    let new_scheme = r.scheme.as_deref().unwrap_or(scheme);
    let request_host = request_host(req)
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let host: &str = match &r.host {
        Some(h) => h,
        None => redirect_host(&request_host, scheme, new_scheme, r.port.is_some()),
    };
    let pq = req.uri.path_and_query().map_or("/", |pq| pq.as_str());

    // A query in `path_redirect` replaces the request's and survives `strip_query`.
    let mut keeps_query = false;
    let mut path: Cow<'_, str> = match &r.path {
        RedirectPath::Keep => Cow::Borrowed(pq),
        RedirectPath::Path(p) if p.contains('?') => {
            keeps_query = true;
            Cow::Borrowed(p.as_str())
        }
        RedirectPath::Path(p) => {
            let query = pq.find('?').map_or("", |i| &pq[i..]);
            Cow::Owned(format!("{p}{query}"))
        }
        RedirectPath::Prefix(prefix) => match replace_head(pq, matched_len(route, pq), prefix) {
            Some(p) => Cow::Owned(p),
            None => Cow::Borrowed(pq),
        },
        RedirectPath::Regex(re, sub) => Cow::Owned(regex_replace_path(re, sub, pq)),
    };
    if !path.starts_with('/') {
        path = Cow::Owned(format!("/{path}"));
    }
    if r.strip_query && !keeps_query {
        if let Some(i) = path.find('?') {
            path = Cow::Owned(path[..i].to_string());
        }
    }
    match r.port {
        Some(port) => format!("{new_scheme}://{host}:{port}{path}"),
        None => format!("{new_scheme}://{host}{path}"),
    }
}

// === Header mutations ===

/// Applies the request-side `*_headers_to_add` / `*_headers_to_remove` of each level, in the
/// order given; a later level wins where values are overwritten. Callers pass Envoy's default
/// order (`most_specific_header_mutations_wins: false`): weighted cluster, route, virtual host,
/// route configuration — so the route configuration's headers are applied last.
pub fn apply_request_headers(headers: &mut HeaderMap, levels: &[&HeaderMutations]) {
    for level in levels {
        apply_level(
            headers,
            &level.request_headers_to_remove,
            &level.request_headers_to_add,
        );
    }
}

/// Response-side counterpart of [`apply_request_headers`], same level order.
pub fn apply_response_headers(headers: &mut HeaderMap, levels: &[&HeaderMutations]) {
    for level in levels {
        apply_level(
            headers,
            &level.response_headers_to_remove,
            &level.response_headers_to_add,
        );
    }
}

/// One level, as Envoy's `HeaderParser::evaluateHeaders`: removals first; then every addition
/// is decided against the headers as they were before this level's additions; overwrites are
/// applied before appends.
#[inline]
fn apply_level(headers: &mut HeaderMap, remove: &[HeaderName], add: &[HeaderValueOption]) {
    // Most levels are empty: checked inline, ahead of the out-of-line work's stack frame (about
    // 40 instructions a level, six levels a request).
    if !remove.is_empty() || !add.is_empty() {
        apply_level_slow(headers, remove, add);
    }
}

#[inline(never)]
fn apply_level_slow(headers: &mut HeaderMap, remove: &[HeaderName], add: &[HeaderValueOption]) {
    for name in remove {
        headers.remove(name);
    }
    if add.is_empty() {
        return;
    }
    let mut overwrite: Vec<&HeaderValueOption> = Vec::new();
    let mut append: Vec<&HeaderValueOption> = Vec::new();
    for h in add {
        if h.value.is_empty() && !h.keep_empty_value {
            continue;
        }
        let present = headers.contains_key(&h.name);
        match h.append_action {
            AppendAction::AppendIfExistsOrAdd => append.push(h),
            AppendAction::AddIfAbsent if !present => append.push(h),
            AppendAction::AddIfAbsent => {}
            AppendAction::OverwriteIfExists if !present => {}
            AppendAction::OverwriteIfExists | AppendAction::OverwriteIfExistsOrAdd => {
                overwrite.push(h)
            }
        }
    }
    for h in overwrite {
        headers.insert(h.name.clone(), h.value.clone());
    }
    for h in append {
        headers.append(h.name.clone(), h.value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, StatusCode};
    use regex::Regex;
    use strait_xds::model::{
        ClusterSpecifier, HostRewrite, QueryParameterMatcher, RouteAction, StringMatcher,
        StringPattern,
    };

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn forward(cluster: &str) -> RouteAction {
        RouteAction::Forward(ForwardAction {
            cluster: ClusterSpecifier::Cluster(cluster.into()),
            prefix_rewrite: None,
            regex_rewrite: None,
            host_rewrite: HostRewrite::None,
            timeout: None,
            idle_timeout: None,
            retry_policy: None,
            upgrade_overrides: vec![],
            priority: Default::default(),
            hash_policy: vec![],
        })
    }

    fn route(name: &str, path: PathMatch) -> Route {
        Route {
            name: name.into(),
            matcher: RouteMatch {
                path,
                case_sensitive: true,
                headers: vec![],
                query_parameters: vec![],
            },
            action: forward(name),
            headers: HeaderMutations::default(),
            filter_route: Default::default(),
        }
    }

    fn vhost(name: &str, domains: Vec<DomainMatcher>, routes: Vec<Route>) -> VirtualHost {
        VirtualHost {
            name: name.into(),
            domains,
            routes,
            headers: HeaderMutations::default(),
            retry_policy: None,
        }
    }

    fn prefix_vhost(name: &str, domains: Vec<DomainMatcher>) -> VirtualHost {
        vhost(
            name,
            domains,
            vec![route(name, PathMatch::Prefix("/".into()))],
        )
    }

    fn exact(s: &str) -> StringMatcher {
        StringMatcher {
            pattern: StringPattern::Exact(s.into()),
            ignore_case: false,
        }
    }

    /// Returns "vhost/route", "no-vhost" or "no-route".
    fn pick(rc: &RouteConfig, p: &Parts) -> String {
        match select(rc, p) {
            Selected::Route { vhost, route } => format!("{}/{}", vhost.name, route.name),
            Selected::NoVirtualHost => "no-vhost".into(),
            Selected::NoRoute => "no-route".into(),
        }
    }

    #[test]
    fn virtual_host_search_order() {
        use DomainMatcher::*;
        let rc = RouteConfig {
            name: "rc".into(),
            virtual_hosts: vec![
                prefix_vhost("any", vec![Any]),
                prefix_vhost("pfx", vec![Prefix("api.".into())]),
                prefix_vhost("longpfx", vec![Prefix("api.example.".into())]),
                prefix_vhost("sfx", vec![Suffix(".example.com".into())]),
                prefix_vhost("longsfx", vec![Suffix("-bar.example.com".into())]),
                prefix_vhost(
                    "exact",
                    vec![Exact("www.example.com".into()), Exact("h:8080".into())],
                ),
            ],
            ..Default::default()
        };
        let table = [
            ("www.example.com", "exact"),
            ("WWW.Example.COM", "exact"),
            ("h:8080", "exact"),
            // The port is part of the host, as in Envoy by default.
            ("www.example.com:80", "any"),
            ("h", "any"),
            ("foo-bar.example.com", "longsfx"),
            ("foo.example.com", "sfx"),
            // `*.example.com` does not match `.example.com`: `*` needs one character.
            (".example.com", "any"),
            ("api.example.org", "longpfx"),
            ("api.other", "pfx"),
            // Suffix wildcards win over prefix wildcards.
            ("api.example.com", "sfx"),
            ("other", "any"),
        ];
        for (host, want) in table {
            let p = parts("GET", "/", &[("host", host)]);
            assert_eq!(pick(&rc, &p), format!("{want}/{want}"), "host {host}");
        }
        // HTTP/2 style: the authority is in the URI.
        let p = parts("GET", "http://www.example.com/x", &[]);
        assert_eq!(pick(&rc, &p), "exact/exact");
    }

    #[test]
    fn no_virtual_host_and_lone_wildcard() {
        let rc = RouteConfig {
            virtual_hosts: vec![prefix_vhost("a", vec![DomainMatcher::Exact("a".into())])],
            ..Default::default()
        };
        assert_eq!(pick(&rc, &parts("GET", "/", &[("host", "b")])), "no-vhost");
        assert_eq!(pick(&rc, &parts("GET", "/", &[])), "no-vhost");
        let rc = RouteConfig {
            virtual_hosts: vec![prefix_vhost("any", vec![DomainMatcher::Any])],
            ..Default::default()
        };
        assert_eq!(pick(&rc, &parts("GET", "/", &[])), "any/any");
    }

    fn match_table_config() -> RouteConfig {
        let mut ci = route("ci", PathMatch::Prefix("/CI".into()));
        ci.matcher.case_sensitive = false;
        let mut hdr = route("hdr", PathMatch::Prefix("/h".into()));
        hdr.matcher.headers = vec![
            HeaderMatcher {
                name: "x-env".into(),
                spec: HeaderMatchSpec::StringMatch(exact("a,b")),
                invert: false,
            },
            HeaderMatcher {
                name: ":method".into(),
                spec: HeaderMatchSpec::StringMatch(exact("POST")),
                invert: false,
            },
        ];
        let mut inv = route("inv", PathMatch::Prefix("/h".into()));
        inv.matcher.headers = vec![HeaderMatcher {
            name: "x-env".into(),
            spec: HeaderMatchSpec::StringMatch(exact("prod")),
            invert: true,
        }];
        let mut absent = route("absent", PathMatch::Prefix("/h".into()));
        absent.matcher.headers = vec![HeaderMatcher {
            name: "x-debug".into(),
            spec: HeaderMatchSpec::Present(false),
            invert: false,
        }];
        let mut q = route("q", PathMatch::Prefix("/q".into()));
        q.matcher.query_parameters = vec![
            QueryParameterMatcher {
                name: "v".into(),
                spec: QueryParameterSpec::StringMatch(exact("2")),
            },
            QueryParameterMatcher {
                name: "debug".into(),
                spec: QueryParameterSpec::Present,
            },
        ];
        let mut auth = route("auth", PathMatch::Prefix("/a".into()));
        auth.matcher.headers = vec![HeaderMatcher {
            name: ":authority".into(),
            spec: HeaderMatchSpec::StringMatch(StringMatcher {
                pattern: StringPattern::Suffix(".internal".into()),
                ignore_case: true,
            }),
            invert: false,
        }];
        RouteConfig {
            virtual_hosts: vec![vhost(
                "v",
                vec![DomainMatcher::Any],
                vec![
                    route("exact", PathMatch::Path("/exact".into())),
                    route(
                        "regex",
                        PathMatch::Regex(Regex::new(r"^(?:/re/\d+)$").unwrap()),
                    ),
                    route("sep", PathMatch::PathSeparatedPrefix("/api".into())),
                    ci,
                    hdr,
                    inv,
                    absent,
                    q,
                    auth,
                    route("pfx", PathMatch::Prefix("/p".into())),
                ],
            )],
            ..Default::default()
        }
    }

    /// method, URI, headers, expected route.
    type MatchCase<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

    #[test]
    fn route_match_table() {
        let rc = match_table_config();
        let table: &[MatchCase<'_>] = &[
            ("GET", "/exact", &[], "exact"),
            ("GET", "/exact?x=1", &[], "exact"),
            ("GET", "/exact/", &[], "no-route"),
            ("GET", "/EXACT", &[], "no-route"),
            ("GET", "/re/123", &[], "regex"),
            ("GET", "/re/123?a=b", &[], "regex"),
            ("GET", "/re/12x", &[], "no-route"),
            ("GET", "/api", &[], "sep"),
            ("GET", "/api/v1", &[], "sep"),
            ("GET", "/api?x", &[], "sep"),
            ("GET", "/apiv1", &[], "no-route"),
            ("GET", "/ci/x", &[], "ci"),
            ("GET", "/cI", &[], "ci"),
            // Values of a repeated header are joined with `,` before matching.
            ("POST", "/h", &[("x-env", "a"), ("x-env", "b")], "hdr"),
            ("GET", "/h", &[("x-env", "a"), ("x-env", "b")], "inv"),
            ("POST", "/h", &[("x-env", "prod")], "absent"),
            // An inverted value matcher does not match a missing header.
            ("GET", "/h", &[], "absent"),
            (
                "GET",
                "/h",
                &[("x-debug", "1"), ("x-env", "prod")],
                "no-route",
            ),
            ("GET", "/q?v=2&debug", &[], "q"),
            // First value wins.
            ("GET", "/q?v=1&v=2&debug", &[], "no-route"),
            ("GET", "/q?debug&v=2#frag", &[], "q"),
            ("GET", "/q?v=2", &[], "no-route"),
            ("GET", "/a", &[("host", "svc.INTERNAL")], "auth"),
            ("GET", "/a", &[("host", "svc.external")], "no-route"),
            ("GET", "/p/x", &[], "pfx"),
            // Prefix matching ignores the query string.
            ("GET", "/?p", &[], "no-route"),
        ];
        for (method, uri, headers, want) in table {
            let mut hs = vec![("host", "h")];
            if headers.iter().any(|(k, _)| *k == "host") {
                hs.clear();
            }
            hs.extend_from_slice(headers);
            let p = parts(method, uri, &hs);
            let got = pick(&rc, &p);
            let want = if want.starts_with("no-") {
                want.to_string()
            } else {
                format!("v/{want}")
            };
            assert_eq!(got, want, "{method} {uri} {headers:?}");
        }
    }

    fn with_rewrite(
        path: PathMatch,
        prefix: Option<&str>,
        regex: Option<(&str, &str)>,
    ) -> (ForwardAction, Route) {
        let r = route("r", path);
        let action = ForwardAction {
            cluster: ClusterSpecifier::Cluster("c".into()),
            prefix_rewrite: prefix.map(Into::into),
            regex_rewrite: regex.map(|(p, s)| (Regex::new(p).unwrap(), s.to_string())),
            host_rewrite: HostRewrite::None,
            timeout: None,
            idle_timeout: None,
            retry_policy: None,
            upgrade_overrides: vec![],
            priority: Default::default(),
            hash_policy: vec![],
        };
        (action, r)
    }

    #[test]
    fn hash_policy_keys() {
        use crate::lb::hash::{combine, xxhash64};
        use strait_xds::model::{HashPolicy, HashSource};
        let ip: std::net::IpAddr = [10, 0, 0, 7].into();
        let pol = |source, terminal| HashPolicy { source, terminal };
        let req = parts(
            "GET",
            "http://h/p?a=1&user=bob&user=eve",
            &[("x-id", "b"), ("x-id", "a"), ("cookie", "k=v; sid=\"s1\"")],
        );
        let header = [pol(HashSource::Header("x-id".into()), false)];
        // Multiple values hash sorted: "a" then "b".
        assert_eq!(hash_key(&header, &req, ip), Some(xxhash64(b"ab")));
        let q = [pol(HashSource::QueryParameter("user".into()), false)];
        assert_eq!(hash_key(&q, &req, ip), Some(xxhash64(b"bob")));
        let c = [pol(HashSource::Cookie("sid".into()), false)];
        assert_eq!(hash_key(&c, &req, ip), Some(xxhash64(b"s1")));
        let s = [pol(HashSource::SourceIp, false)];
        assert_eq!(hash_key(&s, &req, ip), Some(xxhash64(b"10.0.0.7")));
        // Policies fold in order; a terminal one that produced a hash stops the walk; a
        // missing input contributes nothing.
        let two = [
            pol(HashSource::Cookie("none".into()), true),
            pol(HashSource::SourceIp, true),
            pol(HashSource::QueryParameter("user".into()), false),
        ];
        assert_eq!(hash_key(&two, &req, ip), Some(xxhash64(b"10.0.0.7")));
        let both = [
            pol(HashSource::SourceIp, false),
            pol(HashSource::QueryParameter("user".into()), false),
        ];
        let want = combine(Some(xxhash64(b"10.0.0.7")), xxhash64(b"bob"));
        assert_eq!(hash_key(&both, &req, ip), Some(want));
        assert_eq!(hash_key(&[], &req, ip), None);
        let auth = [pol(HashSource::Header(":authority".into()), false)];
        assert_eq!(hash_key(&auth, &req, ip), Some(xxhash64(b"h")));
    }

    /// route path match, prefix_rewrite, regex_rewrite, input, expected output.
    type RewriteCase<'a> = (
        PathMatch,
        Option<&'a str>,
        Option<(&'a str, &'a str)>,
        &'a str,
        Option<&'a str>,
    );

    #[test]
    fn rewrites() {
        let cases: &[RewriteCase<'_>] = &[
            (
                PathMatch::Prefix("/api/".into()),
                Some("/"),
                None,
                "/api/v1?x=1",
                Some("/v1?x=1"),
            ),
            (
                PathMatch::Prefix("/api".into()),
                Some("/v2"),
                None,
                "/api/users",
                Some("/v2/users"),
            ),
            (
                PathMatch::PathSeparatedPrefix("/api".into()),
                Some("/v2"),
                None,
                "/api/x",
                Some("/v2/x"),
            ),
            (
                PathMatch::Path("/old".into()),
                Some("/new"),
                None,
                "/old?q",
                Some("/new?q"),
            ),
            (
                PathMatch::Regex(Regex::new("^(?:/r/.*)$").unwrap()),
                Some("/z"),
                None,
                "/r/a?q",
                Some("/z?q"),
            ),
            // Envoy's documented example: RE2 groups, query kept.
            (
                PathMatch::Prefix("/".into()),
                None,
                Some(("^/service/([^/]+)(/.*)$", "\\2/instance/\\1")),
                "/service/foo/v1/api?x=$1",
                Some("/v1/api/instance/foo?x=$1"),
            ),
            (
                PathMatch::Prefix("/".into()),
                None,
                Some(("o", "0")),
                "/foo?o",
                Some("/f00?o"),
            ),
            (
                PathMatch::Prefix("/".into()),
                None,
                Some(("a", "$\\\\")),
                "/a",
                Some("/$\\"),
            ),
            (PathMatch::Prefix("/".into()), None, None, "/x", None),
            (
                PathMatch::Prefix("/x".into()),
                Some("/x"),
                None,
                "/x/y",
                None,
            ),
        ];
        for (path, prefix, regex, input, want) in cases {
            let (a, r) = with_rewrite(clone_path(path), *prefix, *regex);
            assert_eq!(rewrite_path(&a, &r, input).as_deref(), *want, "{input}");
        }
    }

    fn clone_path(p: &PathMatch) -> PathMatch {
        match p {
            PathMatch::Prefix(s) => PathMatch::Prefix(s.clone()),
            PathMatch::Path(s) => PathMatch::Path(s.clone()),
            PathMatch::Regex(r) => PathMatch::Regex(r.clone()),
            PathMatch::PathSeparatedPrefix(s) => PathMatch::PathSeparatedPrefix(s.clone()),
        }
    }

    fn redirect(path: RedirectPath) -> Redirect {
        Redirect {
            scheme: None,
            host: None,
            port: None,
            path,
            status: StatusCode::MOVED_PERMANENTLY,
            strip_query: false,
        }
    }

    #[test]
    fn redirects() {
        let rt = route("r", PathMatch::Prefix("/old".into()));
        let p = parts("GET", "/old/a?x=1", &[("host", "example.com:80")]);

        let mut r = redirect(RedirectPath::Keep);
        r.scheme = Some("https".into());
        assert_eq!(
            redirect_location(&r, &p, "http", &rt),
            "https://example.com/old/a?x=1"
        );
        // A non-default port is kept on a scheme change, as in Envoy.
        let p8080 = parts("GET", "/old", &[("host", "example.com:8080")]);
        assert_eq!(
            redirect_location(&r, &p8080, "http", &rt),
            "https://example.com:8080/old"
        );

        let mut r = redirect(RedirectPath::Keep);
        r.port = Some(8443);
        assert_eq!(
            redirect_location(&r, &p, "http", &rt),
            "http://example.com:8443/old/a?x=1"
        );

        let mut r = redirect(RedirectPath::Prefix("/new".into()));
        r.host = Some("other.org".into());
        assert_eq!(
            redirect_location(&r, &p, "http", &rt),
            "http://other.org/new/a?x=1"
        );

        let mut r = redirect(RedirectPath::Path("/p".into()));
        assert_eq!(
            redirect_location(&r, &p, "http", &rt),
            "http://example.com:80/p?x=1"
        );
        r.strip_query = true;
        assert_eq!(
            redirect_location(&r, &p, "http", &rt),
            "http://example.com:80/p"
        );
        // A query in path_redirect replaces the request's and is never stripped.
        let r = Redirect {
            strip_query: true,
            ..redirect(RedirectPath::Path("/p?y=2".into()))
        };
        assert_eq!(
            redirect_location(&r, &p, "http", &rt),
            "http://example.com:80/p?y=2"
        );

        let r = redirect(RedirectPath::Regex(
            Regex::new("^/old/(.*)$").unwrap(),
            "/n/\\1".into(),
        ));
        assert_eq!(
            redirect_location(&r, &p, "http", &rt),
            "http://example.com:80/n/a?x=1"
        );

        let r = redirect(RedirectPath::Path("rel".into()));
        let p = parts("GET", "/x", &[("host", "[::1]:443")]);
        assert_eq!(
            redirect_location(&r, &p, "https", &rt),
            "https://[::1]:443/rel"
        );
        let r = Redirect {
            scheme: Some("http".into()),
            ..redirect(RedirectPath::Keep)
        };
        assert_eq!(redirect_location(&r, &p, "https", &rt), "http://[::1]/x");
    }

    fn hvo(name: &'static str, value: &'static str, action: AppendAction) -> HeaderValueOption {
        HeaderValueOption {
            name: HeaderName::from_static(name),
            value: HeaderValue::from_static(value),
            append_action: action,
            keep_empty_value: false,
        }
    }

    fn values(h: &HeaderMap, name: &str) -> Vec<String> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn header_mutation_actions() {
        use AppendAction::*;
        let mut h = HeaderMap::new();
        h.append("a", HeaderValue::from_static("1"));
        h.append("b", HeaderValue::from_static("1"));
        h.append("gone", HeaderValue::from_static("1"));
        let level = HeaderMutations {
            request_headers_to_add: vec![
                hvo("a", "2", AppendIfExistsOrAdd),
                hvo("b", "2", OverwriteIfExistsOrAdd),
                hvo("c", "2", OverwriteIfExists),
                hvo("a", "3", AddIfAbsent),
                hvo("d", "2", AddIfAbsent),
                hvo("e", "", AppendIfExistsOrAdd),
                HeaderValueOption {
                    keep_empty_value: true,
                    ..hvo("f", "", AppendIfExistsOrAdd)
                },
                // `gone` is removed before additions are decided, so this finds nothing.
                hvo("gone", "new", OverwriteIfExists),
            ],
            request_headers_to_remove: vec![HeaderName::from_static("gone")],
            ..Default::default()
        };
        apply_request_headers(&mut h, &[&level]);
        assert_eq!(values(&h, "a"), ["1", "2"]);
        assert_eq!(values(&h, "b"), ["2"]);
        assert!(h.get("c").is_none());
        assert_eq!(values(&h, "d"), ["2"]);
        assert!(h.get("e").is_none());
        assert_eq!(values(&h, "f"), [""]);
        assert!(h.get("gone").is_none());
    }

    #[test]
    fn later_level_wins_and_response_side_is_separate() {
        use AppendAction::*;
        let route_level = HeaderMutations {
            request_headers_to_add: vec![hvo("x", "route", OverwriteIfExistsOrAdd)],
            response_headers_to_add: vec![hvo("r", "route", AppendIfExistsOrAdd)],
            ..Default::default()
        };
        let rc_level = HeaderMutations {
            request_headers_to_add: vec![hvo("x", "rc", OverwriteIfExistsOrAdd)],
            response_headers_to_remove: vec![HeaderName::from_static("server")],
            ..Default::default()
        };
        let mut req = HeaderMap::new();
        apply_request_headers(&mut req, &[&route_level, &rc_level]);
        assert_eq!(values(&req, "x"), ["rc"]);
        assert!(req.get("r").is_none());

        let mut resp = HeaderMap::new();
        resp.insert("server", HeaderValue::from_static("up"));
        apply_response_headers(&mut resp, &[&route_level, &rc_level]);
        assert_eq!(values(&resp, "r"), ["route"]);
        assert!(resp.get("server").is_none());
        assert!(resp.get("x").is_none());
    }
}

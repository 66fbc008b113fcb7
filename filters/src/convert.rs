//! Strict conversion helpers shared by the built-in filters: Envoy matcher, percentage, header
//! and CIDR protos become small validated types. A field Strait does not implement is an error
//! naming its path, never silently ignored.

use std::borrow::Cow;
use std::net::IpAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, HeaderMatcher as PbHeaderMatcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatcher, StringMatcher as PbStringMatcher,
};
use envoy_types::pb::envoy::r#type::v3::{fractional_percent::DenominatorType, FractionalPercent};
use http::{HeaderMap, HeaderName, HeaderValue};
use regex::Regex;

use crate::registry::FilterConfigError;

pub(crate) type Result<T> = std::result::Result<T, FilterConfigError>;

pub(crate) fn unsupported(path: &str, field: &str) -> FilterConfigError {
    FilterConfigError::new(format!("{path}.{field}"), "not supported yet")
}

pub(crate) fn invalid(path: &str, field: &str, why: impl Into<String>) -> FilterConfigError {
    FilterConfigError::new(format!("{path}.{field}"), why)
}

/// `Err(unsupported)` when a non-default field is set.
pub(crate) fn reject_set(set: bool, path: &str, field: &str) -> Result<()> {
    if set {
        Err(unsupported(path, field))
    } else {
        Ok(())
    }
}

// === Percentages ===

/// A probability in parts per million (Envoy's finest `FractionalPercent` denominator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PerMillion(pub u32);

impl PerMillion {
    pub const ALL: PerMillion = PerMillion(1_000_000);
    pub const NONE: PerMillion = PerMillion(0);

    /// Rolls the dice: true with this probability.
    pub fn sample(self) -> bool {
        if self.0 >= 1_000_000 {
            return true;
        }
        self.0 > 0 && fastrand::u32(0..1_000_000) < self.0
    }
}

/// Envoy clamps a numerator above its denominator to 100%.
pub(crate) fn fractional(fp: &FractionalPercent, path: &str) -> Result<PerMillion> {
    let FractionalPercent {
        numerator,
        denominator,
    } = *fp;
    let scale = match DenominatorType::try_from(denominator) {
        Ok(DenominatorType::Hundred) => 10_000u64,
        Ok(DenominatorType::TenThousand) => 100,
        Ok(DenominatorType::Million) => 1,
        Err(_) => {
            return Err(invalid(
                path,
                "denominator",
                format!("unknown denominator {denominator}"),
            ))
        }
    };
    Ok(PerMillion(
        (u64::from(numerator) * scale).min(1_000_000) as u32
    ))
}

/// `RuntimeFractionalPercent`: only `default_value` is honoured (Strait has no runtime layer);
/// the runtime key is accepted and ignored, as an unset runtime key in Envoy. Missing default
/// means the field's own default, `default_if_unset`.
pub(crate) fn runtime_fractional(
    rfp: Option<&core::RuntimeFractionalPercent>,
    path: &str,
    default_if_unset: PerMillion,
) -> Result<PerMillion> {
    let Some(core::RuntimeFractionalPercent {
        default_value,
        runtime_key: _,
    }) = rfp
    else {
        return Ok(default_if_unset);
    };
    match default_value {
        Some(fp) => fractional(fp, &format!("{path}.default_value")),
        None => Err(invalid(path, "default_value", "required")),
    }
}

pub(crate) fn duration(
    d: &envoy_types::pb::google::protobuf::Duration,
    path: &str,
) -> Result<Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(FilterConfigError::new(path, "invalid duration"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

// === String and header matchers ===

#[derive(Debug, Clone)]
pub(crate) enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Regex),
}

/// `envoy.type.matcher.v3.StringMatcher`.
#[derive(Debug, Clone)]
pub(crate) struct StringMatch {
    pattern: Pattern,
    ignore_case: bool,
}

pub(crate) fn regex(r: &RegexMatcher, path: &str) -> Result<Regex> {
    let RegexMatcher {
        regex,
        engine_type: _,
    } = r;
    // RE2 semantics are a full match; anchor the pattern.
    Regex::new(&format!("^(?:{regex})$")).map_err(|e| invalid(path, "regex", e.to_string()))
}

impl StringMatch {
    pub fn from_proto(m: &PbStringMatcher, path: &str) -> Result<Self> {
        let PbStringMatcher {
            ignore_case,
            match_pattern,
        } = m;
        let lower = |s: &str| {
            if *ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        let pattern = match match_pattern {
            Some(MatchPattern::Exact(s)) => Pattern::Exact(lower(s)),
            Some(MatchPattern::Prefix(s)) => Pattern::Prefix(lower(s)),
            Some(MatchPattern::Suffix(s)) => Pattern::Suffix(lower(s)),
            Some(MatchPattern::Contains(s)) => Pattern::Contains(lower(s)),
            Some(MatchPattern::SafeRegex(r)) => {
                if *ignore_case {
                    return Err(invalid(
                        path,
                        "ignore_case",
                        "not supported with safe_regex",
                    ));
                }
                Pattern::Regex(regex(r, &format!("{path}.safe_regex"))?)
            }
            Some(MatchPattern::Custom(_)) => return Err(unsupported(path, "custom")),
            None => {
                return Err(invalid(
                    path,
                    "match_pattern",
                    "one of exact, prefix, suffix, contains, safe_regex is required",
                ))
            }
        };
        Ok(StringMatch {
            pattern,
            ignore_case: *ignore_case,
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        let v: Cow<'_, str> = if self.ignore_case && !matches!(self.pattern, Pattern::Regex(_)) {
            Cow::Owned(value.to_ascii_lowercase())
        } else {
            Cow::Borrowed(value)
        };
        match &self.pattern {
            Pattern::Exact(p) => v == p.as_str(),
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Suffix(p) => v.ends_with(p.as_str()),
            Pattern::Contains(p) => v.contains(p.as_str()),
            Pattern::Regex(r) => r.is_match(&v),
        }
    }
}

#[derive(Debug, Clone)]
enum HeaderSpec {
    String(StringMatch),
    Present(bool),
    /// `[start, end)`.
    Range(i64, i64),
}

/// `envoy.config.route.v3.HeaderMatcher`.
#[derive(Debug, Clone)]
pub(crate) struct HeaderMatch {
    name: String,
    spec: HeaderSpec,
    invert: bool,
    treat_missing_as_empty: bool,
}

impl HeaderMatch {
    pub fn from_proto(m: &PbHeaderMatcher, path: &str) -> Result<Self> {
        #[allow(deprecated)]
        let PbHeaderMatcher {
            name,
            invert_match,
            treat_missing_header_as_empty,
            header_match_specifier,
        } = m;
        if name.is_empty() {
            return Err(invalid(path, "name", "must not be empty"));
        }
        let plain = |p: Pattern| {
            HeaderSpec::String(StringMatch {
                pattern: p,
                ignore_case: false,
            })
        };
        #[allow(deprecated)]
        let spec = match header_match_specifier {
            Some(HeaderMatchSpecifier::StringMatch(s)) => {
                HeaderSpec::String(StringMatch::from_proto(s, &format!("{path}.string_match"))?)
            }
            Some(HeaderMatchSpecifier::ExactMatch(s)) => plain(Pattern::Exact(s.clone())),
            Some(HeaderMatchSpecifier::PrefixMatch(s)) => plain(Pattern::Prefix(s.clone())),
            Some(HeaderMatchSpecifier::SuffixMatch(s)) => plain(Pattern::Suffix(s.clone())),
            Some(HeaderMatchSpecifier::ContainsMatch(s)) => plain(Pattern::Contains(s.clone())),
            Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => plain(Pattern::Regex(regex(
                r,
                &format!("{path}.safe_regex_match"),
            )?)),
            Some(HeaderMatchSpecifier::PresentMatch(p)) => HeaderSpec::Present(*p),
            Some(HeaderMatchSpecifier::RangeMatch(r)) => HeaderSpec::Range(r.start, r.end),
            // Envoy: no specifier means "header is present".
            None => HeaderSpec::Present(true),
        };
        Ok(HeaderMatch {
            name: name.to_ascii_lowercase(),
            spec,
            invert: *invert_match,
            treat_missing_as_empty: *treat_missing_header_as_empty,
        })
    }

    pub fn matches_request(&self, req: &http::request::Parts) -> bool {
        self.matches_value(request_header(req, &self.name))
    }

    #[cfg(test)]
    pub fn matches_headers(&self, headers: &HeaderMap) -> bool {
        self.matches_value(joined_header(headers, &self.name))
    }

    fn matches_value(&self, value: Option<Cow<'_, str>>) -> bool {
        let value = match value {
            Some(v) => v,
            None if self.treat_missing_as_empty => Cow::Borrowed(""),
            None => {
                // Envoy: an absent header matches only `present_match: false`, and inversion
                // applies to that result.
                let base = matches!(self.spec, HeaderSpec::Present(false));
                return base != self.invert;
            }
        };
        let base = match &self.spec {
            HeaderSpec::String(m) => m.matches(&value),
            HeaderSpec::Present(p) => *p,
            HeaderSpec::Range(start, end) => {
                value.parse::<i64>().is_ok_and(|v| *start <= v && v < *end)
            }
        };
        base != self.invert
    }
}

/// All values of `name` joined with `,` (Envoy's multi-value matching), `None` if absent.
pub(crate) fn joined_header<'a>(headers: &'a HeaderMap, name: &str) -> Option<Cow<'a, str>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let first = String::from_utf8_lossy(first.as_bytes());
    let mut rest = values.peekable();
    if rest.peek().is_none() {
        return Some(first);
    }
    let mut joined = first.into_owned();
    for v in rest {
        joined.push(',');
        joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
    Some(Cow::Owned(joined))
}

/// A request header by lower-case name, including the pseudo-headers `:method`, `:path`,
/// `:authority` and `:scheme`.
pub(crate) fn request_header<'a>(
    req: &'a http::request::Parts,
    name: &str,
) -> Option<Cow<'a, str>> {
    match name {
        ":method" => Some(Cow::Borrowed(req.method.as_str())),
        ":path" => req.uri.path_and_query().map(|p| Cow::Borrowed(p.as_str())),
        ":authority" => match req.uri.authority() {
            Some(a) => Some(Cow::Borrowed(a.as_str())),
            None => joined_header(&req.headers, "host"),
        },
        ":scheme" => req.uri.scheme_str().map(Cow::Borrowed),
        _ => joined_header(&req.headers, name),
    }
}

// === Header values ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

/// `envoy.config.core.v3.HeaderValueOption`, validated.
#[derive(Debug, Clone)]
pub(crate) struct HeaderAdd {
    pub name: HeaderName,
    pub value: HeaderValue,
    pub action: AppendAction,
    pub keep_empty_value: bool,
}

pub(crate) fn header_name(key: &str, path: &str) -> Result<HeaderName> {
    if key.starts_with(':') || key.eq_ignore_ascii_case("host") {
        return Err(FilterConfigError::new(
            path,
            format!("header '{key}' cannot be modified"),
        ));
    }
    HeaderName::from_bytes(key.to_ascii_lowercase().as_bytes())
        .map_err(|_| FilterConfigError::new(path, format!("invalid header name '{key}'")))
}

pub(crate) fn header_value_pair(
    h: &core::HeaderValue,
    path: &str,
) -> Result<(HeaderName, HeaderValue)> {
    let core::HeaderValue {
        key,
        value,
        raw_value,
    } = h;
    let name = header_name(key, &format!("{path}.key"))?;
    let bytes: &[u8] = if raw_value.is_empty() {
        value.as_bytes()
    } else {
        raw_value
    };
    let value = HeaderValue::from_bytes(bytes)
        .map_err(|_| invalid(path, "value", "invalid header value"))?;
    Ok((name, value))
}

impl HeaderAdd {
    pub fn from_proto(o: &core::HeaderValueOption, path: &str) -> Result<Self> {
        #[allow(deprecated)]
        let core::HeaderValueOption {
            header,
            append,
            append_action,
            keep_empty_value,
        } = o;
        let Some(header) = header else {
            return Err(invalid(path, "header", "required"));
        };
        let (name, value) = header_value_pair(header, &format!("{path}.header"))?;
        use core::header_value_option::HeaderAppendAction as A;
        let explicit = A::try_from(*append_action).map_err(|_| {
            invalid(
                path,
                "append_action",
                format!("unknown value {append_action}"),
            )
        })?;
        let action = match (append, explicit) {
            (Some(_), a) if a != A::AppendIfExistsOrAdd => {
                return Err(invalid(
                    path,
                    "append",
                    "cannot be set together with append_action",
                ))
            }
            (Some(b), _) if b.value => AppendAction::AppendIfExistsOrAdd,
            (Some(_), _) => AppendAction::OverwriteIfExistsOrAdd,
            (None, A::AppendIfExistsOrAdd) => AppendAction::AppendIfExistsOrAdd,
            (None, A::AddIfAbsent) => AppendAction::AddIfAbsent,
            (None, A::OverwriteIfExistsOrAdd) => AppendAction::OverwriteIfExistsOrAdd,
            (None, A::OverwriteIfExists) => AppendAction::OverwriteIfExists,
        };
        Ok(HeaderAdd {
            name,
            value,
            action,
            keep_empty_value: *keep_empty_value,
        })
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        if self.value.is_empty() && !self.keep_empty_value {
            return;
        }
        match self.action {
            AppendAction::AppendIfExistsOrAdd => {
                headers.append(self.name.clone(), self.value.clone());
            }
            AppendAction::AddIfAbsent => {
                if !headers.contains_key(&self.name) {
                    headers.insert(self.name.clone(), self.value.clone());
                }
            }
            AppendAction::OverwriteIfExistsOrAdd => {
                headers.insert(self.name.clone(), self.value.clone());
            }
            AppendAction::OverwriteIfExists => {
                if headers.contains_key(&self.name) {
                    headers.insert(self.name.clone(), self.value.clone());
                }
            }
        }
    }
}

// === CIDR ===

/// `envoy.config.core.v3.CidrRange`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    pub fn from_proto(c: &core::CidrRange, path: &str) -> Result<Self> {
        let core::CidrRange {
            address_prefix,
            prefix_len,
        } = c;
        let addr: IpAddr = address_prefix.parse().map_err(|_| {
            invalid(
                path,
                "address_prefix",
                format!("invalid IP address '{address_prefix}'"),
            )
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        // Envoy: an unset prefix_len is 0 (matches every address of the family); a too-long
        // one is clamped to the address length.
        let len = prefix_len.map_or(0, |l| l.value).min(max) as u8;
        Ok(Cidr { addr, len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) if self.addr.is_ipv4() => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            other => other,
        };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.len))
                };
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.len))
                };
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_matches_prefixes() {
        let c = Cidr::from_proto(
            &core::CidrRange {
                address_prefix: "10.1.0.0".into(),
                prefix_len: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 16 }),
            },
            "p",
        )
        .unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.1".parse().unwrap()));
        let all6 = Cidr::from_proto(
            &core::CidrRange {
                address_prefix: "::".into(),
                prefix_len: None,
            },
            "p",
        )
        .unwrap();
        assert!(all6.contains("2001:db8::1".parse().unwrap()));
        assert!(!all6.contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::from_proto(
            &core::CidrRange {
                address_prefix: "nope".into(),
                prefix_len: None
            },
            "p"
        )
        .is_err());
    }

    #[test]
    fn fractional_scales_and_clamps() {
        let fp = |n, d| FractionalPercent {
            numerator: n,
            denominator: d,
        };
        assert_eq!(fractional(&fp(50, 0), "p").unwrap(), PerMillion(500_000));
        assert_eq!(fractional(&fp(5, 1), "p").unwrap(), PerMillion(500));
        assert_eq!(fractional(&fp(200, 0), "p").unwrap(), PerMillion::ALL);
        assert!(PerMillion::ALL.sample());
        assert!(!PerMillion(0).sample());
    }

    #[test]
    fn header_matcher_semantics() {
        let pb = PbHeaderMatcher {
            name: "X-A".into(),
            header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(PbStringMatcher {
                ignore_case: true,
                match_pattern: Some(MatchPattern::Prefix("Ab".into())),
            })),
            ..Default::default()
        };
        let m = HeaderMatch::from_proto(&pb, "p").unwrap();
        let mut h = HeaderMap::new();
        assert!(!m.matches_headers(&h));
        h.insert("x-a", HeaderValue::from_static("aBc"));
        assert!(m.matches_headers(&h));
        let inv = HeaderMatch::from_proto(
            &PbHeaderMatcher {
                invert_match: true,
                ..pb
            },
            "p",
        )
        .unwrap();
        assert!(!inv.matches_headers(&h));
        assert!(inv.matches_headers(&HeaderMap::new()));
    }
}

//! Parser for Envoy's access-log format strings (`%COMMAND(args):len%` operators between literal
//! text) into [`model::FormatToken`]s. Parse errors follow Envoy's wording where it has one.

use http::HeaderName;

use crate::model::FormatToken;

/// Envoy's default access-log format.
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// Parses a whole format string.
pub fn parse(format: &str) -> Result<Vec<FormatToken>, String> {
    let bytes = format.as_bytes();
    let mut tokens = Vec::new();
    let mut literal = String::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let Some(off) = format[pos..].find('%') else {
            literal.push_str(&format[pos..]);
            break;
        };
        literal.push_str(&format[pos..pos + off]);
        pos += off;
        // `%%` is a literal percent sign, as in Envoy.
        if bytes.get(pos + 1) == Some(&b'%') {
            literal.push('%');
            pos += 2;
            continue;
        }
        let Some((cmd, args, max_len, end)) = scan_command(format, pos) else {
            return Err(format!(
                "Incorrect configuration: {format}. Couldn't find valid command at position {pos}"
            ));
        };
        if !literal.is_empty() {
            tokens.push(FormatToken::Literal(std::mem::take(&mut literal)));
        }
        tokens.push(command(cmd, args, max_len)?);
        pos = end;
    }
    if !literal.is_empty() {
        tokens.push(FormatToken::Literal(literal));
    }
    Ok(tokens)
}

/// Matches `%[A-Z0-9_]+(\([^)]*\))?(:[0-9]+)?%` at `start`; returns the parts and the end index.
fn scan_command(s: &str, start: usize) -> Option<(&str, Option<&str>, Option<usize>, usize)> {
    let b = s.as_bytes();
    let mut i = start + 1;
    while i < b.len() && (b[i].is_ascii_uppercase() || b[i].is_ascii_digit() || b[i] == b'_') {
        i += 1;
    }
    if i == start + 1 {
        return None;
    }
    let cmd = &s[start + 1..i];
    let mut args = None;
    if b.get(i) == Some(&b'(') {
        let close = s[i..].find(')')? + i;
        args = Some(&s[i + 1..close]);
        i = close + 1;
    }
    let mut max_len = None;
    if b.get(i) == Some(&b':') {
        let digits_start = i + 1;
        i = digits_start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == digits_start {
            return None;
        }
        max_len = Some(s[digits_start..i].parse().ok()?);
    }
    if b.get(i) != Some(&b'%') {
        return None;
    }
    Some((cmd, args, max_len, i + 1))
}

fn command(cmd: &str, args: Option<&str>, max_len: Option<usize>) -> Result<FormatToken, String> {
    use FormatToken as T;
    if let "REQ" | "RESP" | "TRAILER" = cmd {
        return header_command(cmd, args, max_len);
    }
    let token = match cmd {
        "START_TIME" => T::StartTime,
        "PROTOCOL" => T::Protocol,
        "RESPONSE_CODE" => T::ResponseCode,
        "RESPONSE_CODE_DETAILS" => T::ResponseCodeDetails,
        "RESPONSE_FLAGS" => T::ResponseFlags,
        "BYTES_RECEIVED" => T::BytesReceived,
        "BYTES_SENT" => T::BytesSent,
        "DURATION" => T::Duration,
        "REQUEST_DURATION" => T::RequestDuration,
        "RESPONSE_DURATION" => T::ResponseDuration,
        "UPSTREAM_HOST" => T::UpstreamHost,
        "UPSTREAM_CLUSTER" => T::UpstreamCluster,
        "UPSTREAM_LOCAL_ADDRESS" => T::UpstreamLocalAddress,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => T::UpstreamTransportFailureReason,
        "DOWNSTREAM_REMOTE_ADDRESS" => T::DownstreamRemoteAddress,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => T::DownstreamRemoteAddressWithoutPort,
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => T::DownstreamDirectRemoteAddress,
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => {
            T::DownstreamDirectRemoteAddressWithoutPort
        }
        "DOWNSTREAM_LOCAL_ADDRESS" => T::DownstreamLocalAddress,
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => T::DownstreamLocalAddressWithoutPort,
        "ROUTE_NAME" => T::RouteName,
        "HOSTNAME" => T::Hostname,
        other => return Err(format!("unsupported command operator '%{other}%'")),
    };
    if cmd == "START_TIME" && args.is_some() {
        return Err(
            "command operator '%START_TIME(...)%' with a format is not supported yet".into(),
        );
    }
    if args.is_some() || max_len.is_some() {
        return Err(format!("{cmd} does not take any parameters or length"));
    }
    Ok(token)
}

fn header_command(
    cmd: &str,
    args: Option<&str>,
    max_len: Option<usize>,
) -> Result<FormatToken, String> {
    let args = args.filter(|a| !a.is_empty());
    let Some(args) = args else {
        return Err(format!("{cmd} requires parameters"));
    };
    let mut parts = args.split('?');
    let primary = parts.next().unwrap_or_default().to_ascii_lowercase();
    let fallback = parts.next().map(str::to_ascii_lowercase);
    if parts.next().is_some() {
        return Err(format!(
            "More than 1 alternative header specified in token: {args}"
        ));
    }
    let is_pseudo = |n: &str| n.starts_with(':');
    if cmd == "REQ" && (is_pseudo(&primary) || fallback.as_deref().is_some_and(is_pseudo)) {
        for n in std::iter::once(&primary).chain(fallback.iter()) {
            check_request_name(n)?;
        }
        return Ok(FormatToken::ReqHeaderOrPseudo {
            primary,
            fallback,
            max_len,
        });
    }
    let primary = header_name(&primary)?;
    let fallback = match fallback {
        Some(f) => Some(header_name(&f)?),
        None => None,
    };
    Ok(match cmd {
        "REQ" => FormatToken::ReqHeader {
            primary,
            fallback,
            max_len,
        },
        "RESP" => FormatToken::RespHeader {
            primary,
            fallback,
            max_len,
        },
        _ => FormatToken::RespTrailer {
            primary,
            fallback,
            max_len,
        },
    })
}

/// A request header name or one of the four HTTP/2 request pseudo-headers.
fn check_request_name(name: &str) -> Result<(), String> {
    match name.strip_prefix(':') {
        Some("method" | "path" | "authority" | "scheme") => Ok(()),
        Some(_) => Err(format!("invalid pseudo-header '{name}'")),
        None => header_name(name).map(drop),
    }
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("invalid header name '{name}'"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use FormatToken as T;

    fn h(s: &str) -> HeaderName {
        HeaderName::from_bytes(s.as_bytes()).unwrap()
    }

    #[test]
    fn default_format_parses() {
        let t = parse(DEFAULT_FORMAT).unwrap();
        assert_eq!(t[0], T::Literal("[".into()));
        assert_eq!(t[1], T::StartTime);
        assert_eq!(t[2], T::Literal("] \"".into()));
        assert_eq!(
            t[3],
            T::ReqHeaderOrPseudo {
                primary: ":method".into(),
                fallback: None,
                max_len: None
            }
        );
        assert_eq!(
            t[5],
            T::ReqHeaderOrPseudo {
                primary: "x-envoy-original-path".into(),
                fallback: Some(":path".into()),
                max_len: None
            }
        );
        assert_eq!(t[17], T::Duration);
        assert_eq!(
            t[19],
            T::RespHeader {
                primary: h("x-envoy-upstream-service-time"),
                fallback: None,
                max_len: None
            }
        );
        assert_eq!(t.last(), Some(&T::Literal("\"\n".into())));
        assert!(t.contains(&T::UpstreamHost));
    }

    #[test]
    fn operators_lengths_and_escapes() {
        assert_eq!(
            parse("100%% %REQ(X-Foo?X-Bar):10%x").unwrap(),
            vec![
                T::Literal("100% ".into()),
                T::ReqHeader {
                    primary: h("x-foo"),
                    fallback: Some(h("x-bar")),
                    max_len: Some(10)
                },
                T::Literal("x".into())
            ]
        );
        assert_eq!(
            parse("%RESPONSE_CODE%%BYTES_SENT%").unwrap(),
            vec![T::ResponseCode, T::BytesSent]
        );
        assert_eq!(parse("").unwrap(), vec![]);
    }

    #[test]
    fn errors_match_envoy_wording() {
        assert_eq!(
            parse("x %FOO% y").unwrap_err(),
            "unsupported command operator '%FOO%'"
        );
        assert_eq!(parse("%REQ()%").unwrap_err(), "REQ requires parameters");
        assert_eq!(
            parse("%REQ(A?B?C)%").unwrap_err(),
            "More than 1 alternative header specified in token: A?B?C"
        );
        assert_eq!(
            parse("%PROTOCOL(x)%").unwrap_err(),
            "PROTOCOL does not take any parameters or length"
        );
        assert_eq!(
            parse("a % b").unwrap_err(),
            "Incorrect configuration: a % b. Couldn't find valid command at position 2"
        );
        assert!(parse("%REQ(X):abc%").is_err());
        assert!(parse("%req(x)%").is_err());
        assert!(parse("%REQ(:bogus)%").is_err());
        assert!(parse("%RESP(:status)%").is_err());
        assert!(parse("%START_TIME(%s)%").is_err());
    }
}

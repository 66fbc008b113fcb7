//! Access-log translation: file / stdout / stderr loggers with text or JSON formats.

use std::path::PathBuf;

use envoy_types::pb::envoy::config::accesslog::v3 as al;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::access_loggers::file::v3 as file;
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3 as stream;
use envoy_types::pb::google::protobuf as wkt;

use super::{at, format, reject_set, unpack, Ctx};
use crate::model::{self, FormatToken, JsonValueFormat, LogFormat};

const FILE_TYPE: &str = "envoy.extensions.access_loggers.file.v3.FileAccessLog";
const STDOUT_TYPE: &str = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
const STDERR_TYPE: &str = "envoy.extensions.access_loggers.stream.v3.StderrAccessLog";

pub(crate) fn translate(cx: &mut Ctx, path: &str, a: al::AccessLog) -> Option<model::AccessLog> {
    let al::AccessLog {
        name: _,
        filter,
        config_type,
    } = a;
    reject_set!(cx, path; filter);
    let Some(al::access_log::ConfigType::TypedConfig(any)) = config_type else {
        cx.err(at(path, "typed_config"), "required");
        return None;
    };
    let path = at(path, "typed_config");
    let type_name = any
        .type_url
        .strip_prefix("type.googleapis.com/")
        .unwrap_or(&any.type_url);
    let (sink, format) = match type_name {
        FILE_TYPE => {
            let file::FileAccessLog {
                path: file_path,
                access_log_format,
            } = unpack(cx, &path, &any, FILE_TYPE)?;
            use file::file_access_log::AccessLogFormat as F;
            let format = match access_log_format {
                None => default_format(),
                Some(F::Format(f)) if f.is_empty() => default_format(),
                Some(F::Format(f)) => text(cx, &at(&path, "format"), &f),
                Some(F::JsonFormat(s)) => json(cx, &at(&path, "json_format"), s, false),
                Some(F::TypedJsonFormat(s)) => json(cx, &at(&path, "typed_json_format"), s, true),
                Some(F::LogFormat(f)) => substitution(cx, &at(&path, "log_format"), f),
            };
            let sink = match file_path.as_str() {
                "" => {
                    cx.err(at(&path, "path"), "required");
                    return None;
                }
                "/dev/stdout" => model::AccessLogSink::Stdout,
                "/dev/stderr" => model::AccessLogSink::Stderr,
                p => model::AccessLogSink::File(PathBuf::from(p)),
            };
            (sink, format)
        }
        STDOUT_TYPE => {
            let stream::StdoutAccessLog { access_log_format } =
                unpack(cx, &path, &any, STDOUT_TYPE)?;
            let format = match access_log_format {
                Some(stream::stdout_access_log::AccessLogFormat::LogFormat(f)) => {
                    substitution(cx, &at(&path, "log_format"), f)
                }
                None => default_format(),
            };
            (model::AccessLogSink::Stdout, format)
        }
        STDERR_TYPE => {
            let stream::StderrAccessLog { access_log_format } =
                unpack(cx, &path, &any, STDERR_TYPE)?;
            let format = match access_log_format {
                Some(stream::stderr_access_log::AccessLogFormat::LogFormat(f)) => {
                    substitution(cx, &at(&path, "log_format"), f)
                }
                None => default_format(),
            };
            (model::AccessLogSink::Stderr, format)
        }
        other => {
            cx.err(&path, format!("unsupported access logger '{other}'"));
            return None;
        }
    };
    Some(model::AccessLog {
        sink,
        format: format?,
    })
}

fn default_format() -> Option<LogFormat> {
    format::parse(format::DEFAULT_FORMAT)
        .ok()
        .map(LogFormat::Text)
}

fn text(cx: &mut Ctx, path: &str, f: &str) -> Option<LogFormat> {
    match format::parse(f) {
        Ok(t) => Some(LogFormat::Text(t)),
        Err(e) => {
            cx.err(path, e);
            None
        }
    }
}

/// `envoy.config.core.v3.SubstitutionFormatString`.
fn substitution(cx: &mut Ctx, path: &str, f: core::SubstitutionFormatString) -> Option<LogFormat> {
    let core::SubstitutionFormatString {
        omit_empty_values,
        content_type,
        formatters,
        json_format_options,
        format,
    } = f;
    let start = cx.errors.len();
    reject_set!(cx, path; omit_empty_values, content_type, formatters, json_format_options);
    use core::substitution_format_string::Format as F;
    let out = match format {
        Some(F::TextFormat(t)) => text(cx, &at(path, "text_format"), &t),
        Some(F::JsonFormat(s)) => json(cx, &at(path, "json_format"), s, true),
        Some(F::TextFormatSource(ds)) => {
            let dpath = at(path, "text_format_source");
            let core::DataSource {
                watched_directory,
                specifier,
            } = ds;
            reject_set!(cx, &dpath; watched_directory);
            use core::data_source::Specifier as S;
            match specifier {
                Some(S::InlineString(s)) => text(cx, &at(&dpath, "inline_string"), &s),
                Some(S::InlineBytes(b)) => match String::from_utf8(b) {
                    Ok(s) => text(cx, &at(&dpath, "inline_bytes"), &s),
                    Err(_) => {
                        cx.err(at(&dpath, "inline_bytes"), "not valid UTF-8");
                        None
                    }
                },
                Some(S::Filename(_)) => {
                    cx.unsupported(at(&dpath, "filename"));
                    None
                }
                Some(S::EnvironmentVariable(_)) => {
                    cx.unsupported(at(&dpath, "environment_variable"));
                    None
                }
                None => {
                    cx.err(&dpath, "a data source is required");
                    None
                }
            }
        }
        None => {
            cx.err(path, "a format is required");
            None
        }
    };
    if cx.errors.len() > start {
        return None;
    }
    out
}

/// A JSON format dictionary. `typed`: a lone operator renders as a typed JSON value (as
/// `log_format.json_format` and `typed_json_format` do); the legacy `json_format` renders
/// everything as strings. Keys are emitted sorted: `Struct` keeps no order.
fn json(cx: &mut Ctx, path: &str, s: wkt::Struct, typed: bool) -> Option<LogFormat> {
    let start = cx.errors.len();
    let mut fields: Vec<_> = s.fields.into_iter().collect();
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::new();
    for (key, value) in fields {
        let kpath = at(path, &key);
        match value.kind {
            Some(wkt::value::Kind::StringValue(v)) => match format::parse(&v) {
                Ok(mut tokens) => {
                    let lone_operator =
                        tokens.len() == 1 && !matches!(tokens[0], FormatToken::Literal(_));
                    let v = match tokens.pop() {
                        Some(t) if typed && lone_operator => JsonValueFormat::Typed(t),
                        Some(t) => {
                            tokens.push(t);
                            JsonValueFormat::Text(tokens)
                        }
                        None => JsonValueFormat::Text(tokens),
                    };
                    out.push((key, v));
                }
                Err(e) => cx.err(kpath, e),
            },
            // Nested objects and non-string literals have no place in the model yet.
            _ => cx.err(kpath, "not supported yet (only string values)"),
        }
    }
    if cx.errors.len() > start {
        return None;
    }
    Some(LogFormat::Json(out))
}

//! `envoy.type.matcher.v3.MetadataMatcher` compiled against [`Metadata`]: a namespace, a key
//! path and a value matcher, with Envoy's semantics (a missing path is an unset value, which
//! only `present_match: false`-style inversions can match). Compiled at build time; matching
//! allocates nothing.

use envoy_types::pb::envoy::r#type::matcher::v3::{
    double_matcher::MatchPattern as DoublePattern, list_matcher::MatchPattern as ListPattern,
    metadata_matcher::path_segment::Segment, metadata_matcher::PathSegment,
    value_matcher::MatchPattern, DoubleMatcher, ListMatcher, MetadataMatcher as PbMetadataMatcher,
    OrMatcher, ValueMatcher,
};
use envoy_types::pb::envoy::r#type::v3::DoubleRange;

use crate::convert::{invalid, Result, StringMatch};
use crate::route::{Metadata, MetadataValue};

#[derive(Debug)]
enum ValueMatch {
    Null,
    /// `[start, end)`.
    Range(f64, f64),
    Exact(f64),
    String(StringMatch),
    Bool(bool),
    Present(bool),
    /// Some element of a list value matches.
    ListOneOf(Box<ValueMatch>),
    Or(Vec<ValueMatch>),
}

impl ValueMatch {
    fn from_proto(v: &ValueMatcher, path: &str) -> Result<ValueMatch> {
        let ValueMatcher { match_pattern } = v;
        Ok(match match_pattern {
            Some(MatchPattern::NullMatch(_)) => ValueMatch::Null,
            Some(MatchPattern::DoubleMatch(DoubleMatcher { match_pattern })) => match match_pattern
            {
                Some(DoublePattern::Range(DoubleRange { start, end })) => {
                    ValueMatch::Range(*start, *end)
                }
                Some(DoublePattern::Exact(x)) => ValueMatch::Exact(*x),
                None => return Err(invalid(path, "double_match", "range or exact required")),
            },
            Some(MatchPattern::StringMatch(s)) => {
                ValueMatch::String(StringMatch::from_proto(s, &format!("{path}.string_match"))?)
            }
            Some(MatchPattern::BoolMatch(b)) => ValueMatch::Bool(*b),
            Some(MatchPattern::PresentMatch(b)) => ValueMatch::Present(*b),
            Some(MatchPattern::ListMatch(l)) => {
                let ListMatcher { match_pattern } = l.as_ref();
                match match_pattern {
                    Some(ListPattern::OneOf(v)) => ValueMatch::ListOneOf(Box::new(
                        ValueMatch::from_proto(v, &format!("{path}.list_match.one_of"))?,
                    )),
                    None => return Err(invalid(path, "list_match", "one_of required")),
                }
            }
            Some(MatchPattern::OrMatch(OrMatcher { value_matchers })) => {
                if value_matchers.len() < 2 {
                    return Err(invalid(
                        path,
                        "or_match.value_matchers",
                        "at least 2 matchers required",
                    ));
                }
                ValueMatch::Or(
                    value_matchers
                        .iter()
                        .enumerate()
                        .map(|(i, m)| {
                            ValueMatch::from_proto(
                                m,
                                &format!("{path}.or_match.value_matchers[{i}]"),
                            )
                        })
                        .collect::<Result<_>>()?,
                )
            }
            None => return Err(invalid(path, "match_pattern", "required")),
        })
    }

    /// `None` is an unset value (missing key): only `present_match` looks at it, and fails.
    fn matches(&self, v: Option<&MetadataValue>) -> bool {
        match (self, v) {
            (ValueMatch::Present(p), v) => *p && v.is_some(),
            (_, None) => false,
            (ValueMatch::Null, Some(v)) => *v == MetadataValue::Null,
            (ValueMatch::Range(s, e), Some(MetadataValue::Number(n))) => *s <= *n && *n < *e,
            (ValueMatch::Exact(x), Some(MetadataValue::Number(n))) => n == x,
            (ValueMatch::String(m), Some(MetadataValue::String(s))) => m.matches(s),
            (ValueMatch::Bool(b), Some(MetadataValue::Bool(x))) => b == x,
            (ValueMatch::ListOneOf(m), Some(MetadataValue::List(l))) => {
                l.iter().any(|e| m.matches(Some(e)))
            }
            (ValueMatch::Or(ms), v) => ms.iter().any(|m| m.matches(v)),
            _ => false,
        }
    }
}

/// A compiled `MetadataMatcher`.
#[derive(Debug)]
pub struct MetadataMatch {
    namespace: String,
    path: Vec<String>,
    value: ValueMatch,
    invert: bool,
}

impl MetadataMatch {
    pub fn from_proto(m: &PbMetadataMatcher, path: &str) -> Result<MetadataMatch> {
        let PbMetadataMatcher {
            filter,
            path: segments,
            value,
            invert,
        } = m;
        if filter.is_empty() {
            return Err(invalid(path, "filter", "required"));
        }
        if segments.is_empty() {
            return Err(invalid(path, "path", "at least one segment required"));
        }
        let keys = segments
            .iter()
            .enumerate()
            .map(|(i, PathSegment { segment })| match segment {
                Some(Segment::Key(k)) if !k.is_empty() => Ok(k.clone()),
                _ => Err(invalid(path, &format!("path[{i}].key"), "required")),
            })
            .collect::<Result<Vec<_>>>()?;
        let Some(value) = value else {
            return Err(invalid(path, "value", "required"));
        };
        Ok(MetadataMatch {
            namespace: filter.clone(),
            path: keys,
            value: ValueMatch::from_proto(value, &format!("{path}.value"))?,
            invert: *invert,
        })
    }

    /// Matches `metadata` (`None`: no metadata at all, as an unset value).
    pub fn matches(&self, metadata: Option<&Metadata>) -> bool {
        let value = metadata.and_then(|m| {
            let (first, rest) = self.path.split_first()?;
            let mut v = m.filter_metadata.get(&self.namespace)?.get(first)?;
            for k in rest {
                v = v.get(k)?;
            }
            Some(v)
        });
        self.value.matches(value) != self.invert
    }
}

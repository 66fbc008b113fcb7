//! `envoy.filters.http.header_mutation`: adds and removes request and response headers, at the
//! filter level and per route (`HeaderMutationPerRoute`).

use std::sync::Arc;

use envoy_types::pb::envoy::config::common::mutation_rules::v3::{
    header_mutation::Action as PbAction, header_mutation::RemoveOnMatch,
    HeaderMutation as PbMutation,
};
use envoy_types::pb::envoy::extensions::filters::http::header_mutation::v3::{
    HeaderMutation, HeaderMutationPerRoute, Mutations,
};
use http::{HeaderMap, HeaderName};

use crate::api::{Action, FilterContext, Hooks, HttpFilter, PerRoute};
use crate::convert::{header_name, invalid, reject_set, HeaderAdd, Result, StringMatch};
use crate::registry::{decode, per_route, BuildContext, FilterConfigError, FilterFactory};

pub const TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation";
pub const PER_ROUTE_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute";

#[derive(Debug, Clone)]
enum Op {
    Remove(HeaderName),
    Append(HeaderAdd),
    RemoveOnMatch(StringMatch),
}

impl Op {
    fn apply(&self, headers: &mut HeaderMap) {
        match self {
            Op::Remove(name) => {
                headers.remove(name);
            }
            Op::Append(add) => add.apply(headers),
            Op::RemoveOnMatch(m) => {
                let doomed: Vec<HeaderName> = headers
                    .keys()
                    .filter(|k| m.matches(k.as_str()))
                    .cloned()
                    .collect();
                for name in doomed {
                    headers.remove(&name);
                }
            }
        }
    }
}

/// Parsed `Mutations`.
#[derive(Debug, Clone, Default)]
pub struct MutationSet {
    request: Vec<Op>,
    response: Vec<Op>,
}

fn ops(list: &[PbMutation], path: &str) -> Result<Vec<Op>> {
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let p = format!("{path}[{i}]");
            let PbMutation { action } = m;
            Ok(match action {
                Some(PbAction::Remove(name)) => {
                    Op::Remove(header_name(name, &format!("{p}.remove"))?)
                }
                Some(PbAction::Append(o)) => {
                    Op::Append(HeaderAdd::from_proto(o, &format!("{p}.append"))?)
                }
                Some(PbAction::RemoveOnMatch(RemoveOnMatch { key_matcher })) => match key_matcher {
                    Some(km) => Op::RemoveOnMatch(StringMatch::from_proto(
                        km,
                        &format!("{p}.remove_on_match.key_matcher"),
                    )?),
                    None => return Err(invalid(&p, "remove_on_match.key_matcher", "required")),
                },
                None => {
                    return Err(invalid(
                        &p,
                        "action",
                        "one of remove, append, remove_on_match is required",
                    ))
                }
            })
        })
        .collect()
}

impl MutationSet {
    fn from_proto(m: &Mutations, path: &str) -> Result<Self> {
        let Mutations {
            request_mutations,
            query_parameter_mutations,
            response_mutations,
            response_trailers_mutations,
            request_trailers_mutations,
        } = m;
        reject_set(
            !query_parameter_mutations.is_empty(),
            path,
            "query_parameter_mutations",
        )?;
        reject_set(
            !response_trailers_mutations.is_empty(),
            path,
            "response_trailers_mutations",
        )?;
        reject_set(
            !request_trailers_mutations.is_empty(),
            path,
            "request_trailers_mutations",
        )?;
        Ok(MutationSet {
            request: ops(request_mutations, &format!("{path}.request_mutations"))?,
            response: ops(response_mutations, &format!("{path}.response_mutations"))?,
        })
    }
}

/// The built filter.
#[derive(Debug)]
pub struct HeaderMutationFilter {
    mutations: MutationSet,
    most_specific_wins: bool,
}

impl HeaderMutationFilter {
    /// Envoy's order (header_mutation.cc): the filter's own mutations first, then the per-route
    /// mutations of every level that has them. By default the most specific level (route, then
    /// virtual host, then route configuration) is applied first, so the least specific one has
    /// the last word; `most_specific_header_mutations_wins` reverses the levels.
    fn run(&self, ctx: &FilterContext, headers: &mut HeaderMap, pick: fn(&MutationSet) -> &[Op]) {
        for op in pick(&self.mutations) {
            op.apply(headers);
        }
        let levels = ctx.route_configs::<MutationSet>();
        if self.most_specific_wins {
            for set in levels {
                pick(set).iter().for_each(|op| op.apply(headers));
            }
        } else {
            for set in levels.rev() {
                pick(set).iter().for_each(|op| op.apply(headers));
            }
        }
    }
}

impl HttpFilter for HeaderMutationFilter {
    fn hooks(&self) -> Hooks {
        Hooks::REQUEST_HEADERS | Hooks::RESPONSE_HEADERS
    }

    fn on_request_headers(
        &self,
        ctx: &mut FilterContext,
        req: &mut http::request::Parts,
    ) -> Action {
        self.run(ctx, &mut req.headers, |m| &m.request);
        Action::Continue
    }

    fn on_response_headers(
        &self,
        ctx: &mut FilterContext,
        resp: &mut http::response::Parts,
    ) -> Action {
        self.run(ctx, &mut resp.headers, |m| &m.response);
        Action::Continue
    }
}

pub struct Factory;

impl FilterFactory for Factory {
    fn type_url(&self) -> &'static str {
        TYPE_URL
    }

    fn per_route_type_urls(&self) -> &'static [&'static str] {
        &[PER_ROUTE_TYPE_URL]
    }

    fn build(
        &self,
        value: &[u8],
        path: &str,
        _cx: &BuildContext<'_>,
    ) -> std::result::Result<Arc<dyn HttpFilter>, FilterConfigError> {
        let HeaderMutation {
            mutations,
            most_specific_header_mutations_wins,
        } = decode(value, path)?;
        let mutations = match mutations {
            Some(m) => MutationSet::from_proto(&m, &format!("{path}.mutations"))?,
            None => MutationSet::default(),
        };
        Ok(Arc::new(HeaderMutationFilter {
            mutations,
            most_specific_wins: most_specific_header_mutations_wins,
        }))
    }

    fn build_per_route(
        &self,
        _type_url: &str,
        value: &[u8],
        path: &str,
        _cx: &BuildContext<'_>,
    ) -> std::result::Result<PerRoute, FilterConfigError> {
        let HeaderMutationPerRoute { mutations } = decode(value, path)?;
        let set = match mutations {
            Some(m) => MutationSet::from_proto(&m, &format!("{path}.mutations"))?,
            None => MutationSet::default(),
        };
        Ok(per_route(set))
    }
}

//! The worked example from filters/README.md: a filter that stamps every response with the
//! config version it was built from, registered under its own type URL and driven through a
//! chain exactly as the data path does.

use std::sync::Arc;

use envoy_types::pb::google::protobuf::StringValue;
use http::HeaderValue;
use prost::Message;
use strait_filters::{
    Action, BuildContext, ChainEntry, FilterChain, FilterConfigError, FilterContext, FilterFactory,
    Hooks, HttpFilter, MemoryStats, NoClusters, Registry,
};

// --- the filter ---

/// Adds `x-chain-version: <version>` to every response.
struct VersionMarker {
    version: HeaderValue,
}

impl HttpFilter for VersionMarker {
    fn hooks(&self) -> Hooks {
        Hooks::RESPONSE_HEADERS
    }

    fn on_response_headers(
        &self,
        _ctx: &mut FilterContext,
        resp: &mut http::response::Parts,
    ) -> Action {
        resp.headers.insert("x-chain-version", self.version.clone());
        Action::Continue
    }
}

struct VersionMarkerFactory;

const MARKER_TYPE_URL: &str = "type.googleapis.com/google.protobuf.StringValue";

impl FilterFactory for VersionMarkerFactory {
    fn type_url(&self) -> &'static str {
        MARKER_TYPE_URL
    }

    fn build(
        &self,
        value: &[u8],
        path: &str,
        _cx: &BuildContext<'_>,
    ) -> Result<Arc<dyn HttpFilter>, FilterConfigError> {
        let StringValue { value } =
            StringValue::decode(value).map_err(|e| FilterConfigError::new(path, e.to_string()))?;
        let version = HeaderValue::from_str(&value).map_err(|_| {
            FilterConfigError::new(format!("{path}.value"), "not a valid header value")
        })?;
        Ok(Arc::new(VersionMarker { version }))
    }
}

// --- its test ---

fn chain_for(registry: &Registry, version: &str) -> Result<FilterChain, FilterConfigError> {
    let stats = MemoryStats::default();
    let cx = BuildContext {
        stat_prefix: "ingress",
        stats: &stats,
        clusters: &NoClusters,
    };
    let any = StringValue {
        value: version.into(),
    }
    .encode_to_vec();
    let filter = registry.build(
        "marker",
        MARKER_TYPE_URL,
        &any,
        "http_filters[0].typed_config",
        &cx,
    )?;
    Ok(FilterChain::new(vec![ChainEntry {
        name: "marker".into(),
        filter,
        disabled_by_default: false,
    }]))
}

#[tokio::test]
async fn responses_carry_the_version_of_their_chain() {
    let mut registry = Registry::builtin();
    registry.register(Arc::new(VersionMarkerFactory));

    let v1 = chain_for(&registry, "v1").unwrap();
    let v2 = chain_for(&registry, "v2").unwrap();
    for (chain, want) in [(&v1, "v1"), (&v2, "v2")] {
        let mut ctx = FilterContext::new(
            "127.0.0.1:1000".parse().unwrap(),
            "127.0.0.1:80".parse().unwrap(),
        );
        let (mut req, ()) = http::Request::new(()).into_parts();
        chain.run_request_headers(&mut ctx, &mut req).await.unwrap();
        let (mut resp, ()) = http::Response::new(()).into_parts();
        chain
            .run_response_headers(&mut ctx, &mut resp)
            .await
            .unwrap();
        assert_eq!(resp.headers["x-chain-version"], want);
    }

    let err = chain_for(&registry, "bad\nvalue").err().unwrap();
    assert_eq!(err.path, "http_filters[0].typed_config.value");
}

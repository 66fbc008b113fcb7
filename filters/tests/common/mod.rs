//! Helpers shared by the filter tests: build filters through the registry from encoded Envoy
//! protos (the same path the config plane uses) and drive them through a real `FilterChain`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use prost::Message;
use strait_filters::{
    BuildContext, ChainEntry, ClusterConnector, FilterChain, FilterConfigError, FilterContext,
    HttpFilter, LocalReply, MemoryStats, NoClusters, PerFilterConfigs, PerRoute, Registry,
};

pub const PATH: &str = "http_filters[0].typed_config";

pub struct Env {
    pub registry: Registry,
    pub stats: Arc<MemoryStats>,
    pub clusters: Arc<dyn ClusterConnector>,
}

impl Env {
    pub fn new() -> Self {
        Env {
            registry: Registry::builtin(),
            stats: Arc::new(MemoryStats::default()),
            clusters: Arc::new(NoClusters),
        }
    }

    pub fn with_clusters(clusters: Arc<dyn ClusterConnector>) -> Self {
        Env {
            clusters,
            ..Env::new()
        }
    }

    pub fn cx(&self) -> BuildContext<'_> {
        BuildContext {
            stat_prefix: "ingress",
            stats: self.stats.as_ref(),
            clusters: self.clusters.as_ref(),
        }
    }

    pub fn try_build<M: Message>(
        &self,
        type_url: &str,
        msg: &M,
    ) -> Result<Arc<dyn HttpFilter>, FilterConfigError> {
        self.registry
            .build("test", type_url, &msg.encode_to_vec(), PATH, &self.cx())
    }

    pub fn build<M: Message>(&self, type_url: &str, msg: &M) -> Arc<dyn HttpFilter> {
        match self.try_build(type_url, msg) {
            Ok(f) => f,
            Err(e) => panic!("config rejected: {e}"),
        }
    }

    pub fn chain<M: Message>(&self, name: &str, type_url: &str, msg: &M) -> FilterChain {
        FilterChain::new(vec![entry(name, self.build(type_url, msg))])
    }

    pub fn per_route<M: Message>(&self, type_url: &str, msg: &M) -> PerRoute {
        match self.registry.build_per_route(
            type_url,
            &msg.encode_to_vec(),
            "typed_per_filter_config",
            &self.cx(),
        ) {
            Ok(Some(p)) => p,
            Ok(None) => panic!("per-route config ignored"),
            Err(e) => panic!("per-route config rejected: {e}"),
        }
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.stats.counter_value(name)
    }
}

pub fn entry(name: &str, filter: Arc<dyn HttpFilter>) -> ChainEntry {
    ChainEntry {
        name: name.into(),
        filter,
        disabled_by_default: false,
    }
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub fn ctx() -> FilterContext {
    FilterContext::new(addr("10.0.0.1:40000"), addr("127.0.0.1:8080"))
}

/// A context whose matched route carries `per_route` for filter `name`.
pub fn ctx_with_route(name: &str, per_route: PerRoute) -> FilterContext {
    let mut c = ctx();
    let level = [(name.to_string(), per_route)];
    c.set_route(
        "r1",
        Some(Arc::new(PerFilterConfigs::resolve([&level[..]]))),
    );
    c
}

pub fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

pub fn resp(status: u16) -> http::response::Parts {
    http::Response::builder()
        .status(status)
        .body(())
        .unwrap()
        .into_parts()
        .0
}

/// Runs the request-header hooks; `Err` is the local reply.
pub async fn run(
    chain: &FilterChain,
    ctx: &mut FilterContext,
    r: &mut http::request::Parts,
) -> Result<(), LocalReply> {
    chain.run_request_headers(ctx, r).await
}

pub fn header<'a>(h: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

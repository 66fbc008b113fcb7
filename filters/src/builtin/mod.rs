//! Envoy's HTTP filters that Strait implements, each configured with Envoy's own proto.

use std::sync::Arc;

use crate::registry::Registry;

pub mod buffer;
pub mod cors;
pub mod ext_authz;
pub mod fault;
pub mod header_mutation;
pub mod local_ratelimit;
pub mod rbac;

pub(crate) fn register_all(r: &mut Registry) {
    r.register(Arc::new(buffer::Factory));
    r.register(Arc::new(cors::Factory));
    r.register(Arc::new(ext_authz::Factory));
    r.register(Arc::new(fault::Factory));
    r.register(Arc::new(header_mutation::Factory));
    r.register(Arc::new(local_ratelimit::Factory));
    r.register(Arc::new(rbac::Factory));
}

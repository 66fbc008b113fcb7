//! Strait's configuration plane: decodes Envoy v3 bootstrap files (and later xDS resources) into
//! Envoy's protobuf types, and translates them strictly into Strait's immutable [`model`].
//! Nothing outside this crate sees a protobuf.
#![forbid(unsafe_code)]

pub mod ads;
pub mod bootstrap;
pub mod control_plane;
pub(crate) mod decode;
pub mod dynamic;
pub mod error;
pub mod filter_env;
pub mod model;
pub mod store;
pub(crate) mod translate;

pub use bootstrap::{load, Overrides, Source};
pub use decode::Descriptors;
pub use error::{ConfigError, ConfigErrors};

#[cfg(test)]
mod tests;

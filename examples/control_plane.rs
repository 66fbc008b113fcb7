//! Strait's reference ADS control plane as a process: serves the resources in a directory of
//! YAML/JSON files over SotW and Delta ADS, and pushes a new version when the files change.
//!
//! `cargo run --example control_plane -- --dir DIR --listen 127.0.0.1:18000`
//!
//! Each file holds one resource, a list, or a DiscoveryResponse-shaped `{version_info,
//! resources: [...]}`; every resource names its type with `@type`. Log level: `RUST_LOG`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use strait_xds::control_plane::ControlPlane;

fn usage() -> ExitCode {
    eprintln!("usage: control_plane --dir DIR [--listen ADDR (default 127.0.0.1:18000)]");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut dir: Option<PathBuf> = None;
    let mut listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 18000));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--dir", Some(v)) => dir = Some(v.into()),
            ("--listen", Some(v)) => match v.parse() {
                Ok(a) => listen = a,
                Err(e) => {
                    eprintln!("--listen {v}: {e}");
                    return usage();
                }
            },
            _ => return usage(),
        }
    }
    let Some(dir) = dir else {
        return usage();
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bound = listener.local_addr().unwrap_or(listen);
    tracing::info!(listen = %bound, dir = %dir.display(), "control plane serving");
    match ControlPlane::serve(listener, dir).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("control plane: {e}");
            ExitCode::FAILURE
        }
    }
}

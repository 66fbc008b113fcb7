//! The `strait` binary: parses Envoy's command line, loads the bootstrap, runs the proxy until
//! SIGTERM / SIGINT (or `POST /quitquitquit`), then drains and exits. Wiring only: the work is
//! in the `strait-xds` and `strait-proxy` crates.
// The only unsafe code is in `memory` (FFI to the allocator, the loader's object walk and
// madvise) and `alloc` (the global allocator's calls into mimalloc).
#![deny(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use strait_proxy::admin::AdminSource;
use strait_proxy::grpc_clusters::ProxyClusters;
use strait_proxy::server::{Options, Server, Workers};
use strait_proxy::stats::NamedStats;
use strait_xds::bootstrap::{self, Overrides, Source};
use strait_xds::dynamic::{Dynamic, Loaded};
use strait_xds::filter_env;
use tracing_subscriber::filter::LevelFilter;

mod alloc;
mod cli;
mod memory;
use cli::{Cli, LogLevel, Mode, WorkerModel};

/// mimalloc instead of the system allocator: see BENCHMARKS.md, "Allocator".
#[global_allocator]
static GLOBAL: alloc::Mi = alloc::Mi;

impl LogLevel {
    /// A plain level filter: Envoy's `-l` is one level for every logger. (tracing's
    /// `EnvFilter` would compile its directive-parsing regexes at start-up and keep them: half
    /// a megabyte of code and heap for no use here.)
    fn filter(self) -> LevelFilter {
        match self {
            LogLevel::Trace => LevelFilter::TRACE,
            LogLevel::Debug => LevelFilter::DEBUG,
            LogLevel::Info => LevelFilter::INFO,
            LogLevel::Warning => LevelFilter::WARN,
            // tracing has no level above error.
            LogLevel::Error | LogLevel::Critical => LevelFilter::ERROR,
            LogLevel::Off => LevelFilter::OFF,
        }
    }

    fn envoy_name(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warning => "warning",
            LogLevel::Error => "error",
            LogLevel::Critical => "critical",
            LogLevel::Off => "off",
        }
    }
}

fn main() -> ExitCode {
    memory::note_initial_objects();
    let cli = match cli::parse(std::env::args_os().skip(1)) {
        Ok(cli::Parsed::Run(cli)) => cli,
        Ok(cli::Parsed::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!(
                "error: {e}\n\n{}\n\nFor more information, try '--help'.",
                cli::USAGE
            );
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_max_level(cli.log_level.filter())
        .init();

    let source = match (&cli.config_path, &cli.config_yaml) {
        (Some(p), _) => Source::Path(p.clone()),
        (None, Some(y)) => Source::Yaml(y.clone()),
        (None, None) => {
            eprintln!("At least one of --config-path or --config-yaml should be non-empty");
            return ExitCode::FAILURE;
        }
    };
    let overrides = Overrides {
        service_node: cli.service_node.clone(),
        service_cluster: cli.service_cluster.clone(),
        service_zone: cli.service_zone.clone(),
        // With only --config-yaml the YAML is the source itself.
        config_yaml: cli.config_path.as_ref().and(cli.config_yaml.clone()),
    };
    let concurrency = cli
        .concurrency
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let workers = match cli.worker_model {
        WorkerModel::WorkStealing => None,
        // Not started for --mode validate: it serves nothing.
        WorkerModel::PerCore if cli.mode == Mode::Validate => None,
        // Workers live as long as the process: they may keep freed blocks for reuse.
        WorkerModel::PerCore => {
            match Workers::start(concurrency, alloc::keep_freed_blocks_on_this_thread) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::error!("cannot start the workers: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let built = match cli.worker_model {
        WorkerModel::WorkStealing => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(concurrency)
            .thread_name("strait-worker")
            .enable_all()
            .build(),
        // The main thread only runs admin, xDS, DNS and health checks: the workers serve.
        WorkerModel::PerCore => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    let runtime = match built {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Filters are built while the config is translated: gRPC channels (ext_authz) need the
    // runtime, and a serving proxy's filters count into its stats and reach its clusters.
    let _entered = runtime.enter();
    let clusters = ProxyClusters::new();
    if cli.mode == Mode::Serve {
        filter_env::install(filter_env::FilterEnv::builtin(
            NamedStats::process(),
            Arc::new(clusters.clone()),
        ));
    }
    let config = match bootstrap::load_full(&source, &overrides) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            return ExitCode::FAILURE;
        }
    };
    if cli.mode == Mode::Validate {
        let shown = match &cli.config_path {
            Some(p) => p.display().to_string(),
            None => String::new(),
        };
        println!("configuration '{shown}' OK");
        return ExitCode::SUCCESS;
    }
    if cli.base_id.is_some() {
        tracing::info!("--base-id is accepted but ignored: hot restart is not implemented");
    }

    let opts = Options {
        concurrency,
        drain_time: Duration::from_secs(cli.drain_time_s),
        command_line_options: command_line_options(&cli, concurrency),
    };
    let code = runtime.block_on(serve(
        config,
        opts,
        cli.admin_address_path,
        clusters,
        cli.xds_state_dir,
        workers.clone(),
    ));
    // The drain is over: stop the per-core workers (their tasks hold the server, so dropping
    // our reference alone would not).
    if let Some(w) = &workers {
        w.stop();
    }
    code
}

/// `/server_info`'s `command_line_options`, in `envoy.admin.v3.CommandLineOptions` JSON.
fn command_line_options(cli: &Cli, concurrency: usize) -> serde_json::Value {
    serde_json::json!({
        "base_id": cli.base_id.unwrap_or(0).to_string(),
        "concurrency": concurrency,
        "config_path": cli.config_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        "config_yaml": cli.config_yaml.clone().unwrap_or_default(),
        "log_level": cli.log_level.envoy_name(),
        "service_cluster": cli.service_cluster.clone().unwrap_or_default(),
        "service_node": cli.service_node.clone().unwrap_or_default(),
        "service_zone": cli.service_zone.clone().unwrap_or_default(),
        "drain_time": format!("{}s", cli.drain_time_s),
        "mode": match cli.mode { Mode::Serve => "Serve", Mode::Validate => "Validate" },
        "disable_hot_restart": cli.disable_hot_restart,
    })
}

async fn serve(
    loaded: Loaded,
    opts: Options,
    admin_address_path: Option<PathBuf>,
    clusters: ProxyClusters,
    xds_state_dir: Option<PathBuf>,
    workers: Option<Arc<Workers>>,
) -> ExitCode {
    // xDS (ADS, files, or static resources using RDS/EDS): the server starts INITIALIZING
    // with the static clusters and gets its listeners from the dynamic configuration.
    let dynamic = if loaded.needs_dynamic() {
        match Dynamic::new(loaded, xds_state_dir, NamedStats::process()) {
            Ok(d) => Ok(d),
            Err(e) => {
                tracing::error!("cannot start: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        if xds_state_dir.is_some() {
            tracing::warn!("--xds-state-dir is ignored: the bootstrap uses no xDS");
        }
        Err(loaded.model)
    };
    let started = match &dynamic {
        Ok(d) => Server::start_initializing_on(d.initial(), opts, workers.clone()).await,
        Err(config) => Server::start_initializing_on(config.clone(), opts, workers.clone())
            .await
            .inspect(|s| s.shared().set_live()),
    };
    let server = match started {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    clusters.attach(server.shared());
    let _xds = match dynamic {
        Ok(d) => Some(strait_proxy::xds::start(server.shared(), d).await),
        Err(_) => None,
    };
    if let (Some(path), Some(addr)) = (&admin_address_path, server.admin_address()) {
        if let Err(e) = std::fs::write(path, addr.to_string()) {
            tracing::error!("cannot write --admin-address-path {}: {e}", path.display());
            server.shutdown();
            server.wait().await;
            return ExitCode::FAILURE;
        }
    }
    if let Some(addr) = server.admin_address() {
        tracing::info!("admin listening on {addr}");
    }
    for (name, addr) in server.listener_addresses() {
        tracing::info!("listening on {name} {addr}");
    }
    memory::collect_heap();
    // POST /quitquitquit drains through the same shared state, so wait() covers it too.
    let shared = server.shared().clone();
    let signals = tokio::spawn(async move {
        termination_signal().await;
        shared.begin_shutdown();
    });
    // Last in start-up: once the signal handlers are installed and wait() has been polled.
    tokio::spawn(memory::release_when_serving(
        server.shared().clone(),
        workers,
    ));
    server.wait().await;
    signals.abort();
    tracing::info!("exiting");
    ExitCode::SUCCESS
}

/// Resolves on the first SIGTERM or SIGINT.
async fn termination_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT: draining"),
        _ = term => tracing::info!("SIGTERM: draining"),
    }
}

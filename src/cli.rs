//! Envoy's command line (the flags Strait implements, under Envoy's names) and Strait's own few.
//!
//! Parsed with `lexopt` rather than clap: the parser runs once at start-up, and whatever code
//! start-up runs stays resident for the process's life (clap's builder was 120 KiB of it).

use std::ffi::OsString;
use std::path::PathBuf;

use lexopt::prelude::*;

pub const USAGE: &str = "Usage: strait [OPTIONS]";

const HELP: &str = "\
A service-mesh proxy configured like Envoy

Usage: strait [OPTIONS]

Options:
  -c, --config-path <PATH>       Bootstrap file (YAML, or JSON by extension)
      --config-yaml <YAML>       Bootstrap YAML, merged over the file if both are given
      --mode <MODE>              serve (default) or validate
      --service-node <ID>        Overrides node.id
      --service-cluster <NAME>   Overrides node.cluster
      --service-zone <ZONE>      Overrides node.locality.zone
  -l, --log-level <LEVEL>        trace, debug, info (default), warning, error, critical, off
      --concurrency <N>          Worker threads; default: the number of hardware threads
      --worker-model <MODEL>     Strait-only: per-core (Envoy's model, the default): one
                                 single-threaded runtime per worker, each with its own
                                 SO_REUSEPORT listening sockets and upstream pools (admin, xDS
                                 and health checks run on the main thread); work-stealing: one
                                 multi-threaded runtime sharing one pool per host
      --drain-time-s <SECONDS>   How long a drain lets in-flight requests finish [default: 600]
      --base-id <ID>             Accepted for compatibility: Strait has no hot restart yet
      --disable-hot-restart      Accepted for compatibility: there is no hot restart to disable
      --admin-address-path <PATH>
                                 Writes the admin server's bound ip:port here once it listens
      --xds-state-dir <DIR>      Strait-only: keeps every accepted xDS resource set here (the
                                 last-known-good store) and serves from it when no control
                                 plane answers at start. Off unless given
  -h, --help                     Print help
  -V, --version                  Print version
";

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cli {
    pub config_path: Option<PathBuf>,
    pub config_yaml: Option<String>,
    pub mode: Mode,
    pub service_node: Option<String>,
    pub service_cluster: Option<String>,
    pub service_zone: Option<String>,
    pub log_level: LogLevel,
    pub concurrency: Option<usize>,
    pub worker_model: WorkerModel,
    pub drain_time_s: u64,
    pub base_id: Option<u64>,
    pub disable_hot_restart: bool,
    pub admin_address_path: Option<PathBuf>,
    pub xds_state_dir: Option<PathBuf>,
}

impl Default for Cli {
    fn default() -> Self {
        Cli {
            config_path: None,
            config_yaml: None,
            mode: Mode::Serve,
            service_node: None,
            service_cluster: None,
            service_zone: None,
            log_level: LogLevel::Info,
            concurrency: None,
            worker_model: WorkerModel::PerCore,
            drain_time_s: 600,
            base_id: None,
            disable_hot_restart: false,
            admin_address_path: None,
            xds_state_dir: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Validate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerModel {
    WorkStealing,
    PerCore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warning,
    Error,
    Critical,
    Off,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Run(Cli),
    /// `--help` or `--version`: print this and exit.
    Print(String),
}

/// Parses the arguments after the program name. An error reads like clap's (`invalid value
/// 'x' for '--mode <MODE>'`); the caller prints it with [`USAGE`] and exits with status 2.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Parsed, String> {
    let mut p = lexopt::Parser::from_args(args);
    let mut cli = Cli::default();
    let mut seen: Vec<&'static str> = Vec::new();
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        let flag: &'static str = match arg {
            Short('c') | Long("config-path") => "--config-path <PATH>",
            Long("config-yaml") => "--config-yaml <YAML>",
            Long("mode") => "--mode <MODE>",
            Long("service-node") => "--service-node <ID>",
            Long("service-cluster") => "--service-cluster <NAME>",
            Long("service-zone") => "--service-zone <ZONE>",
            Short('l') | Long("log-level") => "--log-level <LEVEL>",
            Long("concurrency") => "--concurrency <N>",
            Long("worker-model") => "--worker-model <MODEL>",
            Long("drain-time-s") => "--drain-time-s <SECONDS>",
            Long("base-id") => "--base-id <ID>",
            Long("disable-hot-restart") => "--disable-hot-restart",
            Long("admin-address-path") => "--admin-address-path <PATH>",
            Long("xds-state-dir") => "--xds-state-dir <DIR>",
            Short('h') | Long("help") => return Ok(Parsed::Print(HELP.to_string())),
            Short('V') | Long("version") => {
                return Ok(Parsed::Print(format!(
                    "strait {}\n",
                    env!("CARGO_PKG_VERSION")
                )))
            }
            Value(v) => {
                return Err(format!(
                    "unexpected argument '{}' found",
                    v.to_string_lossy()
                ))
            }
            other => return Err(other.unexpected().to_string()),
        };
        if seen.contains(&flag) {
            return Err(format!(
                "the argument '{flag}' cannot be used multiple times"
            ));
        }
        seen.push(flag);
        if flag == "--disable-hot-restart" {
            cli.disable_hot_restart = true;
            continue;
        }
        let value = p
            .value()
            .map_err(|_| format!("a value is required for '{flag}' but none was supplied"))?;
        let text = value.to_string_lossy().into_owned();
        let invalid = || format!("invalid value '{text}' for '{flag}'");
        match flag {
            "--config-path <PATH>" => cli.config_path = Some(PathBuf::from(value)),
            "--admin-address-path <PATH>" => cli.admin_address_path = Some(PathBuf::from(value)),
            "--xds-state-dir <DIR>" => cli.xds_state_dir = Some(PathBuf::from(value)),
            "--config-yaml <YAML>" => cli.config_yaml = Some(utf8(value, flag)?),
            "--service-node <ID>" => cli.service_node = Some(utf8(value, flag)?),
            "--service-cluster <NAME>" => cli.service_cluster = Some(utf8(value, flag)?),
            "--service-zone <ZONE>" => cli.service_zone = Some(utf8(value, flag)?),
            "--mode <MODE>" => {
                cli.mode = match text.as_str() {
                    "serve" => Mode::Serve,
                    "validate" => Mode::Validate,
                    _ => return Err(invalid() + " [possible values: serve, validate]"),
                }
            }
            "--log-level <LEVEL>" => {
                cli.log_level = match text.as_str() {
                    "trace" => LogLevel::Trace,
                    "debug" => LogLevel::Debug,
                    "info" => LogLevel::Info,
                    "warning" | "warn" => LogLevel::Warning,
                    "error" => LogLevel::Error,
                    "critical" => LogLevel::Critical,
                    "off" => LogLevel::Off,
                    _ => return Err(invalid()
                        + " [possible values: trace, debug, info, warning, error, critical, off]"),
                }
            }
            "--worker-model <MODEL>" => {
                cli.worker_model = match text.as_str() {
                    "per-core" => WorkerModel::PerCore,
                    "work-stealing" => WorkerModel::WorkStealing,
                    _ => return Err(invalid() + " [possible values: work-stealing, per-core]"),
                }
            }
            "--concurrency <N>" => cli.concurrency = Some(text.parse().map_err(|_| invalid())?),
            "--drain-time-s <SECONDS>" => cli.drain_time_s = text.parse().map_err(|_| invalid())?,
            "--base-id <ID>" => cli.base_id = Some(text.parse().map_err(|_| invalid())?),
            _ => unreachable!("every flag above takes a value"),
        }
    }
    Ok(Parsed::Run(cli))
}

fn utf8(value: OsString, flag: &str) -> Result<String, String> {
    value
        .into_string()
        .map_err(|v| format!("invalid UTF-8 in '{}' for '{flag}'", v.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Cli, String> {
        match parse(args.iter().map(OsString::from))? {
            Parsed::Run(cli) => Ok(cli),
            Parsed::Print(t) => Err(format!("printed {t}")),
        }
    }

    #[test]
    fn envoy_command_lines_parse() {
        let cli = run(&[
            "-c",
            "/etc/envoy.yaml",
            "--config-yaml=admin: {}",
            "--mode",
            "validate",
            "-l",
            "warn",
            "--concurrency",
            "2",
            "--drain-time-s=5",
            "--service-node",
            "n",
            "--service-cluster",
            "c",
            "--service-zone",
            "z",
            "--base-id",
            "7",
            "--disable-hot-restart",
            "--admin-address-path",
            "/tmp/a",
            "--worker-model",
            "work-stealing",
            "--xds-state-dir",
            "/var/lib/strait",
        ])
        .unwrap();
        assert_eq!(
            cli,
            Cli {
                config_path: Some("/etc/envoy.yaml".into()),
                config_yaml: Some("admin: {}".into()),
                mode: Mode::Validate,
                service_node: Some("n".into()),
                service_cluster: Some("c".into()),
                service_zone: Some("z".into()),
                log_level: LogLevel::Warning,
                concurrency: Some(2),
                worker_model: WorkerModel::WorkStealing,
                drain_time_s: 5,
                base_id: Some(7),
                disable_hot_restart: true,
                admin_address_path: Some("/tmp/a".into()),
                xds_state_dir: Some("/var/lib/strait".into()),
            }
        );
        assert_eq!(run(&["--config-path", "x.json"]).unwrap().mode, Mode::Serve);
        assert_eq!(run(&[]).unwrap(), Cli::default());
    }

    #[test]
    fn bad_command_lines_are_errors() {
        for (args, error) in [
            (
                &["--mode", "init_only"][..],
                "invalid value 'init_only' for '--mode <MODE>'",
            ),
            (
                &["-l", "loud"],
                "invalid value 'loud' for '--log-level <LEVEL>'",
            ),
            (
                &["--concurrency", "-1"],
                "invalid value '-1' for '--concurrency <N>'",
            ),
            (&["--no-such-flag"], "--no-such-flag"),
            (&["stray"], "unexpected argument 'stray' found"),
            (&["-c"], "a value is required for '--config-path <PATH>'"),
            (&["-c", "a", "-c", "b"], "cannot be used multiple times"),
            (&["--disable-hot-restart=yes"], "--disable-hot-restart"),
        ] {
            let e = run(args).unwrap_err();
            assert!(e.contains(error), "{args:?}: {e}");
        }
    }

    #[test]
    fn help_and_version_print() {
        let Ok(Parsed::Print(help)) = parse([OsString::from("--help")]) else {
            panic!("--help");
        };
        assert!(help.contains("--config-path <PATH>"));
        let Ok(Parsed::Print(v)) = parse([OsString::from("-V")]) else {
            panic!("-V");
        };
        assert_eq!(v, format!("strait {}\n", env!("CARGO_PKG_VERSION")));
    }
}

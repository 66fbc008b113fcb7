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
        match arg {
            Short('c') | Long("config-path") => {
                cli.config_path = Some(take(&mut p, &mut seen, "--config-path <PATH>")?.raw.into())
            }
            Long("config-yaml") => {
                cli.config_yaml = Some(take(&mut p, &mut seen, "--config-yaml <YAML>")?.utf8()?)
            }
            Long("mode") => {
                cli.mode = take(&mut p, &mut seen, "--mode <MODE>")?
                    .choice(&[("serve", Mode::Serve), ("validate", Mode::Validate)], &[])?
            }
            Long("service-node") => {
                cli.service_node = Some(take(&mut p, &mut seen, "--service-node <ID>")?.utf8()?)
            }
            Long("service-cluster") => {
                cli.service_cluster =
                    Some(take(&mut p, &mut seen, "--service-cluster <NAME>")?.utf8()?)
            }
            Long("service-zone") => {
                cli.service_zone = Some(take(&mut p, &mut seen, "--service-zone <ZONE>")?.utf8()?)
            }
            Short('l') | Long("log-level") => {
                cli.log_level = take(&mut p, &mut seen, "--log-level <LEVEL>")?.choice(
                    &[
                        ("trace", LogLevel::Trace),
                        ("debug", LogLevel::Debug),
                        ("info", LogLevel::Info),
                        ("warning", LogLevel::Warning),
                        ("error", LogLevel::Error),
                        ("critical", LogLevel::Critical),
                        ("off", LogLevel::Off),
                    ],
                    &[("warn", LogLevel::Warning)],
                )?
            }
            Long("concurrency") => {
                cli.concurrency = Some(take(&mut p, &mut seen, "--concurrency <N>")?.number()?)
            }
            Long("worker-model") => {
                cli.worker_model = take(&mut p, &mut seen, "--worker-model <MODEL>")?.choice(
                    &[
                        ("work-stealing", WorkerModel::WorkStealing),
                        ("per-core", WorkerModel::PerCore),
                    ],
                    &[],
                )?
            }
            Long("drain-time-s") => {
                cli.drain_time_s = take(&mut p, &mut seen, "--drain-time-s <SECONDS>")?.number()?
            }
            Long("base-id") => {
                cli.base_id = Some(take(&mut p, &mut seen, "--base-id <ID>")?.number()?)
            }
            Long("admin-address-path") => {
                cli.admin_address_path = Some(
                    take(&mut p, &mut seen, "--admin-address-path <PATH>")?
                        .raw
                        .into(),
                )
            }
            Long("xds-state-dir") => {
                cli.xds_state_dir =
                    Some(take(&mut p, &mut seen, "--xds-state-dir <DIR>")?.raw.into())
            }
            Long("disable-hot-restart") => {
                once(&mut seen, "--disable-hot-restart")?;
                cli.disable_hot_restart = true;
            }
            Short('h') | Long("help") => return Ok(Parsed::Print(HELP.to_string())),
            Short('V') | Long("version") => {
                return Ok(Parsed::Print(format!(
                    "strait {}\n",
                    env!("CARGO_PKG_VERSION")
                )))
            }
            lexopt::Arg::Value(v) => {
                return Err(format!(
                    "unexpected argument '{}' found",
                    v.to_string_lossy()
                ))
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    Ok(Parsed::Run(cli))
}

/// A repeated flag is an error, as with clap.
fn once(seen: &mut Vec<&'static str>, flag: &'static str) -> Result<(), String> {
    if seen.contains(&flag) {
        return Err(format!(
            "the argument '{flag}' cannot be used multiple times"
        ));
    }
    seen.push(flag);
    Ok(())
}

/// The value of `flag`, given once.
fn take(
    p: &mut lexopt::Parser,
    seen: &mut Vec<&'static str>,
    flag: &'static str,
) -> Result<Value, String> {
    once(seen, flag)?;
    let raw = p
        .value()
        .map_err(|_| format!("a value is required for '{flag}' but none was supplied"))?;
    Ok(Value { flag, raw })
}

/// A flag's value, with the flag for its error messages.
struct Value {
    flag: &'static str,
    raw: OsString,
}

impl Value {
    fn invalid(&self) -> String {
        format!(
            "invalid value '{}' for '{}'",
            self.raw.to_string_lossy(),
            self.flag
        )
    }

    fn utf8(self) -> Result<String, String> {
        let flag = self.flag;
        self.raw
            .into_string()
            .map_err(|v| format!("invalid UTF-8 in '{}' for '{flag}'", v.to_string_lossy()))
    }

    fn number<T: std::str::FromStr>(self) -> Result<T, String> {
        self.raw
            .to_str()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| self.invalid())
    }

    /// One of `choices` or `aliases` by name; the error lists the choices.
    fn choice<T: Copy>(self, choices: &[(&str, T)], aliases: &[(&str, T)]) -> Result<T, String> {
        let text = self.raw.to_string_lossy();
        if let Some((_, v)) = choices
            .iter()
            .chain(aliases)
            .find(|(name, _)| *name == text)
        {
            return Ok(*v);
        }
        let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
        Err(format!(
            "{} [possible values: {}]",
            self.invalid(),
            names.join(", ")
        ))
    }
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

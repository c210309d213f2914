//! zerocopy-server: command line → master.

use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

mod health;
mod master;
mod shared;
mod worker;

use anyhow::{bail, Context, Result};
use master::ConfigSource;
use std::path::{Path, PathBuf};

const DEFAULT_CONFIG: &str = "./config.toml";

const HELP: &str = "\
zerocopy-server — HTTP/1.1 reverse proxy and static file server

Usage: zerocopy-server [-c FILE] [-t | -T | -s SIGNAL]

Options:
  -c FILE     configuration file (default ./config.toml; without it and without
              ./config.toml, a built-in default serves http://127.0.0.1:8080/)
  -t          check the configuration: print every error, exit 0 (valid) or 1
  -T          check the configuration and print it with every default filled in
  -s SIGNAL   send SIGNAL to the running master (pid from server.pid_file):
              reload (HUP), reopen (USR1), quit (QUIT, graceful),
              stop (TERM queued with a fast-stop value: workers exit at once)
  -V, --version   print the version
  -h, --help      print this help
";

enum Action {
    Run,
    Test { print: bool },
    Signal(String),
}

struct Cli {
    config: Option<PathBuf>,
    action: Action,
}

fn parse_args() -> Result<Cli> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let mut cli = Cli {
        config: None,
        action: Action::Run,
    };
    while let Some(arg) = parser.next()? {
        match arg {
            Short('c') => cli.config = Some(parser.value()?.into()),
            Short('t') => cli.action = Action::Test { print: false },
            Short('T') => cli.action = Action::Test { print: true },
            Short('s') => cli.action = Action::Signal(parser.value()?.string()?),
            Short('V') | Long("version") => {
                println!("zerocopy-server {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            Short('h') | Long("help") => {
                print!("{HELP}");
                std::process::exit(0);
            }
            _ => bail!("{}\n\n{HELP}", arg.unexpected()),
        }
    }
    Ok(cli)
}

fn config_source(cli: &Cli) -> ConfigSource {
    match &cli.config {
        Some(p) => ConfigSource::File(p.clone()),
        None if Path::new(DEFAULT_CONFIG).exists() => ConfigSource::File(DEFAULT_CONFIG.into()),
        None => ConfigSource::Builtin,
    }
}

fn main() {
    // The allocator asks for transparent huge pages for its arenas: a worker's heap would then
    // be touched in 2 MiB pieces, and thousands of idle connections of a few hundred bytes
    // each would cost megabytes. Small pages unless `huge_pages_enabled` asks otherwise
    // (inherited by every child).
    // SAFETY: prctl with integer arguments only; it changes this process's memory policy.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    let code = match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("zerocopy-server: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn real_main() -> Result<i32> {
    let cli = parse_args()?;
    let source = config_source(&cli);
    match &cli.action {
        Action::Run => {
            master::run(source, worker::run, health::run)?;
            Ok(0)
        }
        Action::Test { print } => Ok(test_config(&source, *print)),
        Action::Signal(name) => {
            send_signal(&source, name)?;
            Ok(0)
        }
    }
}

/// `-t` / `-T`.
fn test_config(source: &ConfigSource, print: bool) -> i32 {
    let (name, result) = match source {
        ConfigSource::File(p) => (p.display().to_string(), shared::validate::load_file(p)),
        ConfigSource::Builtin => ("built-in default".to_string(), Ok(shared::builtin_config())),
    };
    match result {
        Ok(config) => {
            if print {
                match toml::to_string_pretty(&config) {
                    Ok(text) => println!("# {name}\n{text}"),
                    Err(e) => eprintln!("cannot print the configuration: {e}"),
                }
            }
            eprintln!("zerocopy-server: configuration {name} is valid");
            0
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            let n = errors.len();
            let plural = if n == 1 { "" } else { "s" };
            eprintln!("zerocopy-server: configuration {name} is invalid ({n} error{plural})");
            1
        }
    }
}

/// `-s reload|reopen|quit|stop`.
fn send_signal(source: &ConfigSource, name: &str) -> Result<()> {
    use nix::sys::signal::Signal;
    let sig = match name {
        "reload" => Signal::SIGHUP,
        "reopen" => Signal::SIGUSR1,
        "quit" => Signal::SIGQUIT,
        "stop" => Signal::SIGTERM,
        other => bail!("unknown signal `{other}` (reload, reopen, quit, stop)"),
    };
    // Only the pid file is needed: a reload is often sent right after editing, and a config
    // with errors must still reach the master, which logs them and keeps serving.
    let pid_file = match source {
        ConfigSource::File(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            let table: toml::Table =
                toml::from_str(&text).with_context(|| format!("cannot parse {}", p.display()))?;
            table
                .get("server")
                .and_then(|s| s.get("pid_file"))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        }
        ConfigSource::Builtin => None,
    };
    let Some(pid_file) = pid_file else {
        bail!("-s needs `server.pid_file` in the configuration to find the master");
    };
    let pid = master::read_pid_file(Path::new(&pid_file))?;
    let sent = if name == "stop" {
        master::queue_fast_stop(pid).map_err(anyhow::Error::from)
    } else {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).map_err(anyhow::Error::from)
    };
    sent.with_context(|| format!("cannot signal master {pid}"))?;
    Ok(())
}

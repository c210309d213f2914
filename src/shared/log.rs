//! Logging for both kinds of process, behind the `log` facade.
//!
//! The master forks again and again, so it must never own a thread: it writes each line
//! synchronously. A worker, once forked, switches the same global logger over to ftlog, whose
//! background thread is started in the worker itself. `log::set_logger` can be called only
//! once per process, so one dispatcher is installed at start and its sink is swapped.

use super::config::LoggingConfig;
use log::{LevelFilter, Log, Metadata, Record};
use std::fmt::Display;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn parse_level(s: &str) -> Option<LevelFilter> {
    Some(match s {
        "trace" => LevelFilter::Trace,
        "debug" => LevelFilter::Debug,
        "info" => LevelFilter::Info,
        "warn" => LevelFilter::Warn,
        "error" => LevelFilter::Error,
        "off" => LevelFilter::Off,
        _ => return None,
    })
}

enum Sink {
    /// Synchronous lines to stderr: before any configuration is read.
    Stderr,
    /// Synchronous lines to stderr or a file: the master, and a worker before its logger starts.
    Direct(Box<dyn Write + Send>),
    /// ftlog's channel and thread: a worker once it serves.
    Async(Box<dyn Log>),
}

struct Dispatcher {
    /// `master` or `worker N`: printed on every line so one log can hold every process.
    role: Mutex<String>,
    sink: Mutex<Sink>,
}

static LOGGER: Dispatcher = Dispatcher {
    role: Mutex::new(String::new()),
    sink: Mutex::new(Sink::Stderr),
};

struct Stderr;
impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl Log for Dispatcher {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *sink {
            Sink::Stderr => write_line(&mut Stderr, &self.role, record),
            Sink::Direct(w) => write_line(w, &self.role, record),
            Sink::Async(l) => l.log(record),
        }
    }

    fn flush(&self) {
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *sink {
            Sink::Stderr => {}
            Sink::Direct(w) => {
                let _ = w.flush();
            }
            Sink::Async(l) => l.flush(),
        }
    }
}

fn write_line(w: &mut dyn Write, role: &Mutex<String>, record: &Record) {
    let role = role.lock().unwrap_or_else(|p| p.into_inner());
    let line = format!(
        "{} {:<5} [{}] {}\n",
        timestamp(),
        record.level(),
        role,
        record.args()
    );
    // One write per line: lines of several processes sharing a file do not interleave.
    let _ = w.write_all(line.as_bytes());
}

/// Installs the dispatcher (first call) and points it at the configured file or stderr,
/// writing synchronously. Called by the master at start and on every reload.
pub fn init_direct(cfg: &LoggingConfig, role: &str) -> std::io::Result<()> {
    init_direct_owned(cfg, role, None)
}

/// As `init_direct`; the file, once open, is handed to `owner` (uid, gid) through its
/// descriptor: a path could have been swapped for a link between open and chown.
pub fn init_direct_owned(
    cfg: &LoggingConfig,
    role: &str,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    let _ = log::set_logger(&LOGGER);
    *LOGGER.role.lock().unwrap_or_else(|p| p.into_inner()) = role.to_string();
    let writer: Box<dyn Write + Send> = match &cfg.file_path {
        Some(path) => {
            let file = open_log_file(path)?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot hand {path} to uid {uid}: {e}"))
                })?;
            }
            Box::new(file)
        }
        None => Box::new(Stderr),
    };
    *LOGGER.sink.lock().unwrap_or_else(|p| p.into_inner()) = Sink::Direct(writer);
    log::set_max_level(parse_level(&cfg.level).unwrap_or(LevelFilter::Info));
    Ok(())
}

/// Renames the process in log lines (a worker right after fork).
pub fn set_role(role: &str) {
    *LOGGER.role.lock().unwrap_or_else(|p| p.into_inner()) = role.to_string();
}

pub fn open_log_file(path: &str) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Where a worker's async logger writes: opened before privileges are dropped, so a log
/// file that only root may open still works. A file output can be reopened (`reopen`).
pub fn open_output(cfg: &LoggingConfig) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(match &cfg.file_path {
        Some(path) => {
            let file = Arc::new(Mutex::new(open_log_file(path)?));
            *WORKER_FILE.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((path.clone(), file.clone()));
            Box::new(SharedFile(file))
        }
        None => Box::new(Stderr),
    })
}

/// The log file of this worker, shared with its logger thread so that USR1 can swap it.
static WORKER_FILE: Mutex<Option<(String, Arc<Mutex<File>>)>> = Mutex::new(None);

struct SharedFile(Arc<Mutex<File>>);

impl Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

/// USR1 in a worker (logrotate): opens the log file's path again. The master has already
/// reopened it and handed it to the workers' user.
pub fn reopen() -> std::io::Result<()> {
    let guard = WORKER_FILE.lock().unwrap_or_else(|p| p.into_inner());
    let Some((path, file)) = guard.as_ref() else {
        return Ok(());
    };
    log::logger().flush();
    let fresh = open_log_file(path)?;
    *file.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
    Ok(())
}

/// Switches this process to ftlog: a background thread, a bounded channel of
/// `channel_size` lines, flushed every `flush_interval_ms`. Call after fork, in the worker.
pub fn start_async(cfg: &LoggingConfig, output: Box<dyn Write + Send>) -> Result<(), String> {
    let role = LOGGER
        .role
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let level = parse_level(&cfg.level).unwrap_or(LevelFilter::Info);
    let writer = IntervalFlush {
        inner: std::io::BufWriter::new(output),
        every: Duration::from_millis(cfg.flush_interval_ms),
        last: Instant::now(),
    };
    let logger = ftlog::Builder::new()
        .format(RoleFormat { role })
        .time_format(time_format())
        .utc()
        .bounded(cfg.channel_size, false)
        .max_log_level(level)
        .root(writer)
        .build()
        .map_err(|e| format!("cannot start the logger: {e}"))?;
    *LOGGER.sink.lock().unwrap_or_else(|p| p.into_inner()) = Sink::Async(Box::new(logger));
    log::set_max_level(level);
    Ok(())
}

fn time_format() -> time::format_description::OwnedFormatItem {
    time::format_description::parse_owned::<1>(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z",
    )
    .expect("static time format")
}

struct RoleFormat {
    role: String,
}

impl ftlog::FtLogFormat for RoleFormat {
    fn msg(&self, record: &Record) -> Box<dyn Send + Sync + Display> {
        Box::new(format!(
            "{:<5} [{}] {}",
            record.level(),
            self.role,
            record.args()
        ))
    }
}

/// Buffers lines and flushes at most every `every`, so a busy worker does one write per
/// interval rather than one per line.
struct IntervalFlush<W: Write> {
    inner: std::io::BufWriter<W>,
    every: Duration,
    last: Instant,
}

impl<W: Write> Write for IntervalFlush<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if self.last.elapsed() >= self.every {
            self.inner.flush()?;
            self.last = Instant::now();
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.last = Instant::now();
        self.inner.flush()
    }
}

/// `2026-01-02T03:04:05.678Z` (UTC).
fn timestamp() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc_3339_utc_with_milliseconds() {
        let t = super::timestamp();
        let parsed =
            time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|e| panic!("{t}: {e}"));
        assert_eq!(t.len(), "2026-01-02T03:04:05.678Z".len(), "{t}");
        assert!(t.ends_with('Z'));
        let age = time::OffsetDateTime::now_utc() - parsed;
        assert!(age.whole_seconds().abs() < 60, "{t}");
    }
}

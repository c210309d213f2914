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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
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
            let file = LogFile::open(path)?;
            hand_over(&file.file, path, owner)?;
            Box::new(file)
        }
        None => Box::new(Stderr),
    };
    // The access log is the workers': the master only creates it and hands it to their user,
    // who may not be allowed to create files where root keeps logs.
    if let Some(path) = &cfg.access_log {
        hand_over(&open_log_file(path)?, path, owner)?;
    }
    *LOGGER.sink.lock().unwrap_or_else(|p| p.into_inner()) = Sink::Direct(writer);
    log::set_max_level(parse_level(&cfg.level).unwrap_or(LevelFilter::Info));
    Ok(())
}

fn hand_over(file: &File, path: &str, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid)).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot hand {path} to uid {uid}: {e}"))
        })?;
    }
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
            let file = Arc::new(Mutex::new(LogFile::open(path)?));
            *WORKER_FILE.lock().unwrap_or_else(|p| p.into_inner()) = Some(file.clone());
            Box::new(SharedFile(file))
        }
        None => Box::new(Stderr),
    })
}

/// The log file of this worker, shared with its logger thread so that USR1 can swap it.
static WORKER_FILE: Mutex<Option<Arc<Mutex<LogFile>>>> = Mutex::new(None);

struct SharedFile(Arc<Mutex<LogFile>>);

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
    request_line_writer_reopen();
    let guard = WORKER_FILE.lock().unwrap_or_else(|p| p.into_inner());
    let Some(file) = guard.as_ref() else {
        return Ok(());
    };
    log::logger().flush();
    let result = file.lock().unwrap_or_else(|p| p.into_inner()).reopen();
    result
}

/// A log file that several processes append to: it is written whole lines at a time (a
/// partial line waits for its end), so lines of two processes never interleave and a
/// rotation (a rename, by logrotate or by the master for `max_log_size`) never splits one.
pub struct LogFile {
    path: String,
    file: File,
    /// The end of a line not written yet.
    pending: Vec<u8>,
}

impl LogFile {
    pub fn open(path: &str) -> std::io::Result<LogFile> {
        Ok(LogFile {
            path: path.to_string(),
            file: open_log_file(path)?,
            pending: Vec::new(),
        })
    }

    /// Opens the path again (the file was renamed: USR1).
    pub fn reopen(&mut self) -> std::io::Result<()> {
        self.file = open_log_file(&self.path)?;
        Ok(())
    }

    fn write_lines(&mut self, lines: &[u8]) -> std::io::Result<()> {
        // One write of whole lines, appended: it lands in one piece, whatever the other
        // writers of the file do.
        self.file.write_all(lines)
    }
}

/// `max_log_size` (0: never), checked by the master on its tick: each log file (error log,
/// access log) that reached it is renamed to `PATH.YYYYmmdd-HHMMSS.mmm`. Only the master
/// renames, so two workers never both rotate a file; the caller then reopens the logs as
/// for USR1. Until a writer has reopened, its lines still go to the renamed file, whole:
/// none is lost or split. Returns the renames done.
pub fn rotate_full(cfg: &LoggingConfig) -> Vec<(String, String)> {
    let mut done = Vec::new();
    if cfg.max_log_size == 0 {
        return done;
    }
    for path in [&cfg.file_path, &cfg.access_log].into_iter().flatten() {
        let full = std::fs::metadata(path).is_ok_and(|m| m.len() >= cfg.max_log_size);
        if !full {
            continue;
        }
        let to = rotated_name(path);
        match std::fs::rename(path, &to) {
            Ok(()) => done.push((path.clone(), to)),
            // Once: the master checks again every tick.
            Err(e) if !ROTATE_FAILED.swap(true, Ordering::Relaxed) => {
                log::error!("max_log_size: cannot rename {path} to {to}: {e}")
            }
            Err(_) => {}
        }
    }
    done
}

static ROTATE_FAILED: AtomicBool = AtomicBool::new(false);

fn rotated_name(path: &str) -> String {
    let t = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{path}.{:04}{:02}{:02}-{:02}{:02}{:02}.{:03}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    );
    let mut to = stamp.clone();
    let mut n = 1;
    while std::fs::symlink_metadata(&to).is_ok() {
        to = format!("{stamp}-{n}");
        n += 1;
    }
    to
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.pending.is_empty() {
            match buf.iter().rposition(|&b| b == b'\n') {
                Some(end) => {
                    self.pending.extend_from_slice(&buf[end + 1..]);
                    self.write_lines(&buf[..=end])?;
                }
                None => self.pending.extend_from_slice(buf),
            }
            return Ok(buf.len());
        }
        self.pending.extend_from_slice(buf);
        if let Some(end) = self.pending.iter().rposition(|&b| b == b'\n') {
            let rest = self.pending.split_off(end + 1);
            let lines = std::mem::replace(&mut self.pending, rest);
            self.write_lines(&lines)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum LineMsg {
    Line(Vec<u8>),
    /// Look at the reopen flag now.
    Wake,
    Stop,
}

/// A bounded channel of lines to a thread that appends them to a `LogFile`, in batches of
/// whole lines: what a worker's access log goes through. The worker never waits: a full
/// channel drops the line (`send` says so, for the caller to count).
#[derive(Clone)]
pub struct LineSender(SyncSender<LineMsg>);

impl LineSender {
    /// `false`: the line was dropped (the writer is behind, or gone).
    pub fn send(&self, line: Vec<u8>) -> bool {
        self.0.try_send(LineMsg::Line(line)).is_ok()
    }
}

static LINE_WRITER: Mutex<Option<(SyncSender<LineMsg>, JoinHandle<()>)>> = Mutex::new(None);
static LINE_REOPEN: AtomicBool = AtomicBool::new(false);
/// Lines kept before one write, at most: writes stay rare under load.
const BATCH: usize = 64 * 1024;

/// Starts the writer thread for `file` (call after fork: a thread does not survive one).
pub fn start_line_writer(
    file: LogFile,
    channel: usize,
    every: Duration,
) -> std::io::Result<LineSender> {
    let (tx, rx) = std::sync::mpsc::sync_channel(channel.max(1));
    let thread = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || write_lines(rx, file, every))?;
    *LINE_WRITER.lock().unwrap_or_else(|p| p.into_inner()) = Some((tx.clone(), thread));
    Ok(LineSender(tx))
}

fn request_line_writer_reopen() {
    LINE_REOPEN.store(true, Ordering::Release);
    if let Some((tx, _)) = LINE_WRITER
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        // A full channel means the thread is busy: it sees the flag after this batch.
        let _ = tx.try_send(LineMsg::Wake);
    }
}

/// Writes what the line writer holds and stops it: at exit, so no line is lost.
pub fn stop_line_writer() {
    let taken = LINE_WRITER.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((tx, thread)) = taken {
        if tx.send(LineMsg::Stop).is_ok() {
            let _ = thread.join();
        }
    }
}

fn write_lines(rx: Receiver<LineMsg>, mut file: LogFile, every: Duration) {
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH);
    let mut last = Instant::now();
    let mut stop = false;
    while !stop {
        let wait = every.saturating_sub(last.elapsed());
        let mut msg = match rx.recv_timeout(wait) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(LineMsg::Stop),
        };
        while let Some(m) = msg.take() {
            match m {
                LineMsg::Line(line) => batch.extend_from_slice(&line),
                LineMsg::Wake => {}
                LineMsg::Stop => {
                    stop = true;
                    break;
                }
            }
            if batch.len() >= BATCH {
                break;
            }
            msg = rx.try_recv().ok();
        }
        let reopen = LINE_REOPEN.swap(false, Ordering::AcqRel);
        if stop || reopen || batch.len() >= BATCH || last.elapsed() >= every {
            if !batch.is_empty() {
                if let Err(e) = file.write_all(&batch) {
                    eprintln!("cannot write the access log {}: {e}", file.path);
                }
                batch.clear();
            }
            last = Instant::now();
        }
        if reopen {
            if let Err(e) = file.reopen() {
                eprintln!("cannot reopen the access log {}: {e}", file.path);
            }
        }
    }
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

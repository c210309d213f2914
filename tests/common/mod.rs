//! Test harness: starts the real binary with a real config file on a free port, and offers
//! independent clients (ureq, raw sockets) and process inspection through /proc.
#![allow(dead_code)]

pub mod backend;
pub mod certs;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_zerocopy-server");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub struct Server {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

/// Replaces `{port}` and `{dir}` in a config template.
pub fn render(template: &str, port: u16, dir: &Path) -> String {
    template
        .replace("{port}", &port.to_string())
        .replace("{dir}", dir.to_str().unwrap())
}

impl Server {
    /// A temp dir with the config written from `template`; not started yet.
    pub fn prepare(template: &str) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        // Workers may run as nobody: they must be able to read the files the tests serve.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let port = free_port();
        let config_path = dir.path().join("config.toml");
        let log_path = dir.path().join("server.log");
        let s = Server {
            child: None,
            dir,
            port,
            config_path,
            log_path,
        };
        s.write_config(template);
        s
    }

    pub fn start(template: &str) -> Server {
        let mut s = Server::prepare(template);
        s.spawn();
        s.wait_ready();
        s
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write_file(&self, name: &str, content: &[u8]) -> PathBuf {
        let p = self.path(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, content).unwrap();
        p
    }

    pub fn write_config(&self, template: &str) {
        std::fs::write(
            &self.config_path,
            render(template, self.port, self.dir.path()),
        )
        .unwrap();
    }

    pub fn spawn(&mut self) {
        self.spawn_with_env(&[]);
    }

    /// Starts the server with these environment variables set (`NOTIFY_SOCKET`...).
    pub fn spawn_with_env(&mut self, vars: &[(&str, &str)]) {
        let log = File::create(&self.log_path).unwrap();
        let child = Command::new(BIN)
            .envs(vars.iter().copied())
            .arg("-c")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn server");
        self.child = Some(child);
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Waits until `/__metrics` answers.
    pub fn wait_ready(&self) {
        self.wait_ready_for(Duration::from_secs(20));
    }

    pub fn wait_ready_for(&self, timeout: Duration) {
        let ok = wait_until(timeout, || {
            ureq::get(&self.url("/__metrics"))
                .timeout(Duration::from_secs(1))
                .call()
                .is_ok()
        });
        assert!(ok, "server did not start; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) takes plain values and touches no memory of ours.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Worker processes: children of the master.
    pub fn workers(&self) -> Vec<i32> {
        children_of(self.pid())
    }

    pub fn metrics(&self) -> String {
        get(&self.url("/__metrics")).1
    }

    /// Waits for the master to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let pid = child.id() as i32;
        let workers = children_of(pid);
        // TERM drains (a client may still hold a connection); a second TERM stops at once.
        for wait in [1, 5] {
            // SAFETY: kill(2) takes plain values and touches no memory of ours.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(wait);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for w in workers {
            // SAFETY: kill(2) takes plain values and touches no memory of ours.
            unsafe { libc::kill(w, libc::SIGKILL) };
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Pids whose parent is `pid`.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if proc_status(p, "PPid").and_then(|v| v.parse::<i32>().ok()) == Some(pid) {
            out.push(p);
        }
    }
    out.sort();
    out
}

pub fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && proc_status(pid, "State").is_some_and(|s| !s.starts_with('Z'))
}

/// A field of /proc/PID/status, value trimmed.
pub fn proc_status(pid: i32, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .map(|v| v.trim().to_string())
}

/// GET with a fresh agent: (status, body). Panics on transport errors.
pub fn get(url: &str) -> (u16, String) {
    match ureq::get(url).timeout(Duration::from_secs(10)).call() {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

pub fn get_with(agent: &ureq::Agent, url: &str) -> Result<(u16, String), String> {
    match agent.get(url).call() {
        Ok(r) => {
            let status = r.status();
            r.into_string()
                .map(|b| (status, b))
                .map_err(|e| e.to_string())
        }
        Err(ureq::Error::Status(code, r)) => Ok((code, r.into_string().unwrap_or_default())),
        Err(e) => Err(e.to_string()),
    }
}

/// Sends raw bytes on a new connection and reads until the server closes or `timeout`.
pub fn raw(addr: SocketAddr, request: &[u8], timeout: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Connects from a chosen 127.x.y.z source address.
pub fn connect_from(source: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    sock.connect(&to.into()).unwrap();
    sock.into()
}

/// One `GET path` on `stream` with `Connection: close`; returns the status code.
pub fn get_on(mut stream: TcpStream, path: &str) -> u16 {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out);
    out.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Sum of every sample of `name` whose labels contain all of `labels` (`key="value"`).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (n, rest) = match key.find('{') {
                Some(i) => (&key[..i], &key[i..]),
                None => (key, ""),
            };
            (n == name && labels.iter().all(|lab| rest.contains(lab)))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Deterministic pseudo-random bytes, so a corrupted download cannot pass by chance.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A test CA and a certificate it signed for `backend.test` and 127.0.0.1.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub server: std::sync::Arc<rustls::ServerConfig>,
}

pub fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL takes a leaf whose issuer equals its subject for self-signed.
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "zerocopy test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["backend.test".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "backend.test");
    let cert = params
        .signed_by(&key, &rcgen::Issuer::new(ca_params, ca_key))
        .unwrap();
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        server: std::sync::Arc::new(server),
    }
}

/// `pki()`, with the CA written to `dir/ca.pem`: (server config, CA file).
pub fn test_pki(
    dir: &std::path::Path,
) -> (std::sync::Arc<rustls::ServerConfig>, std::path::PathBuf) {
    let p = pki();
    // Workers and health checkers read the CA file as `nobody`.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, &p.ca_pem).unwrap();
    (p.server, ca_path)
}

/// (status, lower-cased headers, body) of a response read whole.
pub fn parse_response(text: &str) -> (u16, Vec<(String, String)>, String) {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// A header of `parse_response`'s list.
pub fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// A WebSocket echo server (tungstenite), one thread per connection; returns its port.
pub fn ws_echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut ws) = tungstenite::accept(stream) else {
                    return;
                };
                loop {
                    match ws.read() {
                        Ok(m) if m.is_text() || m.is_binary() => {
                            if ws.send(m).is_err() {
                                break;
                            }
                        }
                        Ok(_) => {
                            if ws.flush().is_err() {
                                break;
                            }
                        }
                        Err(_) => {
                            let _ = ws.flush();
                            break;
                        }
                    }
                }
            });
        }
    });
    port
}

/// Steady client load for reload, upgrade and failover tests: one thread per entry of
/// `keep_alive` (a pooled agent, or a new connection per request), a request every 5 ms, each
/// answer checked (status 200, and the body if `expect` is given).
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failures: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(
        url: String,
        host: Option<&str>,
        expect: Option<&str>,
        keep_alive: &[bool],
    ) -> Load {
        use std::sync::atomic::Ordering::Relaxed;
        let stop: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
        let ok: std::sync::Arc<std::sync::atomic::AtomicU64> = Default::default();
        let failures: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let threads = keep_alive
            .iter()
            .map(|&keep| {
                let (stop, ok, failures, url) =
                    (stop.clone(), ok.clone(), failures.clone(), url.clone());
                let (host, expect) = (host.map(str::to_string), expect.map(str::to_string));
                std::thread::spawn(move || {
                    let mut b = ureq::AgentBuilder::new().timeout(Duration::from_secs(10));
                    if !keep {
                        b = b.max_idle_connections(0);
                    }
                    let agent = b.build();
                    while !stop.load(Relaxed) {
                        let mut req = agent.get(&url);
                        if let Some(h) = &host {
                            req = req.set("Host", h);
                        }
                        let answer = match req.call() {
                            Ok(r) => (r.status(), r.into_string().map_err(|e| e.to_string())),
                            Err(ureq::Error::Status(code, _)) => (code, Ok(String::new())),
                            Err(e) => (0, Err(e.to_string())),
                        };
                        match answer {
                            (200, Ok(body)) if expect.as_deref().is_none_or(|e| e == body) => {
                                ok.fetch_add(1, Relaxed);
                            }
                            other => failures.lock().unwrap().push(format!("{other:?}")),
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            threads,
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the clients; returns (answered correctly, failures).
    pub fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let ok = self.ok.load(std::sync::atomic::Ordering::Relaxed);
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        (ok, failures)
    }
}

/// GET /big on a raw socket, read slowly (256 KiB per `pace`) on its own thread, so that the
/// download spans reloads, drains and signals; returns what arrived before the server closed
/// or `len` bytes came.
pub fn slow_download(s: &Server, len: usize, pace: Duration) -> std::thread::JoinHandle<Vec<u8>> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(s.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    std::thread::spawn(move || {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let mut body = Vec::with_capacity(len);
        let mut chunk = vec![0u8; 256 * 1024];
        while body.len() < len {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
            std::thread::sleep(pace);
        }
        body
    })
}

/// The pid a pid file names, if it names one.
pub fn read_pid(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|t| t.trim().parse().ok())
}

/// Kills a master started by a binary upgrade, and its workers, if a test ends before it does.
pub struct Reap(pub i32);

impl Drop for Reap {
    fn drop(&mut self) {
        // Stopped first: a master that sees its workers die re-forks them, and a worker forked
        // after the list below was taken would outlive the test, orphaned.
        if alive(self.0) {
            // SAFETY: kill(2) takes plain values and touches no memory of ours.
            unsafe { libc::kill(self.0, libc::SIGSTOP) };
        }
        for pid in children_of(self.0).into_iter().chain([self.0]) {
            if alive(pid) {
                // SAFETY: kill(2) takes plain values and touches no memory of ours.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Server {
    /// `zerocopy-server -c CONFIG -s ACTION` (signals the master through the pid file); fails
    /// the test unless it succeeds.
    pub fn dash_s(&self, action: &str) {
        let out = std::process::Command::new(BIN)
            .args(["-c", self.config_path.to_str().unwrap(), "-s", action])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "-s {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// USR2 to this master; waits until the new master has written the pid file and its
    /// `workers` workers run. Returns the new master, killed when the `Reap` is dropped.
    pub fn upgrade(&self, pid_file: &Path, workers: usize) -> Reap {
        let old = self.pid();
        self.signal(libc::SIGUSR2);
        assert!(
            wait_until(Duration::from_secs(10), || read_pid(pid_file)
                .is_some_and(|p| p != old)),
            "no new master\n{}",
            self.log()
        );
        let new = Reap(read_pid(pid_file).unwrap());
        assert!(
            wait_until(Duration::from_secs(10), || children_of(new.0).len()
                == workers),
            "the new master's workers do not run\n{}",
            self.log()
        );
        new
    }
}

/// A rustls client configuration trusting the certificates of the PEM file `ca` (none:
/// trusting nothing), for these TLS versions (`rustls::DEFAULT_VERSIONS`: 1.3 and 1.2).
pub fn rustls_client(
    ca: Option<&Path>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

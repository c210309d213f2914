//! Without the kernel's `tls` module: the crypto-info layout, the mapping of rustls' secrets
//! (both ends of real handshakes must agree byte for byte), control records.
//!
//! With it (`#[ignore]`d, run inside the VM by scripts/ktls-vm.sh: `--ignored vm_`): the
//! probe, and real handshakes over loopback whose sockets are then offloaded and carry bytes
//! both ways, against the kernel on both ends and against rustls in user space, with an alert
//! and a TLS 1.3 key update from the client.

use super::*;
use rustls::crypto::ring::cipher_suite as suites;
use rustls::server::ServerConnectionData;
use rustls::{
    ClientConfig, ClientConnection, ServerConfig, ServerConnection, SupportedCipherSuite,
};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;

/// Every (version, suite) the offload takes, with the suite rustls offers for it (an ECDSA
/// certificate: the TLS 1.2 suites are ECDHE_ECDSA).
fn cases() -> Vec<(ProtocolVersion, SupportedCipherSuite)> {
    use ProtocolVersion::{TLSv1_2, TLSv1_3};
    vec![
        (TLSv1_2, suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
        (TLSv1_2, suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
        (
            TLSv1_2,
            suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
        (TLSv1_3, suites::TLS13_AES_128_GCM_SHA256),
        (TLSv1_3, suites::TLS13_AES_256_GCM_SHA384),
        (TLSv1_3, suites::TLS13_CHACHA20_POLY1305_SHA256),
    ]
}

/// A server and a client config that can only agree on `version` and `suite`, both with
/// secret extraction on; the client trusts the CA that signed the server's certificate.
fn configs(
    version: ProtocolVersion,
    suite: SupportedCipherSuite,
) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["ktls.test".to_string()])
        .unwrap()
        .signed_by(&key, &rcgen::Issuer::new(ca_params, ca_key))
        .unwrap();
    let versions: &[&rustls::SupportedProtocolVersion] = match version {
        ProtocolVersion::TLSv1_2 => &[&rustls::version::TLS12],
        _ => &[&rustls::version::TLS13],
    };
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..rustls::crypto::ring::default_provider()
    });
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .unwrap();
    server.enable_secret_extraction = true;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = true;
    (Arc::new(server), Arc::new(client))
}

fn client_conn(config: Arc<ClientConfig>) -> ClientConnection {
    let name = rustls::pki_types::ServerName::try_from("ktls.test").unwrap();
    ClientConnection::new(config, name).unwrap()
}

/// Moves records between the two ends in memory until neither has anything to send.
fn pump(server: &mut ServerConnection, client: &mut ClientConnection) {
    loop {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let from_client = !wire.is_empty();
        let mut rd = &wire[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
            server.process_new_packets().unwrap();
        }
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        let from_server = !wire.is_empty();
        let mut rd = &wire[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets().unwrap();
        }
        if !from_client && !from_server {
            return;
        }
    }
}

#[test]
fn crypto_info_structs_have_the_kernels_sizes() {
    // include/uapi/linux/tls.h: 4-byte header, then IV, key, salt, sequence number.
    assert_eq!(
        size_of::<libc::tls12_crypto_info_aes_gcm_128>(),
        4 + 8 + 16 + 4 + 8
    );
    assert_eq!(
        size_of::<libc::tls12_crypto_info_aes_gcm_256>(),
        4 + 8 + 32 + 4 + 8
    );
    assert_eq!(
        size_of::<libc::tls12_crypto_info_chacha20_poly1305>(),
        4 + 12 + 32 + 8
    );
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(1) } as usize;
    assert!(size_of::<RecordTypeSpace>() >= space);
}

#[test]
fn a_nonce_base_splits_into_salt_and_iv_for_aes_gcm_and_stays_whole_for_chacha() {
    let iv: Vec<u8> = (1..=12).collect();
    let key = [7u8; 32];
    let v13 = ProtocolVersion::TLSv1_3;
    let info = CryptoInfo::from_parts(v13, Cipher::AesGcm128, &key[..16], &iv, 0x0102).unwrap();
    let CryptoInfo::AesGcm128(i) = &info else {
        panic!("AES-GCM-128 expected")
    };
    assert_eq!(i.salt, [1, 2, 3, 4]);
    assert_eq!(i.iv, [5, 6, 7, 8, 9, 10, 11, 12]);
    assert_eq!(i.rec_seq, [0, 0, 0, 0, 0, 0, 1, 2], "big-endian");
    assert_eq!((i.info.version, i.info.cipher_type), (0x0304, 51));
    let v12 = ProtocolVersion::TLSv1_2;
    let info = CryptoInfo::from_parts(v12, Cipher::Chacha20Poly1305, &key, &iv, 0).unwrap();
    let CryptoInfo::Chacha20Poly1305(c) = &info else {
        panic!("ChaCha20-Poly1305 expected")
    };
    assert_eq!(c.iv.to_vec(), iv);
    assert_eq!((c.info.version, c.info.cipher_type), (0x0303, 54));
    // Wrong lengths are errors, not panics.
    assert!(CryptoInfo::from_parts(v13, Cipher::AesGcm256, &key[..16], &iv, 0).is_err());
    assert!(CryptoInfo::from_parts(v13, Cipher::AesGcm128, &key[..16], &iv[..8], 0).is_err());
    let tls10 = ProtocolVersion::TLSv1_0;
    assert!(CryptoInfo::from_parts(tls10, Cipher::AesGcm128, &key[..16], &iv, 0).is_err());
}

/// Real handshakes in memory: what the server would hand the kernel to send is exactly what
/// the client would hand it to receive, and the other way round; cipher and version are the
/// negotiated ones, and sequence numbers count the records already sent under the keys.
#[test]
fn both_ends_of_a_handshake_map_to_matching_crypto_info() {
    for (version, suite) in cases() {
        let (server_config, client_config) = configs(version, suite);
        let mut server = ServerConnection::new(server_config).unwrap();
        let mut client = client_conn(client_config);
        pump(&mut server, &mut client);
        assert!(!server.is_handshaking() && !client.is_handshaking());
        server
            .writer()
            .write_all(b"one record before the offload")
            .unwrap();
        pump(&mut server, &mut client);
        let mut got = Vec::new();
        let _ = client.reader().read_to_end(&mut got);
        assert_eq!(got, b"one record before the offload");
        assert_eq!(server.protocol_version(), Some(version));
        let cipher = Cipher::of_suite(suite.suite()).unwrap();
        let s = server.dangerous_extract_secrets().unwrap();
        let c = client.dangerous_extract_secrets().unwrap();
        // Under these keys the server sent the data, and before it TLS 1.3 session tickets or
        // the TLS 1.2 Finished.
        assert!(
            s.tx.0 >= 2,
            "{suite:?}: {} records sent under these keys",
            s.tx.0
        );
        assert_eq!((s.tx.0, s.rx.0), (c.rx.0, c.tx.0), "{suite:?}");
        let info = |seq, secrets| CryptoInfo::new(version, seq, secrets).unwrap();
        let (server_tx, client_rx) = (info(s.tx.0, &s.tx.1), info(c.rx.0, &c.rx.1));
        let (server_rx, client_tx) = (info(s.rx.0, &s.rx.1), info(c.tx.0, &c.tx.1));
        assert_eq!(server_tx.cipher(), cipher, "{suite:?}");
        assert_eq!(server_tx.as_bytes(), client_rx.as_bytes(), "{suite:?}");
        assert_eq!(server_rx.as_bytes(), client_tx.as_bytes(), "{suite:?}");
        assert_ne!(server_tx.as_bytes(), server_rx.as_bytes(), "{suite:?}");
        let header = server_tx.as_bytes()[..4].to_vec();
        let kernel_version = if version == ProtocolVersion::TLSv1_3 {
            0x0304u16
        } else {
            0x0303
        };
        assert_eq!(header[..2], kernel_version.to_ne_bytes(), "{suite:?}");
    }
}

#[test]
fn every_offered_aead_suite_maps_to_a_cipher() {
    for suite in rustls::crypto::ring::ALL_CIPHER_SUITES {
        assert!(Cipher::of_suite(suite.suite()).is_some(), "{suite:?}");
    }
    assert_eq!(Cipher::of_suite(CipherSuite::TLS_NULL_WITH_NULL_NULL), None);
}

fn no_keys() -> Option<&'static mut KernelConnection<ServerConnectionData>> {
    None
}

#[test]
fn control_records_are_ends_or_errors_never_data() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let fd = listener.as_fd();
    let v12 = ProtocolVersion::TLSv1_2;
    let v13 = ProtocolVersion::TLSv1_3;
    let close = control(fd, v13, ALERT, &[1, 0], no_keys()).unwrap();
    assert_eq!(close, Control::CloseNotify);
    // user_canceled, and a TLS 1.2 warning (no_renegotiation), are let pass.
    assert_eq!(
        control(fd, v13, ALERT, &[1, 90], no_keys()).unwrap(),
        Control::Ignored
    );
    assert_eq!(
        control(fd, v12, ALERT, &[1, 100], no_keys()).unwrap(),
        Control::Ignored
    );
    // A fatal alert (bad_record_mac), and any alert but those in TLS 1.3, end it.
    let fatal = control(fd, v12, ALERT, &[2, 20], no_keys()).unwrap_err();
    assert_eq!(fatal.kind(), io::ErrorKind::ConnectionAborted);
    assert!(control(fd, v13, ALERT, &[1, 100], no_keys()).is_err());
    assert!(
        control(fd, v13, ALERT, &[1], no_keys()).is_err(),
        "truncated"
    );
    // A key update without rustls' key schedule: a clean, explained close.
    let update = control(fd, v13, HANDSHAKE, &[24, 0, 0, 1, 1], no_keys()).unwrap_err();
    assert_eq!(update.kind(), io::ErrorKind::Unsupported);
    assert!(
        update.to_string().contains("updated its TLS 1.3 keys"),
        "{update}"
    );
    // Malformed, or in TLS 1.2, or what a client never sends: errors.
    for (version, typ, payload) in [
        (v13, HANDSHAKE, &[24, 0, 0, 1, 2][..]),
        (v13, HANDSHAKE, &[24, 0, 0, 2, 0, 0][..]),
        (v12, HANDSHAKE, &[24, 0, 0, 1, 0][..]),
        (v13, HANDSHAKE, &[4, 0, 0, 0][..]),
        (v12, HANDSHAKE, &[1, 0, 0, 0][..]),
        (v13, HANDSHAKE, &[][..]),
        (v13, CHANGE_CIPHER_SPEC, &[1][..]),
    ] {
        let e = control(fd, version, typ, payload, no_keys()).unwrap_err();
        assert_ne!(
            e.kind(),
            io::ErrorKind::Unsupported,
            "{typ} {payload:?}: {e}"
        );
    }
}

#[test]
fn support_says_which_pairs_the_kernel_takes() {
    let mut s = Support::default();
    assert!(s.is_empty());
    s.0 |= Support::bit(ProtocolVersion::TLSv1_3, Cipher::Chacha20Poly1305);
    assert!(s.has(ProtocolVersion::TLSv1_3, Cipher::Chacha20Poly1305));
    assert!(!s.has(ProtocolVersion::TLSv1_2, Cipher::Chacha20Poly1305));
    assert_eq!(s.describe(), "TLS 1.2: none; TLS 1.3: ChaCha20-Poly1305");
}

/// A plain TCP socket: `recv` reads data, with no record type to report.
#[test]
fn recv_on_plain_tcp_reads_data() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    client.write_all(b"plain").unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(recv(server.as_fd(), &mut buf).unwrap(), Record::Data(5));
    assert_eq!(&buf[..5], b"plain");
    assert_eq!(ulp(server.as_fd()).unwrap(), "");
}

// ---- Inside the VM (the kernel's `tls` module loaded) ----

fn tls_stat() -> String {
    std::fs::read_to_string("/proc/net/tls_stat").unwrap_or_default()
}

fn tls_counter(stat: &str, name: &str) -> u64 {
    stat.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(name)).then(|| f.next()?.parse().ok())?
        })
        .unwrap_or(0)
}

/// A connected loopback pair: (server side, client side).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    for s in [&server, &client] {
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
    }
    (server, client)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// Reads `len` bytes of application data from an offloaded socket; handshake records are
/// skipped only when `skip_tickets` (a client: the server's TLS 1.3 session tickets).
fn recv_data(fd: BorrowedFd<'_>, len: usize, skip_tickets: bool) -> Vec<u8> {
    let mut got = Vec::with_capacity(len);
    let mut buf = vec![0u8; 64 * 1024];
    while got.len() < len {
        match recv(fd, &mut buf).unwrap() {
            Record::Data(0) => panic!("EOF after {} of {len} bytes", got.len()),
            Record::Data(n) => got.extend_from_slice(&buf[..n]),
            Record::Control {
                content_type: HANDSHAKE,
                len: n,
            } if skip_tickets && buf[0] == NEW_SESSION_TICKET => {
                assert!(n > 4);
            }
            Record::Control { content_type, len } => {
                panic!("control record {content_type} ({len} bytes) amid data")
            }
        }
    }
    got
}

/// Handshake over TCP with rustls in user space (blocking), until rustls has nothing more
/// to send; returns the connection, ready for extraction.
fn handshake_server(tcp: &mut TcpStream, config: Arc<ServerConfig>) -> ServerConnection {
    let mut conn = ServerConnection::new(config).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(tcp).unwrap();
    }
    while conn.wants_write() {
        conn.write_tls(tcp).unwrap();
    }
    conn
}

fn handshake_client(tcp: &mut TcpStream, config: Arc<ClientConfig>) -> ClientConnection {
    let mut conn = client_conn(config);
    while conn.is_handshaking() {
        conn.complete_io(tcp).unwrap();
    }
    while conn.wants_write() {
        conn.write_tls(tcp).unwrap();
    }
    conn
}

#[test]
#[ignore = "needs the kernel's tls module: run inside the VM (scripts/ktls-vm.sh)"]
fn vm_probe_finds_every_cipher_for_both_versions() {
    let support = probe().expect("the TLS ULP");
    for (version, suite) in cases() {
        let cipher = Cipher::of_suite(suite.suite()).unwrap();
        assert!(support.has(version, cipher), "{}", support.describe());
    }
    println!("kTLS support: {}", support.describe());
}

/// Both ends offloaded: 1 MiB each way, byte-exact, through the kernel's TLS on both
/// sockets (the ULP reads back as `tls`, /proc/net/tls_stat counts them); then the client's
/// close_notify reaches the server as the end of the stream.
#[test]
#[ignore = "needs the kernel's tls module: run inside the VM (scripts/ktls-vm.sh)"]
fn vm_offloaded_ends_move_bytes_both_ways() {
    const LEN: usize = 1 << 20;
    for (version, suite) in cases() {
        let (server_config, client_config) = configs(version, suite);
        let (mut server_tcp, mut client_tcp) = tcp_pair();
        let before = tls_stat();
        // Neither end writes before both are offloaded: the end that finishes the handshake
        // last (the TLS 1.2 client, the TLS 1.3 server) must not find data behind it, which
        // its rustls would read with the handshake and drop on extraction.
        let offloaded = std::sync::Barrier::new(2);
        std::thread::scope(|scope| {
            let server = scope.spawn(|| {
                let conn = handshake_server(&mut server_tcp, server_config);
                let secrets = conn.dangerous_extract_secrets().unwrap();
                let cipher = offload(server_tcp.as_fd(), version, &secrets).unwrap();
                assert_eq!(ulp(server_tcp.as_fd()).unwrap(), "tls");
                offloaded.wait();
                server_tcp.write_all(&pattern(LEN, 1)).unwrap();
                let got = recv_data(server_tcp.as_fd(), LEN, false);
                assert!(
                    got == pattern(LEN, 2),
                    "{suite:?}: client → server bytes differ"
                );
                let mut buf = [0u8; 64];
                let end = recv(server_tcp.as_fd(), &mut buf).unwrap();
                let Record::Control { content_type, len } = end else {
                    panic!("{suite:?}: {end:?} instead of close_notify")
                };
                let what = control(
                    server_tcp.as_fd(),
                    version,
                    content_type,
                    &buf[..len],
                    no_keys(),
                );
                assert_eq!(what.unwrap(), Control::CloseNotify, "{suite:?}");
                cipher
            });
            let conn = handshake_client(&mut client_tcp, client_config);
            let secrets = conn.dangerous_extract_secrets().unwrap();
            offload(client_tcp.as_fd(), version, &secrets).unwrap();
            assert_eq!(ulp(client_tcp.as_fd()).unwrap(), "tls");
            offloaded.wait();
            let got = recv_data(client_tcp.as_fd(), LEN, true);
            assert!(
                got == pattern(LEN, 1),
                "{suite:?}: server → client bytes differ"
            );
            client_tcp.write_all(&pattern(LEN, 2)).unwrap();
            send_close_notify(client_tcp.as_fd()).unwrap();
            let cipher = server.join().unwrap();
            assert_eq!(Some(cipher), Cipher::of_suite(suite.suite()));
        });
        let after = tls_stat();
        for counter in ["TlsTxSw", "TlsRxSw"] {
            let (b, a) = (tls_counter(&before, counter), tls_counter(&after, counter));
            assert_eq!(a, b + 2, "{suite:?}: {counter} counts both ends\n{after}");
        }
        println!("{version:?} {suite:?}: 1 MiB each way through kTLS on both ends");
    }
}

/// The server offloaded, the client rustls in user space (what real clients are): records
/// the kernel writes are read by rustls and the other way round; plain reads carry data. In
/// TLS 1.3 the client then updates its keys: the data before the update arrives whole, a
/// plain read then fails (`EIO`) instead of returning the record, `recv` brings it, and
/// `control` refuses it cleanly (the key schedule was not kept), so the server closes with a
/// close_notify that the client reads as a clean end. In TLS 1.2 the client's close_notify
/// ends the stream.
#[test]
#[ignore = "needs the kernel's tls module: run inside the VM (scripts/ktls-vm.sh)"]
fn vm_offloaded_server_talks_to_rustls_and_never_reads_a_key_update_as_data() {
    const LEN: usize = 256 * 1024;
    for (version, suite) in cases() {
        let (server_config, client_config) = configs(version, suite);
        let (mut server_tcp, client_tcp) = tcp_pair();
        std::thread::scope(|scope| {
            let server = scope.spawn(|| {
                let conn = handshake_server(&mut server_tcp, server_config);
                let secrets = conn.dangerous_extract_secrets().unwrap();
                offload(server_tcp.as_fd(), version, &secrets).unwrap();
                server_tcp.write_all(&pattern(LEN, 3)).unwrap();
                let mut got = vec![0u8; LEN];
                server_tcp.read_exact(&mut got).unwrap();
                assert!(
                    got == pattern(LEN, 4),
                    "{suite:?}: client → server bytes differ"
                );
                let mut buf = [0u8; 64];
                if version == ProtocolVersion::TLSv1_3 {
                    let plain = server_tcp.read(&mut buf).unwrap_err();
                    assert_eq!(plain.raw_os_error(), Some(libc::EIO), "{suite:?}: {plain}");
                }
                let end = recv(server_tcp.as_fd(), &mut buf).unwrap();
                let Record::Control { content_type, len } = end else {
                    panic!("{suite:?}: {end:?} instead of a control record")
                };
                let what = control(
                    server_tcp.as_fd(),
                    version,
                    content_type,
                    &buf[..len],
                    no_keys(),
                );
                if version == ProtocolVersion::TLSv1_3 {
                    let e = what.unwrap_err();
                    assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{suite:?}: {e}");
                } else {
                    assert_eq!(what.unwrap(), Control::CloseNotify, "{suite:?}");
                }
                send_close_notify(server_tcp.as_fd()).unwrap();
            });
            let mut tcp = client_tcp;
            let conn = handshake_client(&mut tcp, client_config);
            let mut client = rustls::StreamOwned::new(conn, tcp);
            let mut got = vec![0u8; LEN];
            client.read_exact(&mut got).unwrap();
            assert!(
                got == pattern(LEN, 3),
                "{suite:?}: server → client bytes differ"
            );
            client.write_all(&pattern(LEN, 4)).unwrap();
            client.flush().unwrap();
            if version == ProtocolVersion::TLSv1_3 {
                client.conn.refresh_traffic_keys().unwrap();
                client.write_all(b"after the key update").unwrap();
            } else {
                client.conn.send_close_notify();
            }
            client.flush().unwrap();
            server.join().unwrap();
            let mut rest = Vec::new();
            let n = client.read_to_end(&mut rest);
            assert_eq!(
                n.unwrap(),
                0,
                "{suite:?}: a clean close_notify, nothing else"
            );
        });
        println!("{version:?} {suite:?}: kTLS server ↔ rustls client, control records handled");
    }
}

//! TLS session tickets that any worker opens: the keys live in shared memory
//! (`shm::TicketKeys`), made by the master from the OS RNG and rotated on a schedule, so a
//! client resumes whichever worker, generation or binary (after an upgrade) it reaches.
//!
//! A ticket is `key name (16) | nonce (12) | AES-256-GCM(session state) | tag (16)`, the name
//! authenticated as associated data. The current key seals; the current or the previous one
//! opens, so a ticket lives one to two rotation periods and then no key that could open it is
//! kept: that bound, not a date inside the ticket, is what limits the damage a stolen key does
//! (rustls' `ProducesTickets` contract).

use super::shm::{TicketKeys, TICKET_KEY_LEN, TICKET_NAME_LEN};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

const TAG_LEN: usize = 16;
const HEADER_LEN: usize = TICKET_NAME_LEN + NONCE_LEN;
/// TLS 1.3 caps a ticket's lifetime at 7 days (RFC 8446, 4.6.1).
const MAX_LIFETIME: u64 = 7 * 24 * 3600;

/// Seals and opens tickets with the keys of the shared-memory region; built by the master into
/// each generation's rustls configuration, used by its workers.
pub struct SharedTicketer {
    keys: &'static TicketKeys,
    lifetime: u32,
}

impl SharedTicketer {
    /// `rotation_secs`: `tls.session_ticket_rotation_secs`. A ticket sealed just before a
    /// rotation still opens for one period: that is the lifetime clients are told.
    pub fn new(keys: &'static TicketKeys, rotation_secs: u64) -> Self {
        SharedTicketer {
            keys,
            lifetime: rotation_secs.clamp(1, MAX_LIFETIME) as u32,
        }
    }
}

impl std::fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTicketer")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

fn aead(key: &[u8; TICKET_KEY_LEN]) -> Option<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, key)
        .ok()
        .map(LessSafeKey::new)
}

impl rustls::server::ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    /// `None` (rustls then sends no ticket) only before the master made the first key, or if
    /// the OS RNG fails.
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let key = self.keys.current()?;
        let sealer = aead(&key.key)?;
        // A random nonce per ticket: with one key per rotation period, far fewer tickets than
        // the 2^32 that AES-GCM's random nonces allow per key.
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&key.name);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = sealer
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&key.name),
                &mut out[HEADER_LEN..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    /// `cipher` comes from the client: any length, any bytes.
    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < HEADER_LEN + TAG_LEN {
            return None;
        }
        let (name, rest) = cipher.split_at(TICKET_NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let key = self.keys.named(name)?;
        let opener = aead(&key.key)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let len = opener
            .open_in_place(nonce, Aad::from(name), &mut buf)
            .ok()?
            .len();
        buf.truncate(len);
        Some(buf)
    }
}

/// Milliseconds of `CLOCK_BOOTTIME`: one clock for every master of the machine (the rotation
/// schedule is shared through the region), which counts suspended time and never jumps.
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is, and keeps no pointer to it.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if r == 0 {
        ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
    } else {
        0
    }
}

/// Master: makes the first key, or the next one once the current is `rotation_secs` old.
/// Cheap when nothing is due (two atomic loads): called on every tick of the master's loop.
pub fn rotate_if_due(keys: &TicketKeys, rotation_secs: u64) {
    let fresh = || {
        let mut bytes = [0u8; TICKET_NAME_LEN + TICKET_KEY_LEN];
        match SystemRandom::new().fill(&mut bytes) {
            Ok(()) => Some(bytes),
            Err(_) => {
                log::error!("the OS RNG failed: no new TLS session-ticket key this time");
                None
            }
        }
    };
    if let Some(n) = keys.rotate(now_ms(), rotation_secs.saturating_mul(1000), fresh) {
        if n == 1 {
            log::info!("TLS session-ticket key #1 made");
        } else {
            log::info!(
                "TLS session-ticket key #{n} made; #{} still opens tickets until the next rotation",
                n - 1
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    fn keys() -> &'static TicketKeys {
        let shm = Box::leak(Box::new(crate::shared::shm::Shm::create().unwrap()));
        &shm.region().header.tickets
    }

    fn fresh(seed: u8) -> impl FnOnce() -> Option<[u8; TICKET_NAME_LEN + TICKET_KEY_LEN]> {
        move || Some([seed; TICKET_NAME_LEN + TICKET_KEY_LEN])
    }

    #[test]
    fn no_key_no_ticket_then_round_trips() {
        let k = keys();
        let t = SharedTicketer::new(k, 3600);
        assert!(t.encrypt(b"state").is_none(), "no key yet");
        assert_eq!(k.rotate(1000, 3600, fresh(1)), Some(1));
        let ticket = t.encrypt(b"session state").unwrap();
        assert_eq!(&ticket[..TICKET_NAME_LEN], &[1; TICKET_NAME_LEN]);
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
        assert_ne!(t.encrypt(b"session state").unwrap(), ticket, "fresh nonce");
    }

    #[test]
    fn the_previous_key_opens_and_the_one_before_does_not() {
        let k = keys();
        let t = SharedTicketer::new(k, 100);
        assert_eq!(k.rotate(1000, 100, fresh(1)), Some(1));
        let first = t.encrypt(b"one").unwrap();
        assert_eq!(k.rotate(1099, 100, fresh(2)), None, "not due yet");
        assert_eq!(k.rotate(1100, 100, fresh(2)), Some(2));
        let second = t.encrypt(b"two").unwrap();
        assert_eq!(t.decrypt(&first).as_deref(), Some(&b"one"[..]), "previous");
        assert_eq!(t.decrypt(&second).as_deref(), Some(&b"two"[..]));
        assert_eq!(k.rotate(1200, 100, fresh(3)), Some(3));
        assert!(t.decrypt(&first).is_none(), "two rotations old");
        assert!(t.decrypt(&second).is_some());
        // Around the ring more than once: numbers and entries stay consistent.
        for (i, now) in (4..20u8).zip((1300..).step_by(100)) {
            assert_eq!(k.rotate(now, 100, fresh(i)), Some(u64::from(i)));
            assert_eq!(k.current().unwrap().name, [i; TICKET_NAME_LEN]);
        }
        assert!(t.decrypt(&second).is_none());
    }

    #[test]
    fn tampered_or_short_tickets_do_not_open() {
        let k = keys();
        let t = SharedTicketer::new(k, 100);
        k.rotate(1, 100, fresh(7));
        let ticket = t.encrypt(b"state").unwrap();
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 0x40;
            assert!(t.decrypt(&bad).is_none(), "byte {i} flipped");
        }
        for len in 0..ticket.len() {
            assert!(t.decrypt(&ticket[..len]).is_none(), "cut to {len}");
        }
    }

    #[test]
    fn two_masters_rotating_at_once_make_one_key_each_time() {
        let k = keys();
        for round in 1..=50u64 {
            let now = round * 10;
            let made = std::thread::scope(|s| {
                let a = s.spawn(|| k.rotate(now, 10, fresh(round as u8)));
                let b = s.spawn(|| k.rotate(now, 10, fresh(round as u8 ^ 0xff)));
                [a.join().unwrap(), b.join().unwrap()]
            });
            let winners: Vec<u64> = made.into_iter().flatten().collect();
            assert_eq!(winners, [round], "round {round}");
            let current = k.current().unwrap();
            assert_eq!(current.number, round);
            // Whichever master wrote it, the key is one of theirs, whole.
            let seed = current.name[0];
            assert!(current.name.iter().chain(&current.key).all(|&b| b == seed));
        }
    }
}

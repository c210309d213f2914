//! `performance.huge_pages_enabled`: a worker's heap in large OS pages.
//!
//! Every process starts with transparent huge pages off (`PR_SET_THP_DISABLE`, main.rs): for
//! thousands of idle connections of a few hundred bytes each, 2 MiB pages cost megabytes. A
//! worker of a configuration that asks for huge pages turns THP back on for itself and tells
//! its allocator (mimalloc) to ask the OS for large pages (`MAP_HUGETLB` where pages are
//! reserved, else `MADV_HUGEPAGE` on its segments). What the kernel grants is its business:
//! the log says what THP allows, what is reserved, and — once the worker has served a while —
//! how much of its memory is in huge pages, or says plainly that none could be had.

use std::time::Duration;

/// mimalloc's `mi_option_allow_large_os_pages` (6 in v2 and v3 of its `mi_option_e`).
const MI_OPTION_ALLOW_LARGE_OS_PAGES: i32 = 6;

extern "C" {
    // Linked in with the global allocator (libmimalloc-sys).
    fn mi_option_set(option: i32, value: std::ffi::c_long);
}

/// Turns huge pages on for this worker; call right after fork, before its heap grows.
pub fn enable() {
    // SAFETY: prctl with integer arguments only; it changes this process's memory policy.
    let thp = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0) };
    if thp != 0 {
        log::warn!(
            "huge pages: cannot turn transparent huge pages back on: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: sets one of mimalloc's options; it takes effect on its next OS allocation.
    unsafe { mi_option_set(MI_OPTION_ALLOW_LARGE_OS_PAGES, 1) };
}

/// What the system offers: THP's mode and the reserved huge pages.
pub fn offered() -> (String, u64) {
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|s| {
            let start = s.find('[')?;
            let end = s[start..].find(']')?;
            Some(s[start + 1..start + end].to_string())
        })
        .unwrap_or_else(|| "unavailable".into());
    let reserved = kib_field("/proc/meminfo", "HugePages_Total:").unwrap_or(0);
    (mode, reserved)
}

/// This process's memory in huge pages, in KiB (transparent and reserved ones).
pub fn held_kib() -> u64 {
    let thp = kib_field("/proc/self/smaps_rollup", "AnonHugePages:").unwrap_or(0);
    let hugetlb = kib_field("/proc/self/status", "HugetlbPages:").unwrap_or(0);
    thp + hugetlb
}

fn kib_field(path: &str, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(name))?;
    line[name.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Logs what was offered at start and, after `after`, what the worker holds.
pub async fn report(after: Duration) {
    let (mode, reserved) = offered();
    if mode == "never" && reserved == 0 {
        log::warn!(
            "huge pages: none can be had here: transparent huge pages are `never` and no huge pages are reserved (HugePages_Total 0); the worker runs on 4 KiB pages"
        );
        return;
    }
    log::info!(
        "huge pages: asked for (transparent huge pages `{mode}`, {reserved} huge pages reserved)"
    );
    monoio::time::sleep(after).await;
    match held_kib() {
        0 => log::warn!(
            "huge pages: none obtained after {}s (THP `{mode}`, {reserved} reserved): the worker runs on 4 KiB pages",
            after.as_secs()
        ),
        kib => log::info!("huge pages: {kib} KiB of this worker's memory is in huge pages"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_system_s_offer_is_read() {
        let (mode, _) = super::offered();
        assert!(
            ["always", "madvise", "never", "unavailable"].contains(&mode.as_str()),
            "{mode}"
        );
        assert_eq!(super::kib_field("/proc/self/status", "NoSuchField:"), None);
        assert!(super::kib_field("/proc/self/status", "VmRSS:").is_some_and(|k| k > 0));
    }
}

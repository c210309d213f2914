//! Shared settings of the property tests (`proptest`), compiled into tests only.
//!
//! Each suite passes the case count it can afford in the unit-test run; `PROPTEST_CASES`,
//! when set (as `scripts/fuzz.sh` does), wins over it. Failures are not persisted to
//! `proptest-regressions/` files: every failure found becomes a plain `#[test]` with its
//! minimal input next to the property, which reads better and merges cleanly.

use proptest::test_runner::Config;

pub fn config(cases: u32) -> Config {
    let mut c = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c.failure_persistence = None;
    c
}

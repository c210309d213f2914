#!/usr/bin/env bash
# Runs the property tests long: every `props` module (request-head parser, path normaliser,
# chunked decoder, ranges and HTTP dates, router, config loader) with PROPTEST_CASES cases per
# property instead of the suite's few hundred, then prints a summary.
#
#   scripts/fuzz.sh                              # 100,000 cases per property
#   CASES=1000000 scripts/fuzz.sh                # a million
#   CASES=50000 scripts/fuzz.sh chunked::props   # one module (any libtest name filter)
#
# The dev profile on purpose: its overflow checks turn an arithmetic wrap (silent in release)
# into a failure. A failure prints its minimal input: make it a plain #[test] beside the
# property, with the fix. Exit status: that of the test run.
set -uo pipefail
cd "$(dirname "$0")/.."
cases=${CASES:-100000}
filter=${1:-props::}
log=${LOG:-$(mktemp -t fuzz.XXXXXX)}
nice -n 15 cargo test --locked --bin zerocopy-server --no-run -q 2>&1 | grep -v '^$' || true
echo "fuzz: $cases cases per property, filter '$filter', log $log"
start=$(date +%s)
PROPTEST_CASES=$cases nice -n 15 cargo test --locked --bin zerocopy-server -- \
  --test-threads="${THREADS:-2}" "$filter" >"$log" 2>&1
status=$?
elapsed=$(($(date +%s) - start))
passed=$(grep -cE '^test .* \.\.\. ok$' "$log")
failed=$(grep -cE '^test .* \.\.\. FAILED$' "$log")
echo "fuzz: $passed properties passed, $failed failed, $((passed * cases)) cases passed in ${elapsed}s"
grep -E '^test .* \.\.\. FAILED$' "$log" | sed 's/^/  /'
grep -E -A12 'Test failed|minimal failing input' "$log" | head -200
exit $status

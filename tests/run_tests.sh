#!/bin/sh
# Runs every C test binary given as arguments, then the Lua tests, and prints one
# closing line: "tests: N passed, N failed, N skipped". Exit status is non-zero
# when anything failed. PoCL needs a writable cache directory (toolchain.md 9.1).
set -u
BUILD=${BUILD:-build}
: "${POCL_CACHE_DIR:=$PWD/$BUILD/pocl-cache}"
export POCL_CACHE_DIR
mkdir -p "$POCL_CACHE_DIR" "$BUILD/test-logs"
passed=0; failed=0; skipped=0; broken=""

count() { # file pattern -> number in "[  PATTERN ] N test(s)"
  sed -n "s/^\[  *$2  *\] \([0-9][0-9]*\) test(s).*/\1/p" "$1" | head -n 1
}

for bin in "$@"; do
  name=$(basename "$bin")
  log="$BUILD/test-logs/$name.log"
  echo "=== $name"
  "$bin" >"$log" 2>&1
  rc=$?
  cat "$log"
  p=$(count "$log" PASSED); f=$(count "$log" FAILED); s=$(count "$log" SKIPPED)
  passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0})); skipped=$((skipped + ${s:-0}))
  if [ "$rc" -ne 0 ] && [ -z "$f" ]; then failed=$((failed + 1)); broken="$broken $name(rc=$rc)"; fi
  if [ "$rc" -ne 0 ]; then broken="$broken $name"; fi
done

if [ -f tests/lua/run.lua ]; then
  echo "=== lua tests"
  log="$BUILD/test-logs/lua.log"
  CLHCLIP_BUILD=$BUILD lua5.4 tests/lua/run.lua >"$log" 2>&1
  rc=$?
  cat "$log"
  p=$(count "$log" PASSED); f=$(count "$log" FAILED); s=$(count "$log" SKIPPED)
  passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0})); skipped=$((skipped + ${s:-0}))
  if [ "$rc" -ne 0 ] && [ -z "$f" ]; then failed=$((failed + 1)); broken="$broken lua(rc=$rc)"; fi
fi

[ -n "$broken" ] && echo "failing suites:$broken"
echo "tests: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ] && [ -z "$broken" ]

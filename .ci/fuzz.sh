#!/usr/bin/env bash
# Fuzzing smoke run: every cargo-fuzz target in fuzz/ for FUZZ_SECONDS (default 30) each,
# starting from a throwaway copy of its committed corpus (fuzz/corpus/<target>), so CI never
# grows the committed corpus. Fails on the first crash, leak, OOM or timeout; the input that
# triggered it is kept in fuzz/artifacts/<target>/ and the end of libFuzzer's log is printed.
# Needs a nightly toolchain (cargo-fuzz uses -Zsanitizer=address): a pinned one, so a new
# nightly cannot break CI or change what the sanitizer finds between two runs. rustup serves
# dated nightlies here up to about 2026-10 (nightly-2026-11-01 has no release); 2026-05-20 is the
# build this machine had as plain `nightly`, which CI used until the pin.
# Bump on purpose: check `cargo +NEW fuzz build` and a fuzz run first.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

seconds=${FUZZ_SECONDS:-30}
began=$SECONDS

nightly=nightly-2026-05-20
if ! rustup run "$nightly" rustc --version >/dev/null 2>&1; then
    rustup toolchain install "$nightly" --profile minimal
fi
if ! cargo "+$nightly" fuzz --version >/dev/null 2>&1; then
    cargo "+$nightly" install cargo-fuzz --locked
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One build for all targets (each run below then only checks it is fresh).
cargo "+$nightly" fuzz build
mapfile -t targets < <(cargo "+$nightly" fuzz list)
[ "${#targets[@]}" -gt 0 ] || { echo "fuzz.sh: no fuzz targets found" >&2; exit 1; }

summary=()
for t in "${targets[@]}"; do
    corpus="$work/corpus/$t"
    mkdir -p "$corpus"
    if [ -d "fuzz/corpus/$t" ]; then
        cp -R "fuzz/corpus/$t/." "$corpus/"
    else
        echo "fuzz.sh: warning: no committed corpus for $t" >&2
    fi
    log="$work/$t.log"
    echo "== $t: ${seconds}s from $(find "$corpus" -type f | wc -l) seed(s)"
    t0=$SECONDS
    if ! cargo "+$nightly" fuzz run "$t" "$corpus" -- \
        -max_total_time="$seconds" -rss_limit_mb=512 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        echo "fuzz.sh: $t FAILED; last lines of its log:" >&2
        tail -n 60 "$log" >&2
        echo "fuzz.sh: reproduce with: cargo +$nightly fuzz run $t fuzz/artifacts/$t/<crash file>" >&2
        exit 1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
    [ -n "$execs" ] || { echo "fuzz.sh: $t printed no final stats" >&2; tail -n 20 "$log" >&2; exit 1; }
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*' || echo "?")
    summary+=("$(printf '%-14s %10s executions  %6s edges  %4ss' "$t" "$execs" "$cov" "$((SECONDS - t0))")")
done

echo "== fuzzing done in $((SECONDS - began))s, no crash"
printf '%s\n' "${summary[@]}"

#!/usr/bin/env bash
# Runs each fuzz target for SECONDS (default 600) with cargo fuzz (nightly), one after
# the other, from seed inputs written here. Crashes land in fuzz/artifacts/TARGET/; each
# one found is kept as a regression test in tests/ once fixed.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# Needs `cargo install cargo-fuzz` and a nightly toolchain (`rustup toolchain install
# nightly`). Not part of CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
SECONDS_EACH=${1:-600}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(frame_decoder connect_registration http_bodies tls_records)

# A frame: big-endian u16 length, then the body.
frame() { python3 -c 'import sys; b=sys.argv[1].encode(); sys.stdout.buffer.write(len(b).to_bytes(2,"big")+b)' "$1"; }
seed() { # target name bytes-from-stdin
    mkdir -p "corpus/$1"
    cat >"corpus/$1/$2"
}
frame '{"T":"ack"}' | seed frame_decoder ack
frame '{"T":"connect","DeviceId":"d","ClientVer":"1","Levels":{"0":5},"Info":{"device":"mako"}}' | seed frame_decoder connect
frame '{"T":"broadcast","ChanId":"0","TopLevel":2,"Payloads":[{"a":1}]}' | seed frame_decoder broadcast
frame '{"T":"notifications","Notifications":[{"A":"app","M":"m1","P":"x"}]}' | seed frame_decoder notifications
{ printf '\0'; frame '{"T":"connect","DeviceId":"dev-1","Levels":{"0":0}}'; frame '{"T":"ack"}'; frame '{"T":"pong"}'; } | seed connect_registration hello
{ printf '\0'; frame '{"T":"connect","DeviceId":"dev-1","Info":{"device":"mako","channel":"daily"},"Levels":{"0":3}}'; } | seed connect_registration hello-levels
printf '\0{"channel":"system","expire_on":"2099-01-01T00:00:00Z","data":{"daily/mako":[1]}}' | seed http_bodies broadcast
printf '\1{"appid":"app","token":"YXBwOjpkZXY=","expire_on":"2099-01-01T00:00:00Z","data":1,"replace_tag":"t","clear_pending":true}' | seed http_bodies notify-token
printf '\1{"appid":"app","userid":"u","deviceid":"d","expire_on":"2099-01-01T00:00:00+02:00","data":"x"}' | seed http_bodies notify-ids
printf '\2{"deviceid":"dev1","appid":"app1"}' | seed http_bodies register
printf '\3{"deviceid":"dev1","appid":"app1"}' | seed http_bodies unregister
# tls_records: first byte 0x80 puts a real ClientHello first; its low bits count chunk sizes.
printf '\x80' | seed tls_records hello
printf '\x83\x00\x04\x0f' | seed tls_records hello-chunked
printf '\x80\x14\x03\x03\x00\x01\x01\x17\x03\x03\x00\x05hello' | seed tls_records hello-ccs-data
printf '\x00\x16\x03\x01\x00\x04\x01\x00\x00\x00' | seed tls_records short-hello

# A target that does not build, or a run that ends in a crash, fails the script; the whole
# output is kept in target/TARGET.log.
failed=0
mkdir -p target
for t in "${TARGETS[@]}"; do
    echo "== $t for ${SECONDS_EACH}s"
    rc=0
    cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$SECONDS_EACH" -max_len=70000 \
        -print_final_stats=1 >"target/$t.log" 2>&1 || rc=$?
    grep -E '^(#[0-9]+ +DONE|stat::|==[0-9]+==|SUMMARY|Done|artifact)' "target/$t.log" || true
    if [ "$rc" -ne 0 ]; then
        echo "  FAILED (exit $rc); its errors, and the end of fuzz/target/$t.log:"
        { grep -m 10 -E '^(error|Error)' "target/$t.log"; tail -n 5 "target/$t.log"; } | sed 's/^/    /'
        failed=1
    fi
    ls "artifacts/$t" 2>/dev/null | sed "s|^|  found: artifacts/$t/|" || true
done
exit "$failed"

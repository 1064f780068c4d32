#!/bin/bash
# usage: stat.sh NAME SERVER_BIN pushload-args...  (counts syscalls/submissions of the server for 6 s, 5 s in)
name=$1; shift; bin=$1; shift
cd /work/main
( sleep 5; pid=$(pgrep -n -f "$bin /"); perf stat -e 'context-switches,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_io_uring_enter,io_uring:io_uring_submit_req,io_uring:io_uring_complete,syscalls:sys_enter_munmap,syscalls:sys_enter_madvise,syscalls:sys_enter_brk,syscalls:sys_enter_membarrier,syscalls:sys_enter_write,syscalls:sys_enter_read,task-clock' -p $pid -o /tmp/prof/$name.stat -- sleep 6 >/dev/null 2>&1 ) &
flock /tmp/perf.lock target/release/pushload --server $bin --sessions 5000 --workers 1 "$@" > /tmp/prof/$name.out 2>&1
wait

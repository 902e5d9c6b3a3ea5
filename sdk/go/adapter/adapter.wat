;; wasi_snapshot_preview1 for Go policies, importing nothing but the policy's `host`
;; interface: the router's WASI that grants nothing, inside the component itself.
;;
;; Why: mainline Go (GOOS=wasip1) imports preview1. The stock reactor adapter turns that
;; into 18 WASI 0.2 interfaces, and Go's garbage collector, when it runs inside
;; `cabi_realloc`, reads the wall clock through one of them; calling any import while the
;; host lowers arguments is forbidden, so the component traps (wasmtime#14318,
;; componentize-go#77). Here the clocks never call out: they are a virtual clock that
;; advances 1 us per read (a policy reads real time from `policy.NowMs()`), so a GC may
;; run anywhere.
;;
;; What each call does: arguments and environment are empty; no preopened directory,
;; every fd/path/socket call fails (EBADF / ENOSYS); stdout and stderr writes go to
;; `host.log` (info / warn; the router rate-limits and tags them); stdin reads EOF;
;; random_get reads `host.random`; poll_oneoff reports every subscription ready at once
;; (a policy may not wait); sched_yield returns; proc_exit traps.
;;
;; Build: wasm-tools component embed ../../../wit --world preview1-adapter adapter.wat \
;;          -o wasi_snapshot_preview1.wasm
(module
  (import "env" "memory" (memory 0))
  (import "vllm:router-policy/host@0.1.0" "log" (func $log (param i32 i32 i32)))
  (import "vllm:router-policy/host@0.1.0" "random" (func $random (result i64)))

  ;; Virtual clock, ns. Realtime starts at 2026-01-01T00:00:00Z.
  (global $mono (mut i64) (i64.const 1000000))
  (global $wall_base i64 (i64.const 1767225600000000000))

  (func (export "args_sizes_get") (param $argc i32) (param $size i32) (result i32)
    (i32.store (local.get $argc) (i32.const 0))
    (i32.store (local.get $size) (i32.const 0))
    (i32.const 0))
  (func (export "args_get") (param i32 i32) (result i32) (i32.const 0))
  (func (export "environ_sizes_get") (param $n i32) (param $size i32) (result i32)
    (i32.store (local.get $n) (i32.const 0))
    (i32.store (local.get $size) (i32.const 0))
    (i32.const 0))
  (func (export "environ_get") (param i32 i32) (result i32) (i32.const 0))

  (func (export "clock_res_get") (param $id i32) (param $out i32) (result i32)
    (i64.store (local.get $out) (i64.const 1000))
    (i32.const 0))
  (func (export "clock_time_get") (param $id i32) (param $precision i64) (param $out i32) (result i32)
    (global.set $mono (i64.add (global.get $mono) (i64.const 1000)))
    (i64.store (local.get $out)
      (select (i64.add (global.get $wall_base) (global.get $mono)) (global.get $mono)
        (i32.eqz (local.get $id))))
    (i32.const 0))

  ;; fd_write(fd, iovs, iovs_len, nwritten): stdout/stderr to host.log, one call per iovec.
  (func (export "fd_write") (param $fd i32) (param $iovs i32) (param $n i32) (param $out i32) (result i32)
    (local $total i32) (local $ptr i32) (local $len i32)
    (if (i32.gt_u (local.get $fd) (i32.const 2)) (then (return (i32.const 8))))
    (if (i32.eqz (local.get $fd)) (then (return (i32.const 8))))
    (block $done
      (loop $next
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $ptr (i32.load (local.get $iovs)))
        (local.set $len (i32.load offset=4 (local.get $iovs)))
        (if (i32.gt_u (local.get $len) (i32.const 0))
          (then
            ;; Drop one trailing newline: each log call is one line.
            (call $log
              (select (i32.const 2) (i32.const 1) (i32.eq (local.get $fd) (i32.const 2)))
              (local.get $ptr)
              (select
                (i32.sub (local.get $len) (i32.const 1))
                (local.get $len)
                (i32.eq (i32.load8_u (i32.add (local.get $ptr) (i32.sub (local.get $len) (i32.const 1))))
                        (i32.const 10))))))
        (local.set $total (i32.add (local.get $total) (local.get $len)))
        (local.set $iovs (i32.add (local.get $iovs) (i32.const 8)))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $next)))
    (i32.store (local.get $out) (local.get $total))
    (i32.const 0))

  ;; fd_read: stdin is at EOF; other fds do not exist.
  (func (export "fd_read") (param $fd i32) (param i32 i32) (param $out i32) (result i32)
    (if (i32.ne (local.get $fd) (i32.const 0)) (then (return (i32.const 8))))
    (i32.store (local.get $out) (i32.const 0))
    (i32.const 0))

  ;; fd_fdstat_get: 0-2 are character devices (filetype 2), nothing else exists.
  (func (export "fd_fdstat_get") (param $fd i32) (param $out i32) (result i32)
    (if (i32.gt_u (local.get $fd) (i32.const 2)) (then (return (i32.const 8))))
    (i64.store (local.get $out) (i64.const 2))
    (i64.store offset=8 (local.get $out) (i64.const 0))
    (i64.store offset=16 (local.get $out) (i64.const 0))
    (i32.const 0))

  ;; No preopened directories.
  (func (export "fd_prestat_get") (param i32 i32) (result i32) (i32.const 8))

  ;; poll_oneoff(in, out, nsubscriptions, nevents): every subscription fires now. A
  ;; relative clock subscription advances the virtual clock by its timeout.
  (func (export "poll_oneoff") (param $in i32) (param $out i32) (param $n i32) (param $nevents i32) (result i32)
    (local $i i32) (local $sub i32) (local $ev i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $sub (i32.add (local.get $in) (i32.mul (local.get $i) (i32.const 48))))
        (local.set $ev (i32.add (local.get $out) (i32.mul (local.get $i) (i32.const 32))))
        (i64.store (local.get $ev) (i64.load (local.get $sub)))
        (i32.store16 offset=8 (local.get $ev) (i32.const 0))
        (i32.store8 offset=10 (local.get $ev) (i32.load8_u offset=8 (local.get $sub)))
        (i64.store offset=16 (local.get $ev) (i64.const 0))
        (i64.store offset=24 (local.get $ev) (i64.const 0))
        (if (i32.eqz (i32.load8_u offset=8 (local.get $sub)))
          (then
            (if (i32.eqz (i32.and (i32.load16_u offset=40 (local.get $sub)) (i32.const 1)))
              (then (global.set $mono (i64.add (global.get $mono) (i64.load offset=24 (local.get $sub))))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.store (local.get $nevents) (local.get $n))
    (i32.const 0))

  (func (export "proc_exit") (param i32) unreachable)
  (func (export "sched_yield") (result i32) (i32.const 0))

  ;; random_get(buf, len): 8 bytes per host.random call.
  (func (export "random_get") (param $buf i32) (param $len i32) (result i32)
    (local $r i64)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (local.get $len)))
        (local.set $r (call $random))
        (block $bytes
          (loop $byte
            (br_if $bytes (i32.eqz (local.get $len)))
            (i64.store8 (local.get $buf) (local.get $r))
            (local.set $r (i64.shr_u (local.get $r) (i64.const 8)))
            (local.set $buf (i32.add (local.get $buf) (i32.const 1)))
            (local.set $len (i32.sub (local.get $len) (i32.const 1)))
            (br_if $next (i64.eqz (local.get $r)))
            (br $byte)))))
    (i32.const 0))

  ;; Everything else: no such file descriptor (fd_*, path_*, sock_*) or not supported.
  (func (export "fd_advise") (param i32) (param i64) (param i64) (param i32) (result i32) (i32.const 8))
  (func (export "fd_allocate") (param i32) (param i64) (param i64) (result i32) (i32.const 8))
  (func (export "fd_close") (param i32) (result i32) (i32.const 8))
  (func (export "fd_datasync") (param i32) (result i32) (i32.const 8))
  (func (export "fd_fdstat_set_flags") (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "fd_fdstat_set_rights") (param i32) (param i64) (param i64) (result i32) (i32.const 8))
  (func (export "fd_filestat_get") (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "fd_filestat_set_size") (param i32) (param i64) (result i32) (i32.const 8))
  (func (export "fd_filestat_set_times") (param i32) (param i64) (param i64) (param i32) (result i32) (i32.const 8))
  (func (export "fd_pread") (param i32) (param i32) (param i32) (param i64) (param i32) (result i32) (i32.const 8))
  (func (export "fd_prestat_dir_name") (param i32) (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "fd_pwrite") (param i32) (param i32) (param i32) (param i64) (param i32) (result i32) (i32.const 8))
  (func (export "fd_readdir") (param i32) (param i32) (param i32) (param i64) (param i32) (result i32) (i32.const 8))
  (func (export "fd_renumber") (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "fd_seek") (param i32) (param i64) (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "fd_sync") (param i32) (result i32) (i32.const 8))
  (func (export "fd_tell") (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "path_create_directory") (param i32) (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "path_filestat_get") (param i32) (param i32) (param i32) (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "path_filestat_set_times") (param i32) (param i32) (param i32) (param i32) (param i64) (param i64) (param i32) (result i32) (i32.const 8))
  (func (export "path_link") (param i32) (param i32) (param i32) (param i32) (param i32) (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "path_open") (param i32) (param i32) (param i32) (param i32) (param i32) (param i64) (param i64) (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "path_readlink") (param i32) (param i32) (param i32) (param i32) (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "path_remove_directory") (param i32) (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "path_rename") (param i32) (param i32) (param i32) (param i32) (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "path_symlink") (param i32) (param i32) (param i32) (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "path_unlink_file") (param i32) (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "proc_raise") (param i32) (result i32) (i32.const 52))
  (func (export "sock_accept") (param i32) (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "sock_recv") (param i32) (param i32) (param i32) (param i32) (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "sock_send") (param i32) (param i32) (param i32) (param i32) (param i32) (result i32) (i32.const 8))
  (func (export "sock_shutdown") (param i32) (param i32) (result i32) (i32.const 8))
)

fn main() -> std::process::ExitCode {
    no_core_dumps();
    more_open_files();
    bounded_allocator_retention();
    custos::cli::main()
}

/// glibc raises its mmap threshold each time a large block is freed, up to
/// 32 MiB; after the first 16 MiB pack buffer is freed, every chunk and pack
/// buffer comes from the per-thread arenas and freed ones are kept there.
/// A backup of 1 GiB then peaked at about 200 MiB RSS for about 100 MiB live.
/// A fixed 2 MiB threshold returns pack buffers to the kernel when freed
/// (measured: same wall time, 100 MiB peak). `MALLOC_MMAP_THRESHOLD_` in the
/// environment still wins.
fn bounded_allocator_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only changes allocator tuning; called before any
        // other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        }
    }
}

/// custos holds key material in memory (CMKs read from local key files, data
/// keys): a crash must not write it to a core file (in the working
/// directory, or kept by systemd-coredump), and another process of the same
/// user must not read it through ptrace or `/proc/<pid>/mem`. No core limit,
/// and not dumpable (which also covers a `core_pattern` pipe, where the core
/// limit does not apply).
/// Raises the soft limit on open files to the hard one (an interactive
/// shell often gives 1024): a restore keeps two batches of files open, and a
/// backup a handle per directory level. The hard limit is the operator's.
fn more_open_files() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let wanted = limit.maximum.unwrap_or(1 << 20).min(1 << 20);
    if limit.current.is_some_and(|current| current < wanted) {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(wanted),
                maximum: limit.maximum,
            },
        );
    }
}

fn no_core_dumps() {
    #[cfg(target_os = "linux")]
    // SAFETY: setrlimit and prctl take plain values and only change this
    // process's own limits and flags; called before any other thread exists.
    unsafe {
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

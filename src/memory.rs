//! Hands back what only start-up used, once Strait serves: the allocator's cached heap pages,
//! and the mapped pages of code and read-only data (the binary's and its libraries') that
//! start-up touched and serving will not run again (BENCHMARKS.md, "Memory").

use std::fs::File;
use std::io::{BufRead, BufReader};

/// Call once start-up is over and the listeners serve. Code and data unmapped here stay in the
/// page cache: the next instruction or read that needs a page maps it again, at the cost of a
/// minor fault.
pub fn release_startup_memory() {
    collect_heap();
    let ranges = match File::open("/proc/self/smaps") {
        Ok(f) => read_only_file_mappings(BufReader::with_capacity(4096, f)),
        Err(e) => {
            tracing::debug!("cannot read /proc/self/smaps: {e}");
            Vec::new()
        }
    };
    // Everything else comes before the first page is unmapped (reading smaps, the log line):
    // code run after it is mapped straight back.
    let bytes: usize = ranges.iter().map(|&(s, e)| e - s).sum();
    tracing::info!(
        "start-up done: unmapping {} KiB of read-only code and data ({} mappings)",
        bytes / 1024,
        ranges.len()
    );
    for &(start, end) in &ranges {
        unmap_pages(start, end);
    }
}

/// Start-up (decoding and translating the bootstrap, building the descriptor pool) frees
/// megabytes that mimalloc keeps in this thread's heap until later allocations here reuse
/// them, and this thread allocates little once serving: hand them back to the system.
#[allow(unsafe_code)]
fn collect_heap() {
    extern "C" {
        /// mimalloc's `mi_collect`: frees what the calling thread's heap caches, and purges
        /// what every thread has returned to the arenas.
        fn mi_collect(force: bool);
    }
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any time.
    unsafe { mi_collect(true) }
}

/// Drops the page-table entries of `[start, end)`, a private read-only file mapping with no
/// anonymous (copy-on-write) pages. A refusal (say, locked memory) only leaves them mapped.
#[allow(unsafe_code)]
fn unmap_pages(start: usize, end: usize) {
    // SAFETY: the range is a whole mapping from /proc/self/smaps that is private, not writable
    // and holds no anonymous pages, so every page equals the file's content: MADV_DONTNEED
    // only drops page-table entries, and the next access maps the same bytes from the page
    // cache. No Rust reference can observe a difference. (Mappings cannot move under us:
    // Strait never unmaps or remaps its binary or libraries.)
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
    }
}

/// The `[start, end)` ranges of mappings that are private, read-only (code or constants) and
/// backed by a file, and that hold no anonymous pages: a RELRO segment (relocated at load,
/// then made read-only) holds anonymous copies, which must stay.
fn read_only_file_mappings(mut smaps: impl BufRead) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut candidate = None;
    let mut line = String::with_capacity(256);
    loop {
        line.clear();
        match smaps.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if let Some(mapping) = mapping_header(&line) {
            candidate = mapping;
        } else if let Some(kb) = line.strip_prefix("Anonymous:") {
            if let Some(range) = candidate.take() {
                if kb.trim() == "0 kB" {
                    out.push(range);
                }
            }
        }
    }
    out
}

/// For a mapping's header line (`start-end perms offset dev inode [path]`): `Some` with its
/// range if it is a private read-only mapping of a file, `Some(None)` for any other mapping.
/// `None` for the `Key: value` lines in between.
fn mapping_header(line: &str) -> Option<Option<(usize, usize)>> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    let (_offset, _dev, inode) = (fields.next()?, fields.next()?, fields.next()?);
    let file = inode != "0" && fields.next().is_some_and(|p| p.starts_with('/'));
    let read_only_private = perms == "r-xp" || perms == "r--p";
    Some((file && read_only_private && start < end).then_some((start, end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
555555554000-555555600000 r--p 00000000 fd:01 1234 /usr/bin/strait
Size:                688 kB
Rss:                 600 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
555555600000-555555e00000 r-xp 000ac000 fd:01 1234 /usr/bin/strait
Size:               8192 kB
Anonymous:             0 kB
555555e00000-555555e48000 r--p 008ac000 fd:01 1234 /usr/bin/strait
Size:                288 kB
Anonymous:           288 kB
555555e48000-555555e4f000 rw-p 008f4000 fd:01 1234 /usr/bin/strait
Anonymous:            28 kB
7ffff7d00000-7ffff7e00000 r-xp 00028000 fd:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7ffff7f00000-7ffff7f10000 r--p 00000000 00:00 0 
Anonymous:             0 kB
7ffff7fc1000-7ffff7fc3000 r-xp 00000000 00:00 0 [vdso]
Anonymous:             0 kB
7ffff7fd0000-7ffff7fd2000 r--s 00000000 00:05 77 /dev/shm/x
Anonymous:             0 kB
";

    #[test]
    fn lists_private_read_only_file_mappings_without_anonymous_pages() {
        let got = read_only_file_mappings(SMAPS.as_bytes());
        assert_eq!(
            got,
            vec![
                (0x555555554000, 0x555555600000),
                (0x555555600000, 0x555555e00000),
                (0x7ffff7d00000, 0x7ffff7e00000),
            ]
        );
    }

    #[test]
    fn key_lines_are_not_headers() {
        assert_eq!(mapping_header("Size:                688 kB\n"), None);
        assert_eq!(mapping_header("VmFlags: rd ex mr mw me\n"), None);
        assert_eq!(mapping_header("THPeligible:    0\n"), None);
    }

    #[test]
    fn a_mapping_without_anonymous_line_is_skipped() {
        let smaps =
            "1000-2000 r-xp 0 fd:01 5 /bin/x\n3000-4000 r-xp 0 fd:01 5 /bin/x\nAnonymous: 4 kB\n";
        assert_eq!(read_only_file_mappings(smaps.as_bytes()), vec![]);
    }
}

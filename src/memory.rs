//! Hands back what only start-up used: the heap pages start-up freed, and, once serving, the
//! mapped pages of code and read-only data (the binary's and its libraries') that start-up
//! touched and serving will not run again (BENCHMARKS.md, "Memory").

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, OnceLock};

/// The whole pages of the non-writable loadable segments (code, `.rodata`, `.eh_frame`) of the
/// objects the loader mapped before `main` (the binary, libc, libm, libgcc_s, ld.so): never
/// unloaded or remapped, unlike a library `dlopen`ed later (the resolver's NSS modules, say),
/// whose mappings can change under a concurrent walk. The binary comes first.
static INITIAL_SEGMENTS: OnceLock<Vec<(usize, usize)>> = OnceLock::new();

/// Call first in `main`, before any thread starts or library loads.
pub fn note_initial_objects() {
    let page = page_size();
    let mut segments = Vec::new();
    for_each_object(&mut |base, phdrs| segments.extend(read_only_segments(base, phdrs, page)));
    let _ = INITIAL_SEGMENTS.set(segments);
}

/// Start-up (decoding and translating the bootstrap, building the descriptor pool) frees
/// megabytes that mimalloc keeps in the calling thread's heap until later allocations there
/// reuse them, and the main thread allocates little once serving: hand them back. Call on the
/// thread that ran start-up.
#[allow(unsafe_code)]
pub fn collect_heap() {
    extern "C" {
        /// mimalloc's `mi_collect`: frees what the calling thread's heap caches, and purges
        /// what every thread has returned to the arenas.
        fn mi_collect(force: bool);
    }
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any time.
    unsafe { mi_collect(true) }
}

/// Once the server is LIVE (its initial xDS fetch applied) and every worker has started its
/// accept loops, releases the pages only start-up ran ([`release_startup_pages`]). Not at all
/// if the server drains first.
pub async fn release_when_serving(
    server: Arc<strait_proxy::server::ServerShared>,
    workers: Option<Arc<strait_proxy::server::Workers>>,
) {
    tokio::task::yield_now().await;
    if !server.wait_live().await {
        return;
    }
    if let Some(w) = workers {
        w.settled().await;
    }
    release_startup_pages();
}

/// Call once serving. Drops the page-table entries of the initial objects' read-only segments
/// (code, `.rodata`, `.eh_frame`): the pages stay in the page cache, and whatever runs or
/// reads them again maps them back with a minor fault. Only mappings that hold nothing but the
/// file's bytes are touched (no anonymous copy-on-write page, none swapped out), so nothing a
/// loader, debugger or uprobe wrote is lost.
pub fn release_startup_pages() {
    let Some(segments) = INITIAL_SEGMENTS.get() else {
        return;
    };
    let clean = match File::open("/proc/self/smaps") {
        Ok(f) => clean_file_mappings(BufReader::with_capacity(4096, f)),
        Err(e) => {
            tracing::debug!("cannot read /proc/self/smaps: {e}");
            return;
        }
    };
    let mut ranges = Vec::with_capacity(64);
    for &(start, end) in segments {
        for &(cs, ce) in &clean {
            let (s, e) = (start.max(cs), end.min(ce));
            if s < e {
                ranges.push((s, e));
            }
        }
    }
    // Everything but the unmapping itself comes first (the log line too): code run after the
    // binary's pages go maps its windows straight back. The binary is the walk's first object,
    // so it goes last.
    tracing::info!(
        "start-up done: unmapping {} KiB of read-only code and data (mapped file pages: {} KiB)",
        ranges.iter().map(|(s, e)| e - s).sum::<usize>() / 1024,
        rss_file_kib().unwrap_or(0),
    );
    let refused = ranges
        .iter()
        .rev()
        .filter(|&&(s, e)| !unmap_pages(s, e))
        .count();
    if refused > 0 {
        tracing::debug!("{refused} of {} ranges stayed mapped", ranges.len());
    }
}

/// Drops the page-table entries of `[start, end)`; false if the kernel refused (say, locked
/// memory), which leaves them mapped.
#[allow(unsafe_code)]
fn unmap_pages(start: usize, end: usize) -> bool {
    // SAFETY: the range lies in a non-writable PT_LOAD segment of an object loaded before
    // `main` (so never unmapped or remapped since: segments noted then are still its own), within a private file mapping that smaps
    // showed with no anonymous or swapped-out pages: every page equals the file's content, and
    // MADV_DONTNEED only drops page-table entries; the next access maps the same bytes from
    // the page cache. No Rust reference can observe a difference.
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) == 0 }
}

#[allow(unsafe_code)]
fn page_size() -> usize {
    // SAFETY: sysconf reads a constant.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

/// Calls `f(load address, program headers)` for each object the loader has mapped, under the
/// loader's lock (no object is added or removed meanwhile), the binary first.
#[allow(unsafe_code)]
fn for_each_object(f: &mut dyn FnMut(usize, &[libc::Elf64_Phdr])) {
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: `data` is the `&mut &mut dyn FnMut` passed below, alive for the whole walk;
        // the loader passes a valid `info` whose `dlpi_phdr` points at `dlpi_phnum` headers.
        unsafe {
            let f = &mut *(data as *mut &mut dyn FnMut(usize, &[libc::Elf64_Phdr]));
            let info = &*info;
            let phdrs = if info.dlpi_phdr.is_null() {
                &[][..]
            } else {
                std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum))
            };
            f(info.dlpi_addr as usize, phdrs);
        }
        0
    }
    let mut f = f;
    // SAFETY: `each` only uses `data` as the closure reference it is, during this call.
    unsafe {
        libc::dl_iterate_phdr(Some(each), &mut f as *mut _ as *mut libc::c_void);
    }
}

/// The whole pages of an object's non-writable loadable segments. (RELRO sits in a writable
/// segment: the loader relocates it before making it read-only.)
fn read_only_segments(
    base: usize,
    phdrs: &[libc::Elf64_Phdr],
    page: usize,
) -> impl Iterator<Item = (usize, usize)> + '_ {
    phdrs
        .iter()
        .filter(|p| p.p_type == libc::PT_LOAD && p.p_flags & libc::PF_W == 0)
        .filter_map(move |p| {
            let start = base.checked_add(usize::try_from(p.p_vaddr).ok()?)?;
            let end = start.checked_add(usize::try_from(p.p_memsz).ok()?)?;
            let start = start.checked_next_multiple_of(page)?;
            let end = end - end % page;
            (start < end).then_some((start, end))
        })
}

/// `RssFile` of this process, KiB.
fn rss_file_kib() -> Option<u64> {
    let mut status = String::new();
    File::open("/proc/self/status")
        .ok()?
        .read_to_string(&mut status)
        .ok()?;
    let line = status.lines().find(|l| l.starts_with("RssFile:"))?;
    line.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// The `[start, end)` ranges of private, non-writable file mappings that hold only the file's
/// bytes: `Anonymous: 0 kB` (no page copied on write: a relocated or patched page, a
/// breakpoint), `Swap: 0 kB` (none of those swapped out), and no hugetlb or locked flag.
fn clean_file_mappings(mut smaps: impl BufRead) -> Vec<(usize, usize)> {
    #[derive(Default)]
    struct Mapping {
        range: Option<(usize, usize)>,
        no_anon: bool,
        no_swap: bool,
    }
    let mut out = Vec::new();
    let mut cur = Mapping::default();
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        match smaps.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if let Some(range) = mapping_header(&line) {
            cur = Mapping {
                range,
                ..Mapping::default()
            };
        } else if let Some(v) = line.strip_prefix(b"Anonymous:") {
            cur.no_anon = v.trim_ascii() == b"0 kB";
        } else if let Some(v) = line.strip_prefix(b"Swap:") {
            cur.no_swap = v.trim_ascii() == b"0 kB";
        } else if let Some(flags) = line.strip_prefix(b"VmFlags:") {
            // The block's last line.
            let special = flags
                .split(|b| b.is_ascii_whitespace())
                .any(|f| f == b"ht" || f == b"lo");
            if let (Some(range), true, true, false) = (cur.range, cur.no_anon, cur.no_swap, special)
            {
                out.push(range);
            }
            cur = Mapping::default();
        }
    }
    out
}

/// For a mapping's header line (`start-end perms offset dev inode [path]`): `Some` with its
/// range if it is a private non-writable mapping of a file, `Some(None)` for any other
/// mapping. `None` for the `Key: value` lines in between.
fn mapping_header(line: &[u8]) -> Option<Option<(usize, usize)>> {
    let mut fields = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty());
    let range = fields.next()?;
    let dash = range.iter().position(|&b| b == b'-')?;
    let hex = |s: &[u8]| usize::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok();
    let start = hex(&range[..dash])?;
    let end = hex(&range[dash + 1..])?;
    let perms = fields.next()?;
    let (_offset, _dev, inode) = (fields.next()?, fields.next()?, fields.next()?);
    let file = inode != b"0" && fields.next().is_some_and(|p| p.starts_with(b"/"));
    let read_only_private = perms == b"r-xp" || perms == b"r--p";
    Some((file && read_only_private && start < end).then_some((start, end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &[u8] = b"\
555555554000-555555600000 r--p 00000000 fd:01 1234 /usr/bin/strait
Size:                688 kB
Rss:                 600 kB
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd mr mw me sd
555555600000-555555e00000 r-xp 000ac000 fd:01 1234 /usr/bin/strait
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd ex mr mw me sd
555555e00000-555555e48000 r--p 008ac000 fd:01 1234 /usr/bin/strait
Anonymous:           288 kB
Swap:                  0 kB
VmFlags: rd mr mw me ac sd
555555e48000-555555e4f000 rw-p 008f4000 fd:01 1234 /usr/bin/strait
Anonymous:            28 kB
Swap:                  0 kB
VmFlags: rd wr mr mw me ac sd
7ffff7c00000-7ffff7c10000 r--p 00000000 fd:01 98 /usr/lib/x86_64-linux-gnu/libgcc_s.so.1
Anonymous:             0 kB
Swap:                  8 kB
VmFlags: rd mr mw me sd
7ffff7d00000-7ffff7e00000 r-xp 00028000 fd:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd ex mr mw me sd
7ffff7e00000-7ffff7e10000 r-xp 00000000 fd:01 97 /opt/locked.so
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd ex mr mw me lo sd
7ffff7f00000-7ffff7f10000 r--p 00000000 00:00 0 
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd mr mw me sd
7ffff7fc1000-7ffff7fc3000 r-xp 00000000 00:00 0 [vdso]
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd ex mr mw me de sd
7ffff7fd0000-7ffff7fd2000 r--s 00000000 00:05 77 /dev/shm/x
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd mr me ms sd
";

    #[test]
    fn only_clean_private_read_only_file_mappings() {
        assert_eq!(
            clean_file_mappings(SMAPS),
            vec![
                (0x555555554000, 0x555555600000),
                (0x555555600000, 0x555555e00000),
                (0x7ffff7d00000, 0x7ffff7e00000),
            ]
        );
    }

    #[test]
    fn a_mapping_missing_a_line_is_not_clean() {
        let smaps = b"1000-2000 r-xp 0 fd:01 5 /bin/x\nSwap: 0 kB\nVmFlags: rd ex\n\
                      3000-4000 r-xp 0 fd:01 5 /bin/x\nAnonymous: 0 kB\nVmFlags: rd ex\n\
                      5000-6000 r-xp 0 fd:01 5 /bin/x\nAnonymous: 0 kB\nSwap: 0 kB\n";
        assert_eq!(clean_file_mappings(&smaps[..]), vec![]);
    }

    #[test]
    fn paths_need_not_be_utf8_or_free_of_spaces() {
        let smaps = b"1000-2000 r-xp 0 fd:01 5 /opt/\xff dir/x (deleted)\nAnonymous: 0 kB\n\
                      Swap: 0 kB\nVmFlags: rd ex\n";
        assert_eq!(clean_file_mappings(&smaps[..]), vec![(0x1000, 0x2000)]);
    }

    #[test]
    fn key_lines_are_not_headers() {
        assert_eq!(mapping_header(b"Size:                688 kB\n"), None);
        assert_eq!(mapping_header(b"VmFlags: rd ex mr mw me\n"), None);
        assert_eq!(mapping_header(b"THPeligible:    0\n"), None);
    }

    fn load(flags: u32, vaddr: u64, memsz: u64) -> libc::Elf64_Phdr {
        libc::Elf64_Phdr {
            p_type: libc::PT_LOAD,
            p_flags: flags,
            p_offset: vaddr,
            p_vaddr: vaddr,
            p_paddr: vaddr,
            p_filesz: memsz,
            p_memsz: memsz,
            p_align: 0x1000,
        }
    }

    #[test]
    fn whole_pages_of_non_writable_segments() {
        const R: u32 = libc::PF_R;
        let phdrs = [
            load(R, 0, 0x5c080),
            load(R | libc::PF_X, 0x5d000, 0x700800),
            load(R | libc::PF_W, 0x75e000, 0x4000),
            libc::Elf64_Phdr {
                p_type: libc::PT_GNU_RELRO,
                ..load(R, 0x75e000, 0x3000)
            },
            load(R, 0x763100, 0x800),
        ];
        let got: Vec<_> = read_only_segments(0x5555_5555_4000, &phdrs, 0x1000).collect();
        assert_eq!(
            got,
            vec![
                (0x5555_5555_4000, 0x5555_555b_0000),
                (0x5555_555b_1000, 0x5555_55cb_1000),
            ]
        );
    }

    /// The walk sees this test binary itself, with a non-writable segment holding this
    /// function's code.
    #[test]
    fn the_walk_finds_this_code() {
        let here = the_walk_finds_this_code as fn() as usize;
        let mut found = false;
        for_each_object(&mut |base, phdrs| {
            found |=
                read_only_segments(base, phdrs, page_size()).any(|(s, e)| s <= here && here < e);
        });
        assert!(found);
    }
}

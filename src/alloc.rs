//! mimalloc as the global allocator, called the way the C library's own `malloc` is.
//!
//! The `mimalloc` crate's `GlobalAlloc` sends every allocation through `mi_malloc_aligned`, whose
//! checks cost a few instructions on each call and whose blocks over 1 KiB take a slower generic
//! path (~200 instructions: a request's header maps and boxed futures are that size). An
//! alignment mimalloc gives anyway (16 bytes, and no more than the size, as std's `System` rule)
//! needs none of that: those go to `mi_malloc` (BENCHMARKS.md, "Allocator").

// The C library itself (built with the features Cargo.toml sets) comes from the `mimalloc` crate.
extern crate mimalloc as _;

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ffi::c_void;

/// mimalloc aligns every block to this (`MI_MAX_ALIGN_SIZE` on 64-bit targets).
const MIN_ALIGN: usize = 16;

extern "C" {
    fn mi_malloc(size: usize) -> *mut c_void;
    fn mi_zalloc(size: usize) -> *mut c_void;
    fn mi_realloc(p: *mut c_void, newsize: usize) -> *mut c_void;
    fn mi_free(p: *mut c_void);
    fn mi_malloc_aligned(size: usize, alignment: usize) -> *mut c_void;
    fn mi_zalloc_aligned(size: usize, alignment: usize) -> *mut c_void;
    fn mi_realloc_aligned(p: *mut c_void, newsize: usize, alignment: usize) -> *mut c_void;
}

pub struct Mi;

/// mimalloc's largest "small" block (`MI_SMALL_SIZE_MAX`): anything larger takes its generic
/// path, ~100 instructions to allocate, and freeing the last block of a page retires the page
/// (~60 more). A request's boxed future (~3 KiB) and its read buffers are such blocks, allocated
/// and freed on every request, so a worker thread keeps the last freed block of each 512-byte
/// size band for the next allocation of exactly that size.
const CACHED_MIN: usize = 128 * 8 + 1;
/// Up to 8 KiB: a worker holds at most ~70 KiB this way (one block per band).
const CACHED_MAX: usize = 8 * 1024;
const SLOTS: usize = CACHED_MAX >> 9;
/// A slot's size on threads that keep nothing: any thread but the workers, which live as long
/// as the process (a thread that ends would leak what it kept).
const OFF: usize = usize::MAX;

thread_local! {
    /// (size, block) per band; size 0 for an empty slot. No destructor: a plain TLS access.
    static KEPT: [Cell<(usize, *mut u8)>; SLOTS] =
        const { [const { Cell::new((OFF, std::ptr::null_mut())) }; SLOTS] };
}

/// Lets this thread keep freed blocks (for the worker threads, which never end before exit).
pub fn keep_freed_blocks_on_this_thread() {
    KEPT.with(|slots| {
        for slot in slots {
            if slot.get().0 == OFF {
                slot.set((0, std::ptr::null_mut()));
            }
        }
    });
}

/// The slot for blocks of `size`, if blocks of that size are kept (one comparison for the
/// others: this runs on every allocation and free).
#[inline(always)]
fn band(size: usize) -> Option<usize> {
    if size.wrapping_sub(CACHED_MIN) <= CACHED_MAX - CACHED_MIN {
        Some(((size - 1) >> 9) & (SLOTS - 1))
    } else {
        None
    }
}

/// The block of exactly `size` bytes this thread kept, if it did.
#[inline(always)]
fn take(size: usize) -> Option<*mut u8> {
    let band = band(size)?;
    KEPT.with(|slots| {
        let slot = &slots[band];
        let (kept, p) = slot.get();
        (kept == size).then(|| {
            slot.set((0, std::ptr::null_mut()));
            p
        })
    })
}

/// Keeps `p` for the next allocation of `size` in place of what its band held (the latest
/// freed wins: a block of a size seldom allocated again must not hold the slot). Returns the
/// block to free: the one displaced (null for none), or `p` when it is not kept.
#[inline(always)]
fn keep(band: usize, p: *mut u8, size: usize) -> *mut u8 {
    KEPT.with(|slots| {
        let slot = &slots[band];
        let (kept, old) = slot.get();
        if kept == OFF {
            return p;
        }
        slot.set((size, p));
        old
    })
}

#[inline(always)]
fn plain(align: usize, size: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

// SAFETY: each call forwards a layout the caller guarantees valid to the mimalloc function for
// it; blocks from either family are freed with `mi_free`, which takes both.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Mi {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            if let Some(p) = take(layout.size()) {
                return p;
            }
            unsafe { mi_malloc(layout.size()) as *mut u8 }
        } else {
            unsafe { mi_malloc_aligned(layout.size(), layout.align()) as *mut u8 }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            unsafe { mi_zalloc(layout.size()) as *mut u8 }
        } else {
            unsafe { mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8 }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Only blocks `alloc` could hand out again for this layout are kept: aligned to 16,
        // which is all `plain` asks of a size over 1 KiB.
        if let (Some(band), true) = (band(layout.size()), layout.align() <= MIN_ALIGN) {
            let free = keep(band, ptr, layout.size());
            if !free.is_null() {
                unsafe { mi_free(free as *mut c_void) }
            }
            return;
        }
        unsafe { mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align(), new_size) {
            unsafe { mi_realloc(ptr as *mut c_void, new_size) as *mut u8 }
        } else {
            unsafe { mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8 }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a thread that keeps freed blocks, a freed block is the next one of exactly its size;
    /// another size, a full slot, or a thread that keeps nothing goes to mimalloc.
    #[test]
    fn freed_medium_blocks_are_reused_by_size() {
        let a = Mi;
        let layout = |n| Layout::from_size_align(n, 8).unwrap_or_else(|e| panic!("{e}"));
        let (l3k, l2k, l3k1) = (layout(3000), layout(2000), layout(3001));
        // SAFETY: valid layouts; every block is written within its size and freed once.
        #[allow(unsafe_code)]
        unsafe {
            // This thread does not keep blocks yet.
            let p = a.alloc(l3k);
            a.dealloc(p, l3k);
            assert!(take(3000).is_none());

            keep_freed_blocks_on_this_thread();
            let p = a.alloc(l3k);
            p.write_bytes(1, 3000);
            a.dealloc(p, l3k);
            let q = a.alloc(l2k);
            assert_ne!(q, p, "another size does not take it");
            let other = a.alloc(l3k1);
            assert_ne!(other, p, "nor does another size in the same band");
            let r = a.alloc(l3k);
            assert_eq!(r, p, "the same size does");
            let fresh = a.alloc(l3k);
            assert_ne!(fresh, r);
            a.dealloc(r, l3k);
            // The latest freed takes the band's slot; the one it displaces goes to mimalloc.
            fresh.write_bytes(2, 3000);
            a.dealloc(fresh, l3k);
            assert_eq!(a.alloc(l3k), fresh);
            a.dealloc(other, l3k1);
            assert!(take(3000).is_none(), "displaced by a block of another size");
            let other = a.alloc(l3k1);
            let r = fresh;
            // Another thread keeps nothing unless told to.
            let addr = r as usize;
            std::thread::spawn(move || {
                Mi.dealloc(addr as *mut u8, l3k);
                assert!(take(3000).is_none());
            })
            .join()
            .unwrap_or_else(|_| panic!("thread"));
            a.dealloc(q, l2k);
            a.dealloc(other, l3k1);
        }
    }

    #[test]
    fn blocks_keep_their_alignment_through_both_paths() {
        let a = Mi;
        for (size, align) in [
            (1, 1),
            (8, 8),
            (24, 8),
            (2000, 16),
            (64, 64),
            (8, 16),
            (4096, 4096),
        ] {
            let l = Layout::from_size_align(size, align).unwrap_or_else(|e| panic!("{e}"));
            // SAFETY: a valid non-zero layout; the block is written, grown and freed once.
            #[allow(unsafe_code)]
            unsafe {
                let p = a.alloc(l);
                assert!(
                    !p.is_null() && (p as usize).is_multiple_of(align),
                    "{size}/{align}"
                );
                p.write_bytes(0xab, size);
                let q = a.realloc(p, l, size * 3);
                assert!(
                    !q.is_null() && (q as usize).is_multiple_of(align),
                    "{size}/{align} grown"
                );
                assert_eq!(*q.add(size - 1), 0xab);
                a.dealloc(q, Layout::from_size_align(size * 3, align).unwrap_or(l));
                let z = a.alloc_zeroed(l);
                assert!((z as usize).is_multiple_of(align) && *z.add(size - 1) == 0);
                a.dealloc(z, l);
            }
        }
    }
}

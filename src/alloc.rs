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
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
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

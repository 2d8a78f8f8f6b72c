//! Stage 1 of the sparse convolution: find the tiles of a spike tensor that hold any non-zero.
//!
//! The input is `[planes, H, W]` (planes = N·C, with T already folded into N), cut into
//! `block × block` tiles; tiles on the right and bottom edges are clipped to the image. For each
//! tile the kernel writes a flag (1 = some element is non-zero, NaN included) and appends the
//! tile's linear index to a compact list of active tiles. The list's order is unspecified (the
//! append is atomic); its content and the count are exact.

/// How a `[planes, H, W]` tensor is cut into tiles. Tiles are numbered plane-major, then tile row,
/// then tile column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileGrid {
    pub planes: u32,
    pub height: u32,
    pub width: u32,
    pub block: u32,
}

/// The element rectangle of one tile, clipped to the image: rows `row0..row1`, cols `col0..col1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileBounds {
    pub plane: u32,
    pub row0: u32,
    pub row1: u32,
    pub col0: u32,
    pub col1: u32,
}

impl TileGrid {
    /// `block` must be non-zero; the host checks before it builds a grid.
    pub const fn new(planes: u32, height: u32, width: u32, block: u32) -> Self {
        Self {
            planes,
            height,
            width,
            block,
        }
    }

    pub const fn tiles_per_column(&self) -> u32 {
        self.height.div_ceil(self.block)
    }

    pub const fn tiles_per_row(&self) -> u32 {
        self.width.div_ceil(self.block)
    }

    pub const fn tiles_per_plane(&self) -> u32 {
        self.tiles_per_column() * self.tiles_per_row()
    }

    pub const fn tile_count(&self) -> u32 {
        self.planes * self.tiles_per_plane()
    }

    /// Bounds of tile `tile` (which must be `< tile_count()`).
    #[inline(always)]
    pub const fn bounds(&self, tile: u32) -> TileBounds {
        let per_plane = self.tiles_per_plane();
        let per_row = self.tiles_per_row();
        let plane = tile / per_plane;
        let in_plane = tile % per_plane;
        let row0 = (in_plane / per_row) * self.block;
        let col0 = (in_plane % per_row) * self.block;
        let row1 = if row0 + self.block < self.height {
            row0 + self.block
        } else {
            self.height
        };
        let col1 = if col0 + self.block < self.width {
            col0 + self.block
        } else {
            self.width
        };
        TileBounds {
            plane,
            row0,
            row1,
            col0,
            col1,
        }
    }

    /// Offset of element (plane, row, col) in the contiguous `[planes, H, W]` tensor.
    #[inline(always)]
    pub const fn offset(&self, plane: u32, row: u32, col: u32) -> usize {
        (plane as usize * self.height as usize + row as usize) * self.width as usize + col as usize
    }
}

/// A prescan entry point in the PTX module and the tile size it was instantiated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrescanVariant {
    pub block: u32,
    pub entry: &'static str,
}

/// Threads per CUDA block of every prescan launch: one warp per tile, 8 tiles per block.
pub const PRESCAN_THREADS_PER_BLOCK: u32 = 256;
/// Tiles one CUDA block of the prescan covers.
pub const PRESCAN_TILES_PER_BLOCK: u32 = PRESCAN_THREADS_PER_BLOCK / 32;

/// One warp per tile: each lane tests a strided share of the tile's elements, the warp votes,
/// and lane 0 writes the flag and appends active tiles.
///
/// # Safety
/// `input` holds `planes·height·width` floats; `flags` and `active` hold `tile_count()` slots;
/// `active_count` starts at 0. Launch with `PRESCAN_THREADS_PER_BLOCK` threads per block and
/// `ceil(tile_count / PRESCAN_TILES_PER_BLOCK)` blocks.
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
pub unsafe fn prescan_warp_per_tile<const BLOCK: u32>(
    input: *const f32,
    planes: u32,
    height: u32,
    width: u32,
    flags: *mut u32,
    active: *mut u32,
    active_count: *mut u32,
) {
    use crate::gpu;
    let grid = TileGrid::new(planes, height, width, BLOCK);
    let lane = gpu::thread_x() % gpu::WARP_SIZE;
    let tile = gpu::block_x() * PRESCAN_TILES_PER_BLOCK + gpu::thread_x() / gpu::WARP_SIZE;
    // Whole warps leave together, so the vote below always sees a full warp.
    if tile >= grid.tile_count() {
        return;
    }
    let b = grid.bounds(tile);
    let mut any = false;
    let mut e = lane;
    while e < BLOCK * BLOCK {
        let row = b.row0 + e / BLOCK;
        let col = b.col0 + e % BLOCK;
        if row < b.row1 && col < b.col1 {
            any |= *input.add(grid.offset(b.plane, row, col)) != 0.0;
        }
        e += gpu::WARP_SIZE;
    }
    let any = gpu::warp_any(any);
    if lane == 0 {
        *flags.add(tile as usize) = any as u32;
        if any {
            let slot = gpu::atomic_add_u32(active_count, 1);
            *active.add(slot as usize) = tile;
        }
    }
}

macro_rules! prescan_variants {
    ($($entry:ident => block $block:literal),+ $(,)?) => {
        $(
            #[cfg(target_arch = "nvptx64")]
            #[no_mangle]
            pub unsafe extern "ptx-kernel" fn $entry(
                input: *const f32,
                planes: u32,
                height: u32,
                width: u32,
                flags: *mut u32,
                active: *mut u32,
                active_count: *mut u32,
            ) {
                prescan_warp_per_tile::<$block>(input, planes, height, width, flags, active, active_count)
            }
        )+
        /// Every prescan entry point in the PTX module.
        pub const PRESCAN_VARIANTS: &[PrescanVariant] = &[
            $(PrescanVariant { block: $block, entry: stringify!($entry) }),+
        ];
    };
}

prescan_variants! {
    prescan_block4 => block 4,
    prescan_block8 => block 8,
    prescan_block16 => block 16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_image_exactly_once() {
        for &(h, w, block) in &[
            (7, 9, 8),
            (16, 16, 16),
            (17, 33, 16),
            (1, 1, 8),
            (56, 56, 16),
        ] {
            let grid = TileGrid::new(3, h, w, block);
            let mut hits = vec![0u8; (3 * h * w) as usize];
            for tile in 0..grid.tile_count() {
                let b = grid.bounds(tile);
                assert!(b.row1 - b.row0 <= block && b.col1 - b.col0 <= block);
                for r in b.row0..b.row1 {
                    for c in b.col0..b.col1 {
                        hits[grid.offset(b.plane, r, c)] += 1;
                    }
                }
            }
            assert!(hits.iter().all(|&n| n == 1), "{h}x{w} block {block}");
        }
    }

    #[test]
    fn variants_are_distinct_blocks() {
        let mut blocks: Vec<u32> = PRESCAN_VARIANTS.iter().map(|v| v.block).collect();
        blocks.dedup();
        assert_eq!(blocks.len(), PRESCAN_VARIANTS.len());
    }
}

//! The block size of each sparse convolution: the side of the output tile one GPU thread block
//! computes (and whose input window it checks for silence before doing any work).
//!
//! The seed library's rule was H ≥ 56 → 16, 14 ≤ H < 56 → 8, smaller → no block prescan.
//! Measured on the H200 with `sparseflow bench-layer --device cuda --block B` (batch 128, 5%
//! spikes; README, "GPU results"), smaller tiles win because they give the SM more thread blocks
//! to switch between: 3×3 64→64 @56 took 0.74 ms with 16×16 tiles, 0.41 ms with 8×8 and 0.43 ms
//! with 4×4; 3×3 256→256 @14 took 0.62 ms with 8×8 and 0.43 ms with 4×4.
//!
//! Since the kernel bit-packs its own input window, 28-row maps gain from 4×4 tiles too (H100,
//! batch 128, 5% spikes, `--pattern clustered` as live maps are, 4×4 against 8×8 in one process:
//! 3×3 128→128 @28 0.229 against 0.268 ms, 128→256 stride 2 0.149 against 0.177, 1×1 128→256
//! stride 2 0.064 against 0.075), while 56-row maps keep 8×8 (3×3 64→64 @56 0.226 against
//! 0.313). Hence 8×8 from 56 rows up and 4×4 below. This is the one place to change when new
//! measurements say otherwise.

/// `None` means no block preference: the smallest tile.
pub type BlockSize = Option<usize>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSelector {
    /// Maps at least this tall use 8×8 tiles; smaller ones 4×4.
    pub tile8_from: usize,
}

impl Default for BlockSelector {
    fn default() -> Self {
        Self { tile8_from: 56 }
    }
}

impl BlockSelector {
    pub fn select(&self, height: usize) -> BlockSize {
        if height >= self.tile8_from {
            Some(8)
        } else {
            Some(4)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_rule() {
        let s = BlockSelector::default();
        assert_eq!(s.select(224), Some(8));
        assert_eq!(s.select(56), Some(8));
        assert_eq!(s.select(28), Some(4));
        assert_eq!(s.select(14), Some(4));
        assert_eq!(s.select(7), Some(4));
    }
}

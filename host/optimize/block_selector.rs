//! The prescan block size of each sparse convolution, from its input feature map.
//!
//! The rule is the seed library's: large maps (H ≥ 56) use 16×16 tiles, mid-sized ones
//! (14 ≤ H < 56) 8×8, and small ones none (below 14 a tile covers most of the map, so the
//! prescan cannot skip anything worth its cost). This is the one place to change when
//! measurements show a better rule.

/// `None` means no block prescan: the sparse kernel works from element-level masks alone.
pub type BlockSize = Option<usize>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSelector {
    /// Maps at least this tall use 16×16 tiles.
    pub large_from: usize,
    /// Maps at least this tall (and below `large_from`) use 8×8 tiles.
    pub medium_from: usize,
}

impl Default for BlockSelector {
    fn default() -> Self {
        Self {
            large_from: 56,
            medium_from: 14,
        }
    }
}

impl BlockSelector {
    pub fn select(&self, height: usize) -> BlockSize {
        if height >= self.large_from {
            Some(16)
        } else if height >= self.medium_from {
            Some(8)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_rule() {
        let s = BlockSelector::default();
        assert_eq!(s.select(224), Some(16));
        assert_eq!(s.select(56), Some(16));
        assert_eq!(s.select(28), Some(8));
        assert_eq!(s.select(14), Some(8));
        assert_eq!(s.select(7), None);
    }
}

//! Prescan, stage 1 of the sparse convolution: which `block × block` tiles of a spike tensor hold
//! any non-zero value, as per-tile flags and a compact list of active tiles.
//!
//! [`prescan_cpu`] is the reference; [`DevicePrescan`] runs the `kernels-gpu` kernel of the same
//! name on CUDA. Both use the kernel crate's [`TileGrid`] for the index math.
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::cuda::CudaBackend;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
pub use sparseflow_kernels::prescan::{
    PrescanVariant, TileGrid, PRESCAN_THREADS_PER_BLOCK, PRESCAN_TILES_PER_BLOCK, PRESCAN_VARIANTS,
};

/// The result of a prescan on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prescan {
    pub grid: TileGrid,
    /// One entry per tile: 1 when the tile holds a non-zero (or NaN) element, else 0.
    pub flags: Vec<u32>,
    /// Linear indices of the active tiles, ascending.
    pub active_tiles: Vec<u32>,
}

impl Prescan {
    /// Fraction of tiles that are entirely zero.
    pub fn zero_tile_ratio(&self) -> f64 {
        let total = self.flags.len();
        if total == 0 {
            return 0.0;
        }
        (total - self.active_tiles.len()) as f64 / total as f64
    }
}

/// The tiling of `input` (`[N, C, H, W]` or `[T, N, C, H, W]`) into `block × block` tiles.
pub fn tile_grid(input: &Tensor, block: usize) -> Result<TileGrid> {
    let (planes, h, w) = input.as_planes()?;
    if block == 0 {
        return Err(Error::InvalidArgument(
            "prescan block size must be > 0".into(),
        ));
    }
    let fits = |v: usize| u32::try_from(v).ok();
    let grid = match (fits(planes), fits(h), fits(w), fits(block)) {
        (Some(p), Some(h), Some(w), Some(b)) => TileGrid::new(p, h, w, b),
        _ => {
            return Err(Error::Shape(format!(
                "{:?} is too large to tile",
                input.shape()
            )))
        }
    };
    if (grid.planes as u64) * (grid.tiles_per_plane() as u64) > u32::MAX as u64 {
        return Err(Error::Shape(format!(
            "{:?} has too many tiles",
            input.shape()
        )));
    }
    Ok(grid)
}

/// The CPU reference prescan.
pub fn prescan_cpu(input: &Tensor, block: usize) -> Result<Prescan> {
    let grid = tile_grid(input, block)?;
    let data = input.data();
    let flags: Vec<u32> = (0..grid.tile_count())
        .map(|tile| {
            let b = grid.bounds(tile);
            let any = (b.row0..b.row1).any(|r| {
                let row = grid.offset(b.plane, r, b.col0)..grid.offset(b.plane, r, b.col1);
                data[row].iter().any(|&v| v != 0.0)
            });
            any as u32
        })
        .collect();
    let active_tiles = (0..grid.tile_count())
        .filter(|&t| flags[t as usize] != 0)
        .collect();
    Ok(Prescan {
        grid,
        flags,
        active_tiles,
    })
}

/// The compiled GPU variant for `block`, if there is one.
pub fn variant_for_block(block: u32) -> Result<PrescanVariant> {
    PRESCAN_VARIANTS
        .iter()
        .copied()
        .find(|v| v.block == block)
        .ok_or_else(|| {
            Error::MissingKernelVariant(format!(
                "prescan with block {block} (compiled: {:?})",
                PRESCAN_VARIANTS.iter().map(|v| v.block).collect::<Vec<_>>()
            ))
        })
}

/// Prescan buffers on a CUDA device. Allocate once per shape, then [`run`](Self::run) per input.
pub struct DevicePrescan {
    pub grid: TileGrid,
    variant: PrescanVariant,
    /// Per-tile flags, as in [`Prescan::flags`].
    pub flags: CudaSlice<u32>,
    /// The first `active_count` entries are the active tiles, in no particular order.
    pub active_tiles: CudaSlice<u32>,
    /// One element: how many tiles are active.
    pub active_count: CudaSlice<u32>,
}

impl DevicePrescan {
    pub fn new(backend: &CudaBackend, grid: TileGrid) -> Result<Self> {
        let variant = variant_for_block(grid.block)?;
        let stream = backend.stream();
        let tiles = grid.tile_count().max(1) as usize;
        Ok(Self {
            grid,
            variant,
            // SAFETY: the kernel writes every flag and the first `active_count` list entries;
            // nothing reads the rest.
            flags: unsafe { stream.alloc::<u32>(tiles)? },
            active_tiles: unsafe { stream.alloc::<u32>(tiles)? },
            active_count: stream.alloc_zeros::<u32>(1)?,
        })
    }

    /// Scans `input` (`planes·H·W` floats on the same device), asynchronously on the backend's
    /// stream.
    pub fn run(&mut self, backend: &CudaBackend, input: &CudaSlice<f32>) -> Result<()> {
        let g = self.grid;
        let expected = g.planes as usize * g.height as usize * g.width as usize;
        if input.len() != expected {
            return Err(Error::Shape(format!(
                "prescan input holds {} floats, the grid expects {expected}",
                input.len()
            )));
        }
        let stream = backend.stream();
        stream.memset_zeros(&mut self.active_count)?;
        let tiles = g.tile_count();
        if tiles == 0 {
            return Ok(());
        }
        let function = backend.function(self.variant.entry)?;
        let config = LaunchConfig {
            grid_dim: (tiles.div_ceil(PRESCAN_TILES_PER_BLOCK), 1, 1),
            block_dim: (PRESCAN_THREADS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(&function);
        launch
            .arg(input)
            .arg(&g.planes)
            .arg(&g.height)
            .arg(&g.width)
            .arg(&mut self.flags)
            .arg(&mut self.active_tiles)
            .arg(&mut self.active_count);
        // SAFETY: the argument list matches the kernel's signature, the buffers hold what the
        // kernel's contract asks (checked above and in `new`), and the config is the documented one.
        unsafe { launch.launch(config)? };
        Ok(())
    }

    /// Copies the result to the host (waiting for the stream), with the active list sorted.
    pub fn download(&self, backend: &CudaBackend) -> Result<Prescan> {
        let stream = backend.stream();
        let tiles = self.grid.tile_count() as usize;
        let mut flags = stream.clone_dtoh(&self.flags)?;
        flags.truncate(tiles);
        let count = stream.clone_dtoh(&self.active_count)?[0] as usize;
        if count > tiles {
            return Err(Error::InvalidArgument(format!(
                "prescan reported {count} active tiles of {tiles}"
            )));
        }
        let mut active_tiles = stream.clone_dtoh(&self.active_tiles.slice(0..count))?;
        active_tiles.sort_unstable();
        Ok(Prescan {
            grid: self.grid,
            flags,
            active_tiles,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{gpu_or_skip, random_spikes};

    #[test]
    fn cpu_prescan_finds_exactly_the_nonzero_tiles() {
        let mut data = vec![0.0f32; 2 * 20 * 20];
        data[0] = 1.0; // plane 0, tile (0, 0)
        data[20 * 20 + 19 * 20 + 19] = 2.0; // plane 1, bottom-right partial tile
        data[5 * 20 + 17] = f32::NAN; // plane 0, tile (0, 2) with block 8
        let t = Tensor::new(vec![1, 2, 20, 20], data).unwrap();
        let p = prescan_cpu(&t, 8).unwrap();
        assert_eq!(p.grid.tiles_per_plane(), 9);
        assert_eq!(p.active_tiles, vec![0, 2, 17]);
        assert_eq!(p.flags.iter().sum::<u32>(), 3);
    }

    #[test]
    fn bad_block_and_rank_are_errors() {
        let t = Tensor::zeros(vec![2, 3, 4]);
        assert!(matches!(prescan_cpu(&t, 8), Err(Error::Shape(_))));
        let t = Tensor::zeros(vec![1, 1, 4, 4]);
        assert!(matches!(prescan_cpu(&t, 0), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            variant_for_block(5),
            Err(Error::MissingKernelVariant(_))
        ));
    }

    /// Every compiled variant against the CPU twin, on fresh random tensors including sizes that
    /// the block does not divide, with the outputs poisoned before each launch.
    #[test]
    fn gpu_prescan_matches_cpu() {
        let Some(backend) = gpu_or_skip("gpu_prescan_matches_cpu") else {
            return;
        };
        let stream = backend.stream();
        let shapes: &[[usize; 5]] = &[
            [1, 1, 1, 1, 1],
            [1, 2, 3, 16, 16],
            [2, 3, 5, 17, 23],
            [4, 8, 16, 56, 56],
            [1, 1, 3, 7, 100],
            [2, 4, 64, 28, 28],
        ];
        let densities = [0.0, 0.001, 0.01, 0.05, 0.5, 1.0];
        let mut seed = 0xC0FFEE_u64;
        let mut checked = 0;
        for shape in shapes {
            for &density in &densities {
                seed += 1;
                let input = random_spikes(shape, density, seed);
                let device_input = stream.clone_htod(input.data()).unwrap();
                for variant in PRESCAN_VARIANTS {
                    let want = prescan_cpu(&input, variant.block as usize).unwrap();
                    let mut scan = DevicePrescan::new(&backend, want.grid).unwrap();
                    let poison = vec![0xDEAD_BEEF_u32; scan.flags.len()];
                    stream.memcpy_htod(&poison, &mut scan.flags).unwrap();
                    stream.memcpy_htod(&poison, &mut scan.active_tiles).unwrap();
                    stream
                        .memcpy_htod(&[0xDEAD_BEEF_u32], &mut scan.active_count)
                        .unwrap();
                    scan.run(&backend, &device_input).unwrap();
                    let got = scan.download(&backend).unwrap();
                    assert_eq!(
                        got, want,
                        "shape {shape:?} density {density} block {}",
                        variant.block
                    );
                    checked += 1;
                }
            }
        }
        println!(
            "gpu_prescan_matches_cpu: {checked} cases equal on {}",
            backend.name()
        );
    }
}

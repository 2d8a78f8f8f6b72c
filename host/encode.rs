//! Encoders that turn images `[N, C, H, W]` into multi-step inputs `[T, N, C, H, W]`.
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::testing::SplitMix64;

/// How an image becomes T steps of network input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// The image itself at every step (the first conv sees real values).
    Direct,
    /// Independent Bernoulli spikes with probability = pixel intensity (clamped to [0, 1]).
    Poisson { seed: u64 },
}

impl Encoding {
    pub fn encode(&self, image: &Tensor, timesteps: usize) -> Result<Tensor> {
        if image.shape().len() != 4 {
            return Err(Error::Shape(format!(
                "encoders take [N, C, H, W] images, got {:?}",
                image.shape()
            )));
        }
        if timesteps == 0 {
            return Err(Error::InvalidArgument("timesteps must be > 0".into()));
        }
        let mut shape = vec![timesteps];
        shape.extend_from_slice(image.shape());
        let data = match *self {
            Encoding::Direct => image.data().repeat(timesteps),
            Encoding::Poisson { seed } => {
                let mut rng = SplitMix64::new(seed);
                (0..timesteps)
                    .flat_map(|_| image.data().iter())
                    .map(|&p| (rng.next_f32() < p.clamp(0.0, 1.0)) as u32 as f32)
                    .collect()
            }
        };
        Tensor::new(shape, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_rate_follows_intensity_and_is_reproducible() {
        let image = Tensor::new(vec![1, 1, 100, 100], vec![0.3; 10_000]).unwrap();
        let enc = Encoding::Poisson { seed: 9 };
        let a = enc.encode(&image, 4).unwrap();
        assert_eq!(a, enc.encode(&image, 4).unwrap());
        let rate = 1.0 - a.zero_fraction();
        assert!((rate - 0.3).abs() < 0.02, "rate {rate}");
        let d = Encoding::Direct.encode(&image, 2).unwrap();
        assert_eq!(d.shape(), &[2, 1, 1, 100, 100]);
        assert!(Encoding::Direct
            .encode(&Tensor::zeros(vec![3, 4]), 2)
            .is_err());
    }
}

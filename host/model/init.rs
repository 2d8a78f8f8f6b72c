//! Reproducible weights and BatchNorm calibration.
//!
//! [`seeded_values`] is a generator shared, bit for bit, with `scripts/make_golden_fixtures.py`:
//! conv and linear weights are drawn from it on both sides, so the golden fixtures need not carry
//! them. For tensor `name` and base seed `s`, element `i` is SplitMix64's `i`-th output `z` from the
//! state `fnv1a64(name) ^ s`, mapped to `(2u − 1)·bound` with `u = (z >> 40) / 2^24` in float64,
//! rounded to float16 and widened to float32.
//!
//! [`calibrate_batchnorm`] sets every BatchNorm's running statistics to the batch statistics of
//! its input on sample data, layer after layer, so that each normalised pre-activation has zero
//! mean and unit variance, as in a trained network, and the spiking layers are alive.
use crate::error::Result;
use crate::graph::Graph;
use crate::ops::batch_norm::BatchNorm2d;
use crate::ops::conv2d::Conv2d;
use crate::ops::linear::Linear;
use crate::ops::neuron::ParametricLIFNode;
use crate::tensor::Tensor;

/// FNV-1a, 64 bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `n` values uniform in `[-bound, bound]`, float16-exact, for the tensor `name` (see the module
/// docs for the exact definition).
pub fn seeded_values(name: &str, base_seed: u64, n: usize, bound: f64) -> Vec<f32> {
    let state = fnv1a64(name.as_bytes()) ^ base_seed;
    (0..n as u64)
        .map(|i| {
            let mut z = state.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 40) as f64 / (1u64 << 24) as f64;
            half::f16::from_f64((2.0 * u - 1.0) * bound).to_f32()
        })
        .collect()
}

fn seeded_like(name: &str, base_seed: u64, like: &Tensor, fan_in: usize) -> Tensor {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    let values = seeded_values(name, base_seed, like.len(), bound);
    Tensor::new(like.shape().to_vec(), values).expect("same element count")
}

/// Gives every Conv2d and Linear weight (and Linear bias) its seeded value with bound
/// `1/sqrt(fan_in)`, as PyTorch's default initialisation scales them. BatchNorm and neuron
/// parameters keep their defaults.
pub fn init_seeded(graph: &mut Graph, base_seed: u64) -> Result<()> {
    let ids: Vec<_> = graph.nodes().map(|(id, _)| id).collect();
    for id in ids {
        let node = graph.node_mut(id)?;
        let name = node.name.clone();
        if let Some(conv) = node.op.as_any_mut().downcast_mut::<Conv2d>() {
            let fan_in = conv.weight.shape()[1..].iter().product();
            conv.weight = seeded_like(&format!("{name}.weight"), base_seed, &conv.weight, fan_in);
        } else if let Some(linear) = node.op.as_any_mut().downcast_mut::<Linear>() {
            let fan_in = linear.weight.shape()[1];
            linear.weight =
                seeded_like(&format!("{name}.weight"), base_seed, &linear.weight, fan_in);
            if let Some(bias) = &mut linear.bias {
                *bias = seeded_like(&format!("{name}.bias"), base_seed, bias, fan_in);
            }
        } else if node.op.as_any().is::<ParametricLIFNode>() {
            // spikingjelly's init_tau already set `w`.
        }
    }
    Ok(())
}

/// Sets each BatchNorm's running mean and variance to the statistics of its input over
/// `sample` (all of T, N, H, W per channel), in topological order so that every layer is
/// calibrated on already-calibrated inputs.
pub fn calibrate_batchnorm(graph: &mut Graph, sample: &Tensor) -> Result<()> {
    graph.forward_prepared(sample, &mut |node, inputs| {
        let Some(bn) = node.op.as_any_mut().downcast_mut::<BatchNorm2d>() else {
            return Ok(());
        };
        let x = inputs[0];
        let (batch, chw) = x.split_trailing(3)?;
        let (c, hw) = (chw[0], chw[1] * chw[2]);
        let count = (batch * hw).max(1) as f64;
        let mut mean = vec![0.0f64; c];
        let mut sq = vec![0.0f64; c];
        for (i, plane) in x.data().chunks_exact(hw.max(1)).enumerate() {
            let ch = i % c;
            for &v in plane {
                mean[ch] += v as f64;
                sq[ch] += v as f64 * v as f64;
            }
        }
        for ch in 0..c {
            let m = mean[ch] / count;
            let var = (sq[ch] / count - m * m).max(0.0);
            bn.running_mean.data_mut()[ch] = m as f32;
            bn.running_var.data_mut()[ch] = var as f32;
        }
        Ok(())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_fixed() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        let v = seeded_values("conv1.weight", 0, 1000, 0.5);
        assert!(v.iter().all(|x| x.abs() <= 0.5));
        assert_eq!(v, seeded_values("conv1.weight", 0, 1000, 0.5));
        assert_ne!(v, seeded_values("conv1.weight", 1, 1000, 0.5));
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / 1000.0;
        assert!(mean.abs() < 0.05);
    }
}

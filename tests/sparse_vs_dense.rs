//! Property tests: the sparse operators compute the dense operators' function on any input —
//! random shapes, strides, paddings, channel counts, densities from 0 to 100% (all-zero and
//! all-one included), binary and integer-valued inputs, random weights and biases — within 1e-5
//! relative. The sparse kernels are forced even where the dense fallback would run, and both
//! sparse conv paths are checked: the element gather and, on binary inputs, the pattern tables.
use proptest::prelude::*;
use sparseflow::ops::linear::Linear;
use sparseflow::ops::sparse_conv2d::{BlockChoice, SparseConv2d};
use sparseflow::ops::sparse_linear::SparseLinear;
use sparseflow::ops::Operator;
use sparseflow::testing::{random_conv, random_sparse, random_uniform};
use sparseflow::Tensor;

fn assert_close(got: &Tensor, want: &Tensor) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.shape(), want.shape());
    let scale = want
        .data()
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(1e-3);
    for (g, w) in got.data().iter().zip(want.data()) {
        prop_assert!(
            (g - w).abs() <= 1e-5 * scale,
            "{} vs {} (scale {})",
            g,
            w,
            scale
        );
    }
    Ok(())
}

fn density() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(1.0), 0.0..=1.0f64, 0.0..0.1f64]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn sparse_conv_equals_dense(
        n in 1usize..3, t in 1usize..3, cin in 1usize..70, cout in 1usize..130,
        h in 1usize..12, w in 1usize..12,
        k in prop_oneof![Just(1usize), Just(2), Just(3), Just(5), Just(7)],
        stride in 1usize..3, pad in 0usize..3, dilation in 1usize..3,
        with_bias: bool, integer: bool, density in density(), seed: u64,
    ) {
        let seed = seed % (1 << 60);
        let conv = random_conv([cout, cin, k], (stride, pad, dilation), with_bias, seed);
        let x = random_sparse(&[t, n, cin, h, w], density, integer, seed + 2);
        let Ok(want) = conv.forward(&[&x]) else {
            // A geometry with no output (kernel larger than the padded input) must fail alike.
            let sparse = SparseConv2d::from_dense(&conv, BlockChoice::Fixed(None));
            prop_assert!(sparse.forward(&[&x]).is_err());
            return Ok(());
        };
        for pattern_above in [f64::INFINITY, 0.0] {
            let mut sparse = SparseConv2d::from_dense(&conv, BlockChoice::Fixed(Some(8)));
            sparse.dense_above_density = f64::INFINITY;
            sparse.pattern_above = pattern_above;
            assert_close(&sparse.forward(&[&x]).unwrap(), &want)?;
        }
    }

    /// Maps large enough to be split into bands and batches large enough for one image per task
    /// (the path where each task lists its image and then gathers it), on two threads.
    #[test]
    fn sparse_conv_equals_dense_on_banded_batches(
        images in 4usize..9, cin in 1usize..70, cout in 1usize..130,
        h in 17usize..26, w in 17usize..26,
        k in prop_oneof![Just(1usize), Just(3)],
        stride in 1usize..3, pad in 0usize..2, dilation in 1usize..3,
        with_bias: bool, integer: bool, density in density(), seed: u64,
    ) {
        let seed = seed % (1 << 60);
        let conv = random_conv([cout, cin, k], (stride, pad, dilation), with_bias, seed);
        let x = random_sparse(&[images, cin, h, w], density, integer, seed + 2);
        let want = conv.forward(&[&x]).unwrap();
        let mut sparse = SparseConv2d::from_dense(&conv, BlockChoice::Fixed(Some(8)));
        sparse.dense_above_density = f64::INFINITY;
        sparse.pattern_above = f64::INFINITY;
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        assert_close(&pool.install(|| sparse.forward(&[&x])).unwrap(), &want)?;
    }

    #[test]
    fn sparse_linear_equals_dense(
        rows in 1usize..9, features in 1usize..300, outputs in 1usize..130,
        with_bias: bool, integer: bool, density in density(), seed: u64,
    ) {
        let seed = seed % (1 << 60);
        let linear = Linear::new(
            random_uniform(&[outputs, features], -1.0, 1.0, seed),
            with_bias.then(|| random_uniform(&[outputs], -1.0, 1.0, seed + 1)),
        ).unwrap();
        let x = random_sparse(&[2, rows, features], density, integer, seed + 2);
        let mut sparse = SparseLinear::from_dense(&linear);
        sparse.dense_above_density = f64::INFINITY;
        assert_close(&sparse.forward(&[&x]).unwrap(), &linear.forward(&[&x]).unwrap())?;
    }
}

//! Sparse against dense convolution on the CPU, on the ResNet-18 and ResNet-50 layer shapes at
//! 80/90/95/99% zeros (i.i.d. binary spikes, batch 8; the sparse time includes every stage: scan,
//! gather, NCHW write).
//!
//! `cargo bench --bench sparse_conv` — for each layer and sparsity, `dense/…` and `sparse/…` run
//! back to back so both see the same machine load. Filter with e.g.
//! `cargo bench --bench sparse_conv -- r18_l1`.
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sparseflow::ops::conv2d::Conv2d;
use sparseflow::ops::sparse_conv2d::{BlockChoice, SparseConv2d};
use sparseflow::ops::Operator;
use sparseflow::testing::{random_sparse, random_uniform};

const BATCH: usize = 8;

/// Name, Cin, Cout, input H = W, kernel, stride.
const LAYERS: &[(&str, usize, usize, usize, usize, usize)] = &[
    ("r18_l1_3x3_64-64_56", 64, 64, 56, 3, 1),
    ("r18_l2_3x3s2_64-128_56", 64, 128, 56, 3, 2),
    ("r18_l2_3x3_128-128_28", 128, 128, 28, 3, 1),
    ("r18_l3_3x3_256-256_14", 256, 256, 14, 3, 1),
    ("r18_l4_3x3_512-512_7", 512, 512, 7, 3, 1),
    ("r18_down_1x1s2_128-256_28", 128, 256, 28, 1, 2),
    ("r50_l1_1x1_64-256_56", 64, 256, 56, 1, 1),
    ("r50_l1_1x1_256-64_56", 256, 64, 56, 1, 1),
    ("r50_l3_1x1_1024-256_14", 1024, 256, 14, 1, 1),
];

const ZEROS: &[f64] = &[0.80, 0.90, 0.95, 0.99];

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("sparse_conv");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for (i, &(name, cin, cout, hw, k, stride)) in LAYERS.iter().enumerate() {
        let seed = 100 * i as u64;
        let weight = random_uniform(&[cout, cin, k, k], -0.1, 0.1, seed);
        let bias = random_uniform(&[cout], -0.1, 0.1, seed + 1);
        let dense = Conv2d::new(
            weight,
            Some(bias),
            (stride, stride),
            (k / 2, k / 2),
            (1, 1),
            1,
        )
        .unwrap();
        let sparse = SparseConv2d::from_dense(&dense, BlockChoice::Fixed(None));
        for &zeros in ZEROS {
            let x = random_sparse(&[BATCH, cin, hw, hw], 1.0 - zeros, false, seed + 2);
            let id = format!("{name}/{:.0}%zeros", 100.0 * zeros);
            group.bench_function(BenchmarkId::new("dense", &id), |b| {
                b.iter(|| dense.forward(&[&x]).unwrap())
            });
            group.bench_function(BenchmarkId::new("sparse", &id), |b| {
                b.iter(|| sparse.forward(&[&x]).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

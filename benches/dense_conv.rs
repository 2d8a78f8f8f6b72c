//! Dense CPU convolution on the ResNet-18 layer shapes at batch 8, against the raw GEMM of the same
//! im2col size.
//!
//! `cargo bench --bench dense_conv` — throughput is in FLOPs (`2·N·Cout·Hout·Wout·Cin·kh·kw`), so
//! criterion's `Gelem/s` reads as GFLOP/s:
//! - `conv2d/<layer>`: `Conv2d::forward_nchw` (im2col + GEMM, all rayon threads);
//! - `gemm/<layer>`: one `gemm::gemm` call of `M = Cout`, `K = Cin·kh·kw`, `N = N·Hout·Wout`
//!   (row-major, all rayon threads), the work the convolution's GEMMs do in total.
//!
//! Each layer's two benchmarks run back to back, so both see the same machine load. Filter with
//! e.g. `cargo bench --bench dense_conv -- l1_`.
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sparseflow::ops::conv2d::Conv2d;
use sparseflow::testing::SplitMix64;
use sparseflow::Tensor;

const BATCH: usize = 8;

/// A ResNet-18 convolution: name, Cin, Cout, input H = W, kernel, stride, padding.
struct Layer(&'static str, usize, usize, usize, usize, usize, usize);

const LAYERS: &[Layer] = &[
    Layer("stem_7x7s2_3-64_224", 3, 64, 224, 7, 2, 3),
    Layer("l1_3x3_64-64_56", 64, 64, 56, 3, 1, 1),
    Layer("l2_3x3s2_64-128_56", 64, 128, 56, 3, 2, 1),
    Layer("l2_down_1x1s2_64-128_56", 64, 128, 56, 1, 2, 0),
    Layer("l2_3x3_128-128_28", 128, 128, 28, 3, 1, 1),
    Layer("l3_3x3s2_128-256_28", 128, 256, 28, 3, 2, 1),
    Layer("l3_down_1x1s2_128-256_28", 128, 256, 28, 1, 2, 0),
    Layer("l3_3x3_256-256_14", 256, 256, 14, 3, 1, 1),
    Layer("l4_3x3s2_256-512_14", 256, 512, 14, 3, 2, 1),
    Layer("l4_down_1x1s2_256-512_14", 256, 512, 14, 1, 2, 0),
    Layer("l4_3x3_512-512_7", 512, 512, 7, 3, 1, 1),
];

fn random(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.next_f32() - 0.5).collect()
}

fn configure<M: criterion::measurement::Measurement>(g: &mut criterion::BenchmarkGroup<'_, M>) {
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
}

/// Layer by layer, the convolution and then its GEMM, so that both see the same machine load.
fn bench(c: &mut Criterion) {
    let mut rng = SplitMix64::new(42);
    let threads = rayon::current_num_threads();
    for &Layer(name, cin, cout, hw, k, s, p) in LAYERS {
        let weight = Tensor::new(vec![cout, cin, k, k], random(&mut rng, cout * cin * k * k))
            .expect("weight shape");
        let conv = Conv2d::new(weight, None, (s, s), (p, p), (1, 1), 1).expect("conv");
        let (oh, ow) = conv.output_hw(hw, hw).expect("output size");
        let input = random(&mut rng, BATCH * cin * hw * hw);
        let mut out = vec![0.0f32; BATCH * cout * oh * ow];
        let flops = 2 * BATCH * cout * oh * ow * cin * k * k;

        let mut group = c.benchmark_group("conv2d");
        configure(&mut group);
        group.throughput(Throughput::Elements(flops as u64));
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                conv.forward_nchw(&input, BATCH, hw, hw, &mut out)
                    .expect("forward")
            })
        });
        group.finish();
        drop((input, out));

        // The im2col GEMM of the whole batch: [Cout × Cin·kh·kw] · [Cin·kh·kw × N·Hout·Wout].
        let (m, kk, n) = (cout, cin * k * k, BATCH * oh * ow);
        assert_eq!(2 * m * kk * n, flops);
        let lhs = random(&mut rng, m * kk);
        let rhs = random(&mut rng, kk * n);
        let mut dst = vec![0.0f32; m * n];
        let mut group = c.benchmark_group("gemm");
        configure(&mut group);
        group.throughput(Throughput::Elements(flops as u64));
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| unsafe {
                // SAFETY: dst [m×n], lhs [m×kk], rhs [kk×n], all row-major and disjoint.
                gemm::gemm(
                    m,
                    n,
                    kk,
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    lhs.as_ptr(),
                    1,
                    kk as isize,
                    rhs.as_ptr(),
                    1,
                    n as isize,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                )
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

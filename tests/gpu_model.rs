//! Every operator of the model zoo on CUDA equals its CPU twin, and whole zoo models (dense and
//! optimized) give the CPU's spikes and logits on the GPU.
//!
//! Outputs start as NaN (`set_poison_new_tensors`), and every element is compared. Element-wise
//! operators, neurons and pooling must match bit for bit; convolutions and linear layers, whose
//! sums run in another order, within 1e-5 of the largest reference value. In whole models a
//! spike may differ only where the CPU's membrane lies within 1e-5 of the threshold (a "tie"),
//! checked node by node on the GPU's own inputs; logits agree within 1e-4 relative.
//!
//! Skipped (with a notice) without a GPU; `SPARSEFLOW_REQUIRE_GPU=1` makes that a failure.
use std::sync::Arc;

use sparseflow::cuda::{set_poison_new_tensors, CudaBackend, DeviceTensor};
use sparseflow::cudnn::DenseConvEngine;
use sparseflow::graph::Graph;
use sparseflow::model::{self, init, ModelConfig, NeuronConfig, NeuronKind};
use sparseflow::ops::add_neuron::AddNeuron;
use sparseflow::ops::batch_norm::BatchNorm2d;
use sparseflow::ops::connect::{Add, ConnectFunction, SewConnect};
use sparseflow::ops::conv2d::Conv2d;
use sparseflow::ops::conv_neuron_pool::ConvNeuronPool;
use sparseflow::ops::flatten::Flatten;
use sparseflow::ops::linear::Linear;
use sparseflow::ops::neuron::{as_spiking_neuron, Firing, IFNode, LIFNode, ParametricLIFNode};
use sparseflow::ops::neuron_connect::NeuronConnect;
use sparseflow::ops::neuron_pool::NeuronMaxPool;
use sparseflow::ops::pool::{AdaptiveAvgPool2d, AvgPool2d, MaxPool2d};
use sparseflow::ops::sparse_conv2d::CudaDispatch;
use sparseflow::ops::{Operator, ValueKind};
use sparseflow::optimize::{optimize, tune_cuda, OptimizeOptions};
use sparseflow::testing::{gpu_or_skip, random_sparse, random_spikes, random_uniform};
use sparseflow::{Device, Tensor};

fn gpu(test: &str) -> Option<Arc<CudaBackend>> {
    let backend = gpu_or_skip(test)?;
    set_poison_new_tensors(true);
    Some(backend)
}

fn run_cuda(backend: &Arc<CudaBackend>, op: &dyn Operator, inputs: &[&Tensor]) -> Tensor {
    let device: Vec<DeviceTensor> = inputs
        .iter()
        .map(|t| DeviceTensor::upload(backend, t).unwrap())
        .collect();
    let refs: Vec<&DeviceTensor> = device.iter().collect();
    op.forward_cuda(&refs).unwrap().download().unwrap()
}

/// The GPU output equals the CPU output bit for bit (NaN where the CPU has NaN).
fn assert_bitwise(backend: &Arc<CudaBackend>, op: &dyn Operator, inputs: &[&Tensor]) {
    let cpu = op.forward(inputs).unwrap();
    let gpu = run_cuda(backend, op, inputs);
    assert_eq!(
        gpu.shape(),
        cpu.shape(),
        "{} {}",
        op.type_name(),
        op.describe()
    );
    for (i, (g, c)) in gpu.data().iter().zip(cpu.data()).enumerate() {
        assert!(
            g.to_bits() == c.to_bits() || (g.is_nan() && c.is_nan()),
            "{} {}: element {i}: GPU {g} vs CPU {c}",
            op.type_name(),
            op.describe()
        );
    }
}

/// The GPU output is finite and within `1e-5` of the CPU's, relative to the largest value.
fn assert_close(backend: &Arc<CudaBackend>, op: &dyn Operator, inputs: &[&Tensor]) {
    let cpu = op.forward(inputs).unwrap();
    let gpu = run_cuda(backend, op, inputs);
    assert!(
        gpu.data().iter().all(|v| v.is_finite()),
        "{}: unwritten output",
        op.describe()
    );
    let err = gpu.relative_error(&cpu).unwrap();
    assert!(
        err <= 1e-5,
        "{} {}: relative error {err:e}",
        op.type_name(),
        op.describe()
    );
}

#[test]
fn gpu_dense_convolution_and_linear_match_cpu() {
    let Some(backend) = gpu("gpu_dense_convolution_and_linear_match_cpu") else {
        return;
    };
    // (cin, cout, k, stride, padding, dilation, groups, h, w, bias)
    let geometries = [
        (3, 64, 7, 2, 3, 1, 1, 40, 37, false),
        (16, 24, 3, 1, 1, 1, 1, 9, 13, true),
        (17, 70, 1, 2, 0, 1, 1, 15, 15, true),
        (8, 8, 3, 1, 2, 2, 1, 11, 10, false),
        (12, 18, 3, 2, 1, 1, 3, 14, 9, true),
        (6, 6, 5, 1, 2, 1, 6, 8, 8, true),
    ];
    for (i, &(cin, cout, k, s, p, d, g, h, w, bias)) in geometries.iter().enumerate() {
        let seed = 100 + i as u64;
        let weight = random_uniform(&[cout, cin / g, k, k], -0.5, 0.5, seed);
        let bias = bias.then(|| random_uniform(&[cout], -1.0, 1.0, seed + 1));
        let conv = Conv2d::new(weight, bias, (s, s), (p, p), (d, d), g).unwrap();
        for shape in [vec![2, cin, h, w], vec![2, 3, cin, h, w]] {
            let x = random_uniform(&shape, -1.0, 1.0, seed + 2);
            let cpu = conv.forward(&[&x]).unwrap();
            let dx = DeviceTensor::upload(&backend, &x).unwrap();
            let mut engines = vec![DenseConvEngine::Rust];
            if sparseflow::cudnn::available() {
                engines.push(DenseConvEngine::Cudnn);
            }
            for engine in engines {
                let gpu = conv
                    .forward_cuda_with(&dx, engine)
                    .unwrap()
                    .download()
                    .unwrap();
                assert!(
                    gpu.data().iter().all(|v| v.is_finite()),
                    "{engine:?}: unwritten"
                );
                let err = gpu.relative_error(&cpu).unwrap();
                assert!(
                    err <= 1e-5,
                    "{engine:?} {}: relative error {err:e}",
                    conv.describe()
                );
            }
        }
    }
    for (features, outputs, bias) in [(512, 1000, true), (33, 7, false), (1, 65, true)] {
        let weight = random_uniform(&[outputs, features], -0.1, 0.1, 7);
        let bias = bias.then(|| random_uniform(&[outputs], -1.0, 1.0, 8));
        let linear = Linear::new(weight, bias).unwrap();
        for shape in [vec![features], vec![4, 3, features]] {
            let x = random_uniform(&shape, -1.0, 1.0, 9);
            assert_close(&backend, &linear, &[&x]);
        }
    }
    eprintln!(
        "gpu_dense_convolution_and_linear_match_cpu: passed on {}",
        backend.name()
    );
}

#[test]
fn gpu_batchnorm_neurons_pooling_and_connections_match_cpu_bitwise() {
    let Some(backend) = gpu("gpu_batchnorm_neurons_pooling_and_connections_match_cpu_bitwise")
    else {
        return;
    };
    let x = random_uniform(&[3, 2, 5, 9, 11], -1.5, 2.5, 1);
    let mut bn = BatchNorm2d::with_channels(5);
    for (k, (_, p)) in bn.params_mut().into_iter().enumerate() {
        *p = random_uniform(&[5], 0.2, 1.5, 20 + k as u64);
    }
    assert_bitwise(&backend, &bn, &[&x]);

    let firings = [
        Firing::default(),
        Firing {
            v_threshold: 0.7,
            v_reset: None,
            detach_reset: true,
        },
        Firing {
            v_threshold: 1.2,
            v_reset: Some(-0.3),
            detach_reset: false,
        },
    ];
    // A step of 990 neurons runs one per thread, one of 2^22 four per thread (vector loads);
    // 3 steps leave a partial group of the steps loaded together.
    let quads = random_uniform(&[3, 1, 4, 1024, 1024], -1.5, 2.5, 5);
    for firing in firings {
        for input in [&x, &quads] {
            assert_bitwise(&backend, &IFNode::new(firing), &[input]);
            for decay_input in [true, false] {
                let lif = LIFNode::new(1.7, decay_input, firing).unwrap();
                assert_bitwise(&backend, &lif, &[input]);
                let plif = ParametricLIFNode::new(2.3, decay_input, firing).unwrap();
                assert_bitwise(&backend, &plif, &[input]);
            }
        }
    }

    let mut with_nan = x.clone();
    with_nan.data_mut()[17] = f32::NAN;
    let pools: Vec<Box<dyn Operator>> = vec![
        Box::new(MaxPool2d::new((3, 3), (2, 2), (1, 1)).unwrap()),
        Box::new(
            MaxPool2d::new((2, 3), (1, 2), (1, 0))
                .unwrap()
                .with_ceil_mode(true),
        ),
        Box::new(
            MaxPool2d::new((3, 2), (2, 1), (1, 1))
                .unwrap()
                .with_dilation((2, 1))
                .unwrap(),
        ),
        Box::new(AvgPool2d::new((3, 3), (2, 2), (1, 1)).unwrap()),
        Box::new(
            AvgPool2d::new((3, 2), (2, 2), (1, 1))
                .unwrap()
                .with_ceil_mode(true)
                .with_count_include_pad(false),
        ),
        Box::new(
            AvgPool2d::new((2, 2), (2, 2), (0, 0))
                .unwrap()
                .with_divisor_override(Some(3))
                .unwrap(),
        ),
        Box::new(AdaptiveAvgPool2d::new((1, 1)).unwrap()),
        Box::new(AdaptiveAvgPool2d::new((4, 3)).unwrap()),
    ];
    for pool in &pools {
        assert_bitwise(&backend, pool.as_ref(), &[&x]);
        assert_bitwise(&backend, pool.as_ref(), &[&with_nan]);
    }

    // The fused neuron + max-pool: the neuron's spikes pass to the pool as bytes. Every neuron and
    // reset, pools of several windows, a map wider than a warp, NaN inputs; the 16 × 24 and 1024²
    // maps take the stem pool's four-outputs-per-thread kernel, the 1024² one also the neuron's
    // four-per-thread byte stores.
    let wide = random_uniform(&[2, 1, 3, 70, 69], -1.5, 2.5, 4);
    let stem_map = random_uniform(&[2, 2, 3, 16, 24], -1.5, 2.5, 7);
    for pool in [
        MaxPool2d::new((3, 3), (2, 2), (1, 1)).unwrap(),
        MaxPool2d::new((3, 3), (2, 2), (1, 1))
            .unwrap()
            .with_ceil_mode(true),
        MaxPool2d::new((2, 2), (2, 2), (0, 0)).unwrap(),
        MaxPool2d::new((3, 3), (1, 1), (1, 1))
            .unwrap()
            .with_dilation((2, 1))
            .unwrap(),
    ] {
        for firing in firings {
            let neurons: [Box<dyn Operator>; 3] = [
                Box::new(LIFNode::new(1.7, true, firing).unwrap()),
                Box::new(IFNode::new(firing)),
                Box::new(ParametricLIFNode::new(2.5, false, firing).unwrap()),
            ];
            for neuron in neurons {
                let op = NeuronMaxPool {
                    neuron,
                    pool: pool.clone(),
                };
                for input in [&x, &with_nan, &wide, &stem_map, &quads] {
                    assert_bitwise(&backend, &op, &[input]);
                }
            }
        }
    }

    let a = random_spikes(&[2, 3, 4, 7, 5], 0.4, 2);
    let b = random_spikes(&[2, 3, 4, 7, 5], 0.6, 3);
    assert_bitwise(&backend, &Add, &[&a, &b]);
    // The fused add + neuron: one kernel for every built-in neuron.
    let (u, w) = (&x, &random_uniform(&[3, 2, 5, 9, 11], -1.0, 1.0, 4));
    let neurons: [Box<dyn Operator>; 3] = [
        Box::new(IFNode::new(firings[2])),
        Box::new(LIFNode::new(1.7, false, firings[1]).unwrap()),
        Box::new(ParametricLIFNode::new(2.3, true, firings[0]).unwrap()),
    ];
    let (u4, w4) = (
        &quads,
        &random_uniform(&[3, 1, 4, 1024, 1024], -1.0, 1.0, 6),
    );
    for neuron in neurons {
        let op = AddNeuron { neuron };
        assert_bitwise(&backend, &op, &[u, w]);
        assert_bitwise(&backend, &op, &[u4, w4]);
    }
    // The fused neuron + SEW connect, on shortcuts of spikes and of small integers, one neuron
    // and four per thread, the spikes on either side of the function.
    let shortcut = random_sparse(u.shape(), 0.4, true, 7);
    let shortcut4 = random_sparse(u4.shape(), 0.3, false, 8);
    for (i, function) in [
        ConnectFunction::Add,
        ConnectFunction::And,
        ConnectFunction::Iand,
    ]
    .into_iter()
    .enumerate()
    {
        for spikes_first in [false, true] {
            let neuron: Box<dyn Operator> = match i {
                0 => Box::new(IFNode::new(firings[2])),
                1 => Box::new(LIFNode::new(1.7, false, firings[1]).unwrap()),
                _ => Box::new(ParametricLIFNode::new(2.3, true, firings[0]).unwrap()),
            };
            let op = NeuronConnect {
                neuron,
                function,
                spikes_first,
            };
            assert_bitwise(&backend, &op, &[u, &shortcut]);
            assert_bitwise(&backend, &op, &[u4, &shortcut4]);
        }
    }
    for function in [
        ConnectFunction::Add,
        ConnectFunction::And,
        ConnectFunction::Iand,
    ] {
        assert_bitwise(&backend, &SewConnect { function }, &[&a, &b]);
    }
    assert_bitwise(&backend, &Flatten { start_dim: 2 }, &[&x]);
    eprintln!(
        "gpu_batchnorm_neurons_pooling_and_connections_match_cpu_bitwise: passed on {}",
        backend.name()
    );
}

fn calibrated(name: &str, config: &ModelConfig, image: &Tensor) -> Graph {
    let mut g = model::build(name, config).unwrap();
    init::init_seeded(&mut g, 17).unwrap();
    init::calibrate_batchnorm(&mut g, image).unwrap();
    g
}

/// Runs `g` on the GPU and checks every node against the CPU on the GPU's own inputs, then the
/// logits against a CPU forward. Returns (spikes compared, threshold ties).
fn check_model(backend: &Arc<CudaBackend>, label: &str, g: &Graph, x: &Tensor) -> (usize, usize) {
    let (mut spikes, mut ties) = (0, 0);
    let dx = DeviceTensor::upload(backend, x).unwrap();
    let gpu_logits = g
        .forward_cuda_observed(&dx, &mut |run| {
            let inputs: Vec<Tensor> = run.inputs.iter().map(|t| t.download().unwrap()).collect();
            let refs: Vec<&Tensor> = inputs.iter().collect();
            let gpu = run.output.download()?;
            let what = format!(
                "{label}: node {} ({})",
                run.node.name,
                run.node.op.type_name()
            );
            assert!(
                gpu.data().iter().all(|v| v.is_finite()),
                "{what}: non-finite output"
            );
            if let Some(fused) = run.node.op.as_any().downcast_ref::<ConvNeuronPool>() {
                // The conv's sums differ from the CPU's in the last bits, so a spike may flip
                // where the CPU's membrane is within 1e-5 of the threshold; each flip changes at
                // most the four pooled outputs whose windows hold it.
                let pooled = fused
                    .neuron_pool
                    .as_any()
                    .downcast_ref::<NeuronMaxPool>()
                    .unwrap();
                let neuron = as_spiking_neuron(pooled.neuron.as_ref()).unwrap();
                let (cpu_spikes, charge) =
                    neuron.forward_with_charge(&fused.conv.forward(&refs)?)?;
                let cpu = pooled.pool.forward(&[&cpu_spikes])?;
                let th = neuron.firing().v_threshold;
                let near = charge
                    .data()
                    .iter()
                    .filter(|h| (*h - th).abs() <= 1e-5)
                    .count();
                let differ = gpu
                    .data()
                    .iter()
                    .zip(cpu.data())
                    .filter(|(g, c)| g != c)
                    .count();
                assert!(
                    differ <= 4 * near,
                    "{what}: {differ} pooled spikes differ, {near} ties"
                );
                spikes += cpu_spikes.len();
                ties += differ;
            } else if let Some(neuron) = as_spiking_neuron(run.node.op.as_ref()) {
                let (cpu, charge) = neuron.forward_with_charge(refs[0])?;
                let th = neuron.firing().v_threshold;
                for ((g, c), h) in gpu.data().iter().zip(cpu.data()).zip(charge.data()) {
                    spikes += 1;
                    if g != c {
                        assert!((h - th).abs() <= 1e-5, "{what}: spike differs, H = {h}");
                        ties += 1;
                    }
                }
            } else {
                let cpu = run.node.op.forward(&refs)?;
                let err = gpu.relative_error(&cpu)?;
                // Long sums (1×1 convs over 2048 channels) run in another order: looser than one op.
                assert!(err <= 1e-4, "{what}: relative error {err:e}");
            }
            Ok(())
        })
        .unwrap()
        .download()
        .unwrap();
    let cpu_logits = g.forward(x).unwrap();
    let err = gpu_logits.relative_error(&cpu_logits).unwrap();
    assert!(err <= 1e-4, "{label}: logits differ by {err:e}");
    (spikes, ties)
}

#[test]
fn gpu_zoo_models_match_cpu_dense_and_optimized() {
    let Some(backend) = gpu("gpu_zoo_models_match_cpu_dense_and_optimized") else {
        return;
    };
    let image = random_uniform(&[2, 2, 3, 32, 32], 0.0, 1.0, 5);
    let plif = NeuronConfig {
        kind: NeuronKind::Plif {
            init_tau: 2.0,
            decay_input: false,
        },
        firing: Firing {
            v_threshold: 1.0,
            v_reset: None,
            detach_reset: false,
        },
    };
    let cases = [
        (
            "spiking_resnet18",
            ConnectFunction::Add,
            NeuronConfig::default(),
        ),
        ("spiking_resnet18", ConnectFunction::Add, plif),
        (
            "sew_resnet18",
            ConnectFunction::Add,
            NeuronConfig::default(),
        ),
        (
            "sew_resnet18",
            ConnectFunction::Iand,
            NeuronConfig::default(),
        ),
        (
            "spiking_resnet50",
            ConnectFunction::Add,
            NeuronConfig::default(),
        ),
    ];
    for (name, connect, neuron) in cases {
        let config = ModelConfig {
            num_classes: 10,
            connect,
            neuron,
        };
        let mut g = calibrated(name, &config, &image);
        let label = format!("{name} {connect:?} {:?}", neuron.kind);
        let (spikes, ties) = check_model(&backend, &format!("{label} dense"), &g, &image);
        let options = OptimizeOptions {
            device: Device::Cuda(backend.ordinal()),
            ..OptimizeOptions::default()
        };
        optimize(&mut g, &options).unwrap();
        let (o_spikes, o_ties) = check_model(&backend, &format!("{label} optimized"), &g, &image);
        // Spike-encoded images: the stem conv is sparse too, fused with its neuron and pool.
        let mut g = calibrated(name, &config, &image);
        let options = OptimizeOptions {
            input_kind: ValueKind::Binary,
            ..options
        };
        optimize(&mut g, &options).unwrap();
        let stem = g.node(g.find("sn1").unwrap()).unwrap();
        assert_eq!(stem.op.type_name(), "ConvNeuronPool", "{label}");
        let spikes_in = random_spikes(image.shape(), 0.5, 6);
        check_model(&backend, &format!("{label} spike input"), &g, &spikes_in);
        eprintln!(
            "{label}: dense {spikes} spikes compared, {ties} ties; optimized {o_spikes} spikes, \
             {o_ties} ties; on {}",
            backend.name()
        );
    }
}

/// Larger maps select the 8×8-tile kernels (the 32×32 models above run the 4×4 ones), and a
/// longer T and a larger batch exercise the indexing.
#[test]
fn gpu_resnet18_at_112_pixels_matches_cpu() {
    let Some(backend) = gpu("gpu_resnet18_at_112_pixels_matches_cpu") else {
        return;
    };
    let image = random_uniform(&[4, 3, 3, 112, 112], 0.0, 1.0, 6);
    for name in ["spiking_resnet18", "sew_resnet18"] {
        let config = ModelConfig {
            num_classes: 10,
            ..ModelConfig::default()
        };
        let mut g = calibrated(name, &config, &image);
        let options = OptimizeOptions {
            device: Device::Cuda(backend.ordinal()),
            input_hw: Some((112, 112)),
            ..OptimizeOptions::default()
        };
        optimize(&mut g, &options).unwrap();
        let (spikes, ties) = check_model(&backend, &format!("{name} 112 optimized"), &g, &image);
        eprintln!("{name} at 112x112, optimized: {spikes} spikes compared, {ties} ties");
        // After the measured pass some layers run the dense engine: still the same function.
        let sample = random_uniform(&[4, 3, 3, 112, 112], 0.0, 1.0, 7);
        let tuned = tune_cuda(&g, &DeviceTensor::upload(&backend, &sample).unwrap()).unwrap();
        assert_eq!(tuned.len(), 19);
        let dense = tuned
            .iter()
            .filter(|t| t.tuning.choice == CudaDispatch::Dense)
            .count();
        let (spikes, ties) = check_model(&backend, &format!("{name} 112 tuned"), &g, &image);
        eprintln!(
            "{name} at 112x112, tuned ({dense} of 19 convs dense): {spikes} spikes, {ties} ties"
        );
    }
}

/// Diagnostic (run with `--ignored`): where do the GPU's dense and optimized models first
/// disagree at `SPARSEFLOW_DIAG_BATCH` × 224²? Prints, per neuron layer, the differing spikes.
#[test]
#[ignore]
fn gpu_dense_vs_optimized_divergence() {
    let Some(backend) = gpu("gpu_dense_vs_optimized_divergence") else {
        return;
    };
    let batch: usize = std::env::var("SPARSEFLOW_DIAG_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let image = random_uniform(&[4, batch, 3, 224, 224], 0.0, 1.0, 6);
    let dense = calibrated("spiking_resnet18", &ModelConfig::default(), &image);
    let mut sparse = calibrated("spiking_resnet18", &ModelConfig::default(), &image);
    let options = OptimizeOptions {
        device: Device::Cuda(backend.ordinal()),
        input_hw: Some((224, 224)),
        ..OptimizeOptions::default()
    };
    optimize(&mut sparse, &options).unwrap();
    let dx = DeviceTensor::upload(&backend, &image).unwrap();
    let spikes = |g: &Graph| {
        let mut out = Vec::new();
        g.forward_cuda_observed(&dx, &mut |run| {
            if as_spiking_neuron(run.node.op.as_ref()).is_some() {
                out.push((run.node.name.clone(), run.output.download()?));
            }
            Ok(())
        })
        .unwrap();
        out
    };
    // The optimized model's fused neurons are not neuron nodes: compare those both have.
    let optimized: std::collections::BTreeMap<String, Tensor> =
        spikes(&sparse).into_iter().collect();
    for (name, a) in spikes(&dense) {
        let Some(b) = optimized.get(&name) else {
            continue;
        };
        let differ = a
            .data()
            .iter()
            .zip(b.data())
            .filter(|(x, y)| x != y)
            .count();
        eprintln!("{name:20} {differ:>9} of {:>10} spikes differ", a.len());
    }
}

//! `optimize` on the zoo: every convolution fed by spikes is replaced (the stem, fed by the
//! image, is not), every BatchNorm after a convolution is folded, and the network computes the
//! same function: spikes identical at every neuron, logits within 1e-5 relative.
mod common;

use std::collections::BTreeMap;

use sparseflow::device::Device;
use sparseflow::graph::{Graph, Input};
use sparseflow::model::{self, init, ModelConfig, NeuronConfig, NeuronKind};
use sparseflow::ops::connect::Add;
use sparseflow::ops::connect::ConnectFunction;
use sparseflow::ops::conv2d::Conv2d;
use sparseflow::ops::neuron::{Firing, LIFNode};
use sparseflow::ops::pool::MaxPool2d;
use sparseflow::ops::{Operator, ValueKind};
use sparseflow::optimize::{optimize, Decision, OptimizeOptions};
use sparseflow::testing::random_uniform;
use sparseflow::{impl_as_any, Result, Tensor};

fn random_image(shape: &[usize], seed: u64) -> Tensor {
    random_uniform(shape, 0.0, 1.0, seed)
}

fn calibrated(name: &str, config: &ModelConfig) -> Graph {
    let mut g = model::build(name, config).unwrap();
    init::init_seeded(&mut g, 17).unwrap();
    init::calibrate_batchnorm(&mut g, &random_image(&[2, 2, 3, 32, 32], 5)).unwrap();
    g
}

/// The output and the spikes of every neuron, by node name.
fn run_with_spikes(g: &Graph, x: &Tensor) -> (Tensor, BTreeMap<String, Tensor>) {
    let mut spikes = BTreeMap::new();
    let out = g
        .forward_observed(x, &mut |r| {
            let name = &r.node.name;
            if name.contains("sn") || name == "maxpool" || name.ends_with(".connect") {
                spikes.insert(r.node.name.clone(), r.output.clone());
            }
            Ok(())
        })
        .unwrap();
    (out, spikes)
}

#[test]
fn optimized_zoo_models_compute_the_same_function() {
    let cases = [
        ("spiking_resnet18", ConnectFunction::Add),
        ("spiking_resnet34", ConnectFunction::Add),
        ("spiking_resnet50", ConnectFunction::Add),
        ("sew_resnet18", ConnectFunction::Add),
        ("sew_resnet18", ConnectFunction::Iand),
        ("sew_resnet50", ConnectFunction::Add),
    ];
    for (name, connect) in cases {
        let config = ModelConfig {
            num_classes: 10,
            connect,
            ..ModelConfig::default()
        };
        let dense = calibrated(name, &config);
        let mut sparse = calibrated(name, &config);
        let report = optimize(&mut sparse, &OptimizeOptions::default()).unwrap();

        let convs: Vec<&str> = dense
            .nodes()
            .filter(|(_, n)| n.op.type_name() == "Conv2d")
            .map(|(_, n)| n.name.as_str())
            .collect();
        let bns = dense
            .nodes()
            .filter(|(_, n)| n.op.type_name() == "BatchNorm2d")
            .count();
        for conv in &convs {
            let e = report.entry(conv).unwrap();
            let want = if *conv == "conv1" {
                Decision::Kept
            } else {
                Decision::Replaced
            };
            assert_eq!(e.decision, want, "{name} {conv}: {}", e.reason);
        }
        // Every BatchNorm, the max-pool into the stem's neuron, each residual add (spiking
        // ResNets) into the neuron after it and each SEW connect into the neuron before it.
        let adds: Vec<&str> = dense
            .nodes()
            .filter(|(_, n)| ["Add", "SewConnect"].contains(&n.op.type_name()))
            .map(|(_, n)| n.name.as_str())
            .collect();
        assert_eq!(
            report.count(Decision::Folded),
            bns + 1 + adds.len(),
            "{name}: every BatchNorm folded\n{report}"
        );
        for add in &adds {
            assert_eq!(
                report.entry(add).unwrap().decision,
                Decision::Folded,
                "{name} {add}"
            );
        }
        assert!(report.entry("maxpool").unwrap().reason.contains("`sn1`"));
        assert_eq!(
            sparse
                .node(sparse.find("sn1").unwrap())
                .unwrap()
                .op
                .type_name(),
            "NeuronMaxPool"
        );
        assert_eq!(
            report.entry("fc").unwrap().decision,
            Decision::Kept,
            "fc reads the dense average"
        );

        let x = random_image(&[2, 2, 3, 32, 32], 99);
        let (want, want_spikes) = run_with_spikes(&dense, &x);
        let (got, got_spikes) = run_with_spikes(&sparse, &x);
        // The fused `sn1` outputs what the dense model's max-pool does.
        assert_eq!(
            got_spikes["sn1"], want_spikes["maxpool"],
            "{name} sn1 + maxpool"
        );
        // A SEW block's last neuron, fused with the connect after it, outputs the connect's.
        let fused_connects: Vec<&str> = sparse
            .nodes()
            .filter(|(_, n)| n.op.type_name() == "NeuronConnect")
            .map(|(_, n)| n.name.as_str())
            .collect();
        let connects = want_spikes.keys().filter(|l| l.ends_with(".connect"));
        assert_eq!(connects.count(), fused_connects.len(), "{name}");
        assert_eq!(
            got_spikes.len() + 1 + fused_connects.len(),
            want_spikes.len()
        );
        for (layer, s) in want_spikes
            .iter()
            .filter(|(l, _)| !["sn1", "maxpool"].contains(&l.as_str()) && !l.ends_with(".connect"))
        {
            let alive = 1.0 - s.zero_fraction();
            assert!(alive > 0.0, "{name} {layer} is silent");
            let want = match layer.rsplit_once('.') {
                Some((block, _)) if fused_connects.contains(&layer.as_str()) => {
                    &want_spikes[&format!("{block}.connect")]
                }
                _ => s,
            };
            assert!(&got_spikes[layer] == want, "{name} {layer}: spikes changed");
        }
        let err = common::relative_error(&got, &want);
        assert!(err <= 1e-5, "{name}: logits differ by {err:.2e}");
    }
}

/// A user's own neuron: fires where the input reaches 0.5, no state.
#[derive(Debug)]
struct StepNeuron;

impl Operator for StepNeuron {
    fn type_name(&self) -> &'static str {
        "StepNeuron"
    }
    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let x = inputs[0];
        let data = x.data().iter().map(|&v| (v >= 0.5) as u8 as f32).collect();
        Tensor::new(x.shape().to_vec(), data)
    }
    impl_as_any!();
}

fn conv(cin: usize, cout: usize, seed: u64) -> Conv2d {
    let w = random_image(&[cout, cin, 3, 3], seed);
    Conv2d::new(w, None, (1, 1), (1, 1), (1, 1), 1).unwrap()
}

fn custom_neuron_graph() -> Graph {
    let mut g = Graph::new(Input {
        dims: vec![None, None, Some(2), None, None],
    });
    let a = g.add("conv_a", conv(2, 4, 1), &[0]).unwrap();
    let s = g.add("step", StepNeuron, &[a]).unwrap();
    let b = g.add("conv_b", conv(4, 3, 2), &[s]).unwrap();
    g.set_output(b).unwrap();
    g
}

#[test]
fn a_registered_custom_neuron_gets_its_consumers_replaced() {
    let x = random_image(&[2, 1, 2, 9, 9], 3);
    let want = custom_neuron_graph().forward(&x).unwrap();

    let mut g = custom_neuron_graph();
    let report = optimize(&mut g, &OptimizeOptions::default()).unwrap();
    assert_eq!(
        report.entry("conv_b").unwrap().decision,
        Decision::Kept,
        "unknown op: dense"
    );

    let mut g = custom_neuron_graph();
    let mut options = OptimizeOptions::default();
    options.registry.register("StepNeuron");
    let report = optimize(&mut g, &options).unwrap();
    let e = report.entry("conv_b").unwrap();
    assert_eq!(e.decision, Decision::Replaced, "{report}");
    assert!(e.reason.contains("binary spikes from `step`"));
    assert_eq!(report.entry("conv_a").unwrap().decision, Decision::Kept);
    assert_eq!(
        g.node(g.find("conv_b").unwrap()).unwrap().op.type_name(),
        "SparseConv2d"
    );
    // The sparse conv may sum in another order than the dense one (the pattern tables do).
    let error = common::relative_error(&g.forward(&x).unwrap(), &want);
    assert!(error <= 1e-5, "relative error {error:e}");
}

#[test]
fn a_graph_without_spiking_neurons_is_left_alone_and_says_why() {
    let mut g = Graph::new(Input {
        dims: vec![None, None, Some(2), None, None],
    });
    let a = g.add("conv_a", conv(2, 4, 1), &[0]).unwrap();
    let b = g.add("conv_b", conv(4, 3, 2), &[a]).unwrap();
    g.set_output(b).unwrap();
    let report = optimize(&mut g, &OptimizeOptions::default()).unwrap();
    assert_eq!(report.count(Decision::Replaced), 0);
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("no spiking operator")),
        "{report}"
    );
    assert!(report.to_string().contains("input from `conv_a` is dense"));
}

#[test]
fn block_sizes_follow_the_feature_map_and_overrides() {
    let config = ModelConfig {
        num_classes: 10,
        ..ModelConfig::default()
    };
    let mut g = model::build("spiking_resnet18", &config).unwrap();
    let mut options = OptimizeOptions {
        input_hw: Some((224, 224)),
        ..OptimizeOptions::default()
    };
    options
        .block_overrides
        .insert("layer4.1.conv2".into(), Some(8));
    let report = optimize(&mut g, &options).unwrap();
    let block = |n: &str| report.entry(n).unwrap().block.clone().unwrap();
    assert_eq!(block("layer1.0.conv1"), "8"); // 56x56
    assert_eq!(block("layer2.0.conv2"), "4"); // 28x28
    assert_eq!(block("layer3.1.conv1"), "4"); // 14x14
    assert_eq!(block("layer4.0.conv2"), "4"); // 7x7
    assert_eq!(block("layer4.1.conv2"), "8"); // overridden
}

#[test]
fn value_kinds_propagate_through_sew_connect() {
    use sparseflow::optimize::analyzer::analyze;
    use sparseflow::optimize::SpikeRegistry;
    let neuron = NeuronConfig {
        kind: NeuronKind::If,
        firing: Firing::default(),
    };
    for (connect, want) in [
        (ConnectFunction::Add, ValueKind::SparseInteger),
        (ConnectFunction::And, ValueKind::Binary),
        (ConnectFunction::Iand, ValueKind::Binary),
    ] {
        let config = ModelConfig {
            neuron,
            num_classes: 10,
            connect,
        };
        let g = model::build("sew_resnet18", &config).unwrap();
        let kinds = analyze(&g, &SpikeRegistry::default(), ValueKind::Dense).unwrap();
        assert_eq!(
            kinds.of(g.find("layer1.0.connect").unwrap()),
            want,
            "{connect:?}"
        );
        assert_eq!(kinds.of(g.find("maxpool").unwrap()), ValueKind::Binary);
        assert_eq!(kinds.of(g.find("avgpool").unwrap()), ValueKind::Dense);
    }
}

#[test]
fn on_cuda_convs_without_a_gpu_kernel_are_kept() {
    let mut g = Graph::new(Input {
        dims: vec![None, None, Some(2), None, None],
    });
    let s = g.add("step", StepNeuron, &[0]).unwrap();
    // A dilated 3×3: neither the element gather nor the pattern tables cover it.
    let w = random_image(&[3, 2, 3, 3], 4);
    let dilated = Conv2d::new(w, None, (1, 1), (2, 2), (2, 2), 1).unwrap();
    let a = g.add("dilated", dilated, &[s]).unwrap();
    // A 5×5 on binary spikes: the pattern-table kernel covers it.
    let w = random_image(&[3, 3, 5, 5], 5);
    let conv5 = Conv2d::new(w, None, (1, 1), (2, 2), (1, 1), 1).unwrap();
    let s2 = g.add("step2", StepNeuron, &[a]).unwrap();
    let b = g.add("conv5x5", conv5, &[s2]).unwrap();
    g.set_output(b).unwrap();
    let mut options = OptimizeOptions {
        device: sparseflow::Device::Cuda(0),
        ..OptimizeOptions::default()
    };
    options.registry.register("StepNeuron");
    let report = optimize(&mut g, &options).unwrap();
    let e = report.entry("dilated").unwrap();
    assert_eq!(e.decision, Decision::Kept, "{report}");
    assert!(e.reason.contains("GPU has no kernel"), "{}", e.reason);
    let e = report.entry("conv5x5").unwrap();
    assert_eq!(e.decision, Decision::Replaced, "{report}");
}

/// input → conv → LIF → max-pool → conv, plus (optionally) a second reader of the spikes.
fn neuron_pool_graph(second_reader: bool) -> Graph {
    let mut g = Graph::new(Input {
        dims: vec![None, None, Some(2), None, None],
    });
    let a = g.add("conv_a", conv(2, 4, 1), &[0]).unwrap();
    let lif = LIFNode::new(2.0, true, Firing::default()).unwrap();
    let s = g.add("sn", lif, &[a]).unwrap();
    let p = g
        .add(
            "pool",
            MaxPool2d::new((3, 3), (2, 2), (1, 1)).unwrap(),
            &[s],
        )
        .unwrap();
    let mut out = g.add("conv_b", conv(4, 3, 2), &[p]).unwrap();
    if second_reader {
        let pooled = g
            .add(
                "pool2",
                MaxPool2d::new((2, 2), (2, 2), (0, 0)).unwrap(),
                &[s],
            )
            .unwrap();
        let c = g.add("conv_c", conv(4, 3, 3), &[pooled]).unwrap();
        out = g.add("sum", Add, &[out, c]).unwrap();
    }
    g.set_output(out).unwrap();
    g
}

#[test]
fn a_neuron_read_only_by_a_max_pool_is_fused_with_it() {
    let x = random_uniform(&[2, 1, 2, 12, 12], 0.0, 3.0, 4);
    let want = neuron_pool_graph(false).forward(&x).unwrap();
    let mut g = neuron_pool_graph(false);
    let report = optimize(&mut g, &OptimizeOptions::default()).unwrap();
    let e = report.entry("pool").unwrap();
    assert_eq!(e.decision, Decision::Folded, "{report}");
    assert!(g.find("pool").is_none());
    assert_eq!(
        g.node(g.find("sn").unwrap()).unwrap().op.type_name(),
        "NeuronMaxPool"
    );
    let error = common::relative_error(&g.forward(&x).unwrap(), &want);
    assert!(error <= 1e-5, "relative error {error:e}");

    // For CUDA too (the spikes pass as bytes there); not when the spikes have another reader or
    // when disabled.
    let mut g = neuron_pool_graph(false);
    let cuda = OptimizeOptions {
        device: Device::Cuda(0),
        ..OptimizeOptions::default()
    };
    optimize(&mut g, &cuda).unwrap();
    assert!(g.find("pool").is_none());
    let mut g = neuron_pool_graph(true);
    let report = optimize(&mut g, &OptimizeOptions::default()).unwrap();
    assert!(report.entry("pool").is_none() && g.find("pool").is_some());
    let mut g = neuron_pool_graph(false);
    let options = OptimizeOptions {
        fuse_neurons: false,
        ..OptimizeOptions::default()
    };
    optimize(&mut g, &options).unwrap();
    assert!(g.find("pool").is_some());
}

#[test]
fn a_residual_add_read_only_by_a_neuron_is_fused_with_it() {
    // input → conv_a → add(conv_a, input) → LIF → conv_b, and (optionally) a second reader of the
    // sum.
    let graph = |second_reader: bool| {
        let mut g = Graph::new(Input {
            dims: vec![None, None, Some(2), None, None],
        });
        let a = g.add("conv_a", conv(2, 2, 1), &[0]).unwrap();
        let sum = g.add("add", Add, &[a, 0]).unwrap();
        let lif = LIFNode::new(2.0, true, Firing::default()).unwrap();
        let s = g.add("sn", lif, &[sum]).unwrap();
        let mut out = g.add("conv_b", conv(2, 3, 2), &[s]).unwrap();
        if second_reader {
            out = g.add("sum2", Add, &[out, sum]).unwrap();
        }
        g.set_output(out).unwrap();
        g
    };
    let x = random_uniform(&[2, 1, 2, 9, 9], 0.0, 1.5, 7);
    let want = graph(false).forward(&x).unwrap();
    let mut g = graph(false);
    let report = optimize(&mut g, &OptimizeOptions::default()).unwrap();
    assert_eq!(
        report.entry("add").unwrap().decision,
        Decision::Folded,
        "{report}"
    );
    assert!(g.find("add").is_none());
    let sn = g.node(g.find("sn").unwrap()).unwrap();
    assert_eq!(sn.op.type_name(), "AddNeuron");
    assert_eq!(sn.inputs, vec![g.find("conv_a").unwrap(), 0]);
    let error = common::relative_error(&g.forward(&x).unwrap(), &want);
    assert!(error <= 1e-5, "relative error {error:e}");

    let mut g = graph(true);
    let report = optimize(&mut g, &OptimizeOptions::default()).unwrap();
    assert!(report.entry("add").is_none() && g.find("add").is_some());
}

/// On spike-encoded images the stem conv is sparse too, and optimize fuses it with the neuron
/// and max-pool after it into one node under the neuron's name; the network computes the same
/// function (on the CPU the fused node runs the three operators in turn).
#[test]
fn spike_input_fuses_the_stem_conv_with_its_neuron() {
    let config = ModelConfig {
        num_classes: 10,
        ..ModelConfig::default()
    };
    let dense = calibrated("spiking_resnet18", &config);
    let mut fused = calibrated("spiking_resnet18", &config);
    let options = OptimizeOptions {
        input_kind: ValueKind::Binary,
        ..OptimizeOptions::default()
    };
    let report = optimize(&mut fused, &options).unwrap();
    let conv1 = report.entry("conv1").unwrap();
    assert_eq!(conv1.decision, Decision::Folded, "{report}");
    assert!(conv1.reason.contains("`sn1`"), "{}", conv1.reason);
    assert!(fused.find("conv1").is_none() && fused.find("maxpool").is_none());
    let stem = fused.node(fused.find("sn1").unwrap()).unwrap();
    assert_eq!(stem.op.type_name(), "ConvNeuronPool");
    let names: Vec<String> = fused.params().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"sn1.weight".to_string()), "{names:?}");

    let x = sparseflow::testing::random_spikes(&[2, 2, 3, 32, 32], 0.4, 3);
    let error = common::relative_error(&fused.forward(&x).unwrap(), &dense.forward(&x).unwrap());
    assert!(error <= 1e-5, "relative error {error:e}");
}

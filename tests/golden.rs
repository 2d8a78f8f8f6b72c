//! The CPU engine against spikingjelly 2.0.0: every fixture under tests/fixtures/ holds a model
//! configuration, its input, its output and the spikes of several layers, computed by
//! spikingjelly (`scripts/make_golden_fixtures.py`).
//!
//! Spikes must be identical except where our charged membrane sits within 1e-5 of the threshold
//! (a tie, where the last bit of a float sum decides); logits must agree within 1e-4 relative.
mod common;

use std::collections::BTreeMap;

use sparseflow::graph::Graph;
use sparseflow::model::init::seeded_values;
use sparseflow::ops::add_neuron::AddNeuron;
use sparseflow::ops::connect::{Add, SewConnect};
use sparseflow::ops::neuron::as_spiking_neuron;
use sparseflow::ops::neuron_connect::NeuronConnect;
use sparseflow::ops::neuron_pool::NeuronMaxPool;
use sparseflow::ops::Operator;
use sparseflow::optimize::{optimize, Decision, OptimizeOptions};
use sparseflow::Tensor;

const TIE: f32 = 1e-5;

#[test]
fn seeded_weights_match_the_fixture_generator() {
    for f in common::fixtures() {
        let want: Vec<f32> = serde_json::from_str(f.meta("check_conv1_weight_first4")).unwrap();
        let got = seeded_values("conv1.weight", 0, 4, 1.0 / (3.0f64 * 49.0).sqrt());
        assert_eq!(got, want, "{}", f.name);
    }
}

#[test]
fn zoo_models_reproduce_spikingjelly() {
    for f in common::fixtures() {
        check_against_fixture(&f, &f.model(), "dense");
    }
}

#[test]
fn optimized_zoo_models_reproduce_spikingjelly() {
    for f in common::fixtures() {
        let mut graph = f.model();
        let report = optimize(&mut graph, &OptimizeOptions::default()).unwrap();
        assert!(report.count(Decision::Replaced) > 0, "{}: {report}", f.name);
        check_against_fixture(&f, &graph, "optimized");
    }
}

fn check_against_fixture(f: &common::Fixture, graph: &Graph, label: &str) {
    {
        let wanted: BTreeMap<String, &Tensor> = f
            .file
            .tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix("spikes.").map(|k| (k.to_string(), t)))
            .collect();
        assert!(!wanted.is_empty(), "{}: fixture has no spikes", f.name);
        let mut seen = 0;
        let mut ties = 0;
        let mut compared = 0usize;
        let output = graph
            .forward_observed(f.tensor("input"), &mut |run| {
                let Some(want) = wanted.get(&run.node.name) else {
                    return Ok(());
                };
                seen += 1;
                // The CPU optimize fuses the stem's neuron with its max-pool, each spiking
                // block's last neuron with the residual add before it, and each SEW block's with
                // the connect after it: the neuron's own spikes are compared (on the sum for a
                // fused add), and the node's output must be their pooling or their connection.
                let any = run.node.op.as_any();
                let (pooled, added, connected) = (
                    any.downcast_ref::<NeuronMaxPool>(),
                    any.downcast_ref::<AddNeuron>(),
                    any.downcast_ref::<NeuronConnect>(),
                );
                let op = match (pooled, added, connected) {
                    (Some(f), _, _) => f.neuron.as_ref(),
                    (_, Some(f), _) => f.neuron.as_ref(),
                    (_, _, Some(f)) => f.neuron.as_ref(),
                    _ => run.node.op.as_ref(),
                };
                let neuron = as_spiking_neuron(op).expect("spikes come from neurons");
                let sum = added.map(|_| Add.forward(run.inputs)).transpose()?;
                let (spikes, charge) = neuron.forward_with_charge(sum.as_ref().unwrap_or(run.inputs[0]))?;
                match (pooled, connected) {
                    (Some(f), _) => assert_eq!(&f.pool.forward(&[&spikes])?, run.output),
                    (_, Some(f)) => {
                        let connect = SewConnect { function: f.function };
                        let shortcut = run.inputs[1];
                        let args = if f.spikes_first { [&spikes, shortcut] } else { [shortcut, &spikes] };
                        assert_eq!(&connect.forward(&args)?, run.output)
                    }
                    _ => assert_eq!(&spikes, run.output),
                }
                assert_eq!(spikes.shape(), want.shape(), "{} {}", f.name, run.node.name);
                let threshold = neuron.firing().v_threshold;
                for ((&got, &want), &h) in spikes.data().iter().zip(want.data()).zip(charge.data()) {
                    compared += 1;
                    if got != want {
                        assert!(
                            (h - threshold).abs() < TIE,
                            "{}: {} spike {got} vs spikingjelly {want} with H = {h} (threshold {threshold})",
                            f.name,
                            run.node.name
                        );
                        ties += 1;
                    }
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(
            seen,
            wanted.len(),
            "{}: every recorded layer was compared",
            f.name
        );
        let err = common::relative_error(&output, f.tensor("output"));
        println!(
            "{} ({label}): {compared} spikes compared in {seen} layers, {ties} threshold ties, logits max error {err:.2e} (relative to max |logit|)",
            f.name
        );
        assert!(err <= 1e-4, "{}: logits differ by {err:.2e}", f.name);
    }
}

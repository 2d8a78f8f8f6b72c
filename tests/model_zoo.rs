//! The zoo's structure against spikingjelly's: parameter names and shapes equal the `state_dict`
//! keys recorded from spikingjelly 2.0.0 (tests/fixtures/state_dict_keys.txt), and every model
//! builds and runs.
mod common;

use std::collections::BTreeMap;

use sparseflow::model::{self, init, ModelConfig, NeuronConfig, NeuronKind, MODEL_NAMES};
use sparseflow::ops::connect::ConnectFunction;
use sparseflow::ops::neuron::Firing;
use sparseflow::testing::SplitMix64;
use sparseflow::{Error, Tensor};

/// Sections `## <model> <neuron>` of `name shape` lines, as the fixture script writes them.
fn recorded_keys() -> BTreeMap<String, BTreeMap<String, Vec<usize>>> {
    let text = std::fs::read_to_string(common::fixture_dir().join("state_dict_keys.txt")).unwrap();
    let mut sections = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && (!l.starts_with('#') || l.starts_with("## ")))
    {
        if let Some(title) = line.strip_prefix("## ") {
            current = Some(title.trim().to_string());
            sections.insert(title.trim().to_string(), BTreeMap::new());
        } else if let Some(section) = &current {
            let (name, shape) = line.split_once(' ').unwrap();
            if name.ends_with("num_batches_tracked") {
                continue;
            }
            let shape: Vec<usize> = serde_json::from_str(shape.trim()).unwrap();
            sections
                .get_mut(section)
                .unwrap()
                .insert(name.to_string(), shape);
        }
    }
    sections
}

fn config(neuron: &str) -> ModelConfig {
    let kind = match neuron {
        "plif" => NeuronKind::Plif {
            init_tau: 2.0,
            decay_input: true,
        },
        _ => NeuronKind::Lif {
            tau: 2.0,
            decay_input: true,
        },
    };
    ModelConfig {
        neuron: NeuronConfig {
            kind,
            firing: Firing::default(),
        },
        num_classes: 1000,
        connect: ConnectFunction::Add,
    }
}

#[test]
fn parameter_names_and_shapes_match_spikingjelly() {
    let sections = recorded_keys();
    assert!(!sections.is_empty());
    for (title, want) in sections {
        let mut words = title.split_whitespace();
        let (name, neuron) = (words.next().unwrap(), words.next().unwrap_or("lif"));
        let graph = model::build(name, &config(neuron)).unwrap();
        let got: BTreeMap<String, Vec<usize>> = graph
            .params()
            .into_iter()
            .map(|(k, t)| (k, t.shape().to_vec()))
            .collect();
        assert_eq!(got, want, "{title}");
    }
}

#[test]
fn every_zoo_model_builds_and_small_ones_run() {
    for name in MODEL_NAMES {
        let cfg = ModelConfig {
            num_classes: 7,
            ..config("lif")
        };
        let graph = model::build(name, &cfg).unwrap();
        assert!(graph.summary().contains("fc"));
    }
    for name in ["spiking_resnet18", "sew_resnet18"] {
        let cfg = ModelConfig {
            num_classes: 7,
            ..config("lif")
        };
        let mut graph = model::build(name, &cfg).unwrap();
        init::init_seeded(&mut graph, 3).unwrap();
        let mut rng = SplitMix64::new(1);
        let data = (0..2 * 3 * 32 * 32).map(|_| rng.next_f32()).collect();
        let x = Tensor::new(vec![1, 2, 3, 32, 32], data).unwrap();
        init::calibrate_batchnorm(&mut graph, &x).unwrap();
        assert_eq!(graph.forward(&x).unwrap().shape(), &[1, 2, 7]);
        // Single-step input: [N, C, H, W] runs as one step.
        let single = x.clone().reshape(vec![2, 3, 32, 32]).unwrap();
        assert_eq!(graph.forward(&single).unwrap().shape(), &[2, 7]);
    }
}

#[test]
fn unknown_models_and_bad_configs_are_errors() {
    assert!(matches!(
        model::build("resnet18", &config("lif")),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        model::build("sew_resnet19", &config("lif")),
        Err(Error::InvalidArgument(_))
    ));
    let zero = ModelConfig {
        num_classes: 0,
        ..config("lif")
    };
    assert!(model::build("sew_resnet18", &zero).is_err());
}

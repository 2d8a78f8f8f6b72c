//! Shared by the integration tests: the golden fixtures written by
//! `scripts/make_golden_fixtures.py` from spikingjelly 2.0.0, and how to rebuild their models.
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sparseflow::graph::Graph;
use sparseflow::model::{self, init, ModelConfig, NeuronConfig, NeuronKind};
use sparseflow::ops::connect::ConnectFunction;
use sparseflow::ops::neuron::Firing;
use sparseflow::weights::{self, TensorFile};
use sparseflow::Tensor;

/// The fixture directory, relative to the repository root where tests run (also on the GPU
/// machine), or `SPARSEFLOW_FIXTURES`.
pub fn fixture_dir() -> PathBuf {
    std::env::var_os("SPARSEFLOW_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("tests/fixtures"))
}

pub struct Fixture {
    pub name: String,
    pub path: PathBuf,
    pub file: TensorFile,
}

impl Fixture {
    pub fn meta(&self, key: &str) -> &str {
        self.file
            .metadata
            .get(key)
            .unwrap_or_else(|| panic!("{}: metadata `{key}` missing", self.name))
    }

    fn meta_f32(&self, key: &str) -> f32 {
        self.meta(key).parse().unwrap()
    }

    pub fn config(&self) -> ModelConfig {
        let decay_input = self.meta("decay_input") == "true";
        let tau = self.meta_f32("tau");
        let kind = match self.meta("neuron") {
            "if" => NeuronKind::If,
            "lif" => NeuronKind::Lif { tau, decay_input },
            "plif" => NeuronKind::Plif {
                init_tau: tau,
                decay_input,
            },
            other => panic!("unknown neuron {other}"),
        };
        let v_reset = match self.meta("v_reset") {
            "none" => None,
            v => Some(v.parse().unwrap()),
        };
        ModelConfig {
            neuron: NeuronConfig {
                kind,
                firing: Firing {
                    v_threshold: self.meta_f32("v_threshold"),
                    v_reset,
                    detach_reset: self.meta("detach_reset") == "true",
                },
            },
            num_classes: self.meta("num_classes").parse().unwrap(),
            connect: match self.meta("connect") {
                "" => ConnectFunction::Add,
                c => ConnectFunction::parse(c).unwrap(),
            },
        }
    }

    /// The model with spikingjelly's parameters: seeded conv/linear weights, the rest from the
    /// fixture's `param.*` tensors (all of which must be used).
    pub fn model(&self) -> Graph {
        let mut graph = model::build(self.meta("model"), &self.config()).unwrap();
        init::init_seeded(&mut graph, self.meta("base_seed").parse().unwrap()).unwrap();
        let params: BTreeMap<String, Tensor> = self
            .file
            .tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix("param.").map(|k| (k.to_string(), t.clone())))
            .collect();
        let loaded = graph.load_params_partial(&params).unwrap();
        assert_eq!(
            loaded,
            params.len(),
            "{}: every fixture parameter is a model parameter",
            self.name
        );
        graph
    }

    pub fn tensor(&self, name: &str) -> &Tensor {
        self.file.get(name, &self.path).unwrap()
    }
}

/// Every fixture, sorted by name.
pub fn fixtures() -> Vec<Fixture> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("tests/fixtures exists (run from the repository root)")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no golden fixtures found");
    paths.iter().map(|p| load(p)).collect()
}

pub fn load(path: &Path) -> Fixture {
    Fixture {
        name: path.file_stem().unwrap().to_string_lossy().into_owned(),
        path: path.to_path_buf(),
        file: weights::read(path).unwrap(),
    }
}

/// Largest |a − b| over the largest |b|: the error relative to the tensor's scale.
pub fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
    got.relative_error(want).expect("same shapes")
}

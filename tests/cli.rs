//! `sparseflow run` end to end: it reproduces a golden fixture's output from a full weights file,
//! and bad files or inputs end in a clear error, never a panic.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sparseflow::{weights, Tensor};

const FIXTURE: &str = "spiking_resnet18_lif";

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sparseflow-cli-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn fixture() -> common::Fixture {
    common::load(&common::fixture_dir().join(format!("{FIXTURE}.safetensors")))
}

/// Writes the fixture model's full state_dict and its input; returns (weights, input) paths.
fn write_model_files(f: &common::Fixture, dir: &Scratch) -> (PathBuf, PathBuf) {
    let graph = f.model();
    let weights_path = dir.path("weights.safetensors");
    weights::write(&weights_path, graph.params(), &BTreeMap::new()).unwrap();
    let input_path = dir.path("input.safetensors");
    weights::write(
        &input_path,
        [("input".to_string(), f.tensor("input"))],
        &BTreeMap::new(),
    )
    .unwrap();
    (weights_path, input_path)
}

fn run(f: &common::Fixture, weights: &Path, input: &Path, output: &Path) -> Output {
    run_with(f, weights, input, output, &[])
}

fn run_with(
    f: &common::Fixture,
    weights: &Path,
    input: &Path,
    output: &Path,
    extra: &[&str],
) -> Output {
    // SPARSEFLOW_BIN: where the binary is when tests run away from the build (the GPU machine).
    let bin = std::env::var_os("SPARSEFLOW_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_sparseflow").into());
    let mut cmd = Command::new(bin);
    cmd.args([
        "run",
        "--model",
        f.meta("model"),
        "--neuron",
        f.meta("neuron"),
    ])
    .args([
        "--tau",
        f.meta("tau"),
        "--v-threshold",
        f.meta("v_threshold"),
    ])
    .args([
        "--v-reset",
        f.meta("v_reset"),
        "--num-classes",
        f.meta("num_classes"),
    ])
    .args(["--device", "cpu", "--weights"])
    .arg(weights)
    .arg("--input")
    .arg(input)
    .arg("--output")
    .arg(output);
    if f.meta("decay_input") == "false" {
        cmd.arg("--no-decay-input");
    }
    cmd.args(extra);
    cmd.output().unwrap()
}

fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert!(
        !stderr.contains("panicked"),
        "panic instead of an error: {stderr}"
    );
    assert!(stderr.contains(needle), "`{needle}` not in: {stderr}");
}

#[test]
fn run_reproduces_the_fixture_output() {
    let f = fixture();
    let dir = Scratch::new("ok");
    let (w, x) = write_model_files(&f, &dir);
    let y = dir.path("out.safetensors");
    let out = run(&f, &w, &x, &y);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = weights::read(&y).unwrap();
    let err = common::relative_error(&got.tensors["output"], f.tensor("output"));
    assert!(err <= 1e-4, "output differs from spikingjelly by {err:.2e}");
}

#[test]
fn bad_weights_are_clear_errors() {
    let f = fixture();
    let dir = Scratch::new("bad");
    let (w, x) = write_model_files(&f, &dir);
    let y = dir.path("out.safetensors");
    let mut state = weights::read(&w).unwrap().tensors;

    let mut missing = state.clone();
    missing.remove("layer2.0.bn1.running_var");
    weights::write(
        &w,
        missing.iter().map(|(k, t)| (k.clone(), t)),
        &BTreeMap::new(),
    )
    .unwrap();
    assert_clean_error(&run(&f, &w, &x, &y), "missing: layer2.0.bn1.running_var");

    state.insert(
        "layer1.0.conv1.weight".into(),
        Tensor::zeros(vec![64, 64, 1, 1]),
    );
    weights::write(
        &w,
        state.iter().map(|(k, t)| (k.clone(), t)),
        &BTreeMap::new(),
    )
    .unwrap();
    assert_clean_error(
        &run(&f, &w, &x, &y),
        "layer1.0.conv1.weight: expected [64, 64, 3, 3]",
    );

    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(&run(&f, &w, &x, &y), "weights.safetensors");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let f = fixture();
    let dir = Scratch::new("input");
    let (w, x) = write_model_files(&f, &dir);
    let y = dir.path("out.safetensors");
    let write_input = |t: &Tensor| {
        weights::write(&x, [("input".to_string(), t)], &BTreeMap::new()).unwrap();
    };
    write_input(&Tensor::zeros(vec![2, 2, 4, 32, 32]));
    assert_clean_error(&run(&f, &w, &x, &y), "dimension 2");
    write_input(&Tensor::zeros(vec![3, 32, 32]));
    assert_clean_error(&run(&f, &w, &x, &y), "rank-5");
    weights::write(
        &x,
        [("image".to_string(), &Tensor::zeros(vec![1]))],
        &BTreeMap::new(),
    )
    .unwrap();
    assert_clean_error(&run(&f, &w, &x, &y), "no tensor named `input`");
}

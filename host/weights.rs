//! Tensors on disk in the safetensors format: PyTorch `state_dict`s (f32, f16 or bf16), model
//! inputs and outputs.
//!
//! Every floating or integer tensor is read as `f32`; `num_batches_tracked` entries (BatchNorm's
//! training counter) are dropped. A truncated or corrupt file is an [`Error::Format`] naming the
//! file, never a panic.
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, View};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The content of a safetensors file.
#[derive(Clone, Debug, Default)]
pub struct TensorFile {
    pub tensors: BTreeMap<String, Tensor>,
    /// The file's `__metadata__` string map.
    pub metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// The tensor `name`, or an error naming it and the file's path.
    pub fn get(&self, name: &str, path: &Path) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::Format {
            path: path.to_path_buf(),
            message: format!("no tensor named `{name}`"),
        })
    }
}

/// Reads every tensor of a safetensors file as `f32`.
pub fn read(path: impl AsRef<Path>) -> Result<TensorFile> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&bytes).map_err(|message| Error::Format {
        path: path.to_path_buf(),
        message,
    })
}

fn parse(bytes: &[u8]) -> std::result::Result<TensorFile, String> {
    let invalid = |e: safetensors::SafeTensorError| format!("not a valid safetensors file ({e})");
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(invalid)?;
    let file = SafeTensors::deserialize(bytes).map_err(invalid)?;
    let mut tensors = BTreeMap::new();
    for (name, view) in file.iter() {
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        let data = to_f32(view.dtype(), view.data())
            .ok_or_else(|| format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()))?;
        let tensor =
            Tensor::new(view.shape().to_vec(), data).map_err(|e| format!("{name}: {e}"))?;
        tensors.insert(name.to_string(), tensor);
    }
    let metadata = header
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    Ok(TensorFile { tensors, metadata })
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    fn each<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
        bytes
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunks_exact")))
            .collect()
    }
    Some(match dtype {
        Dtype::F32 => each(bytes, f32::from_le_bytes),
        Dtype::F16 => each(bytes, |b| half::f16::from_le_bytes(b).to_f32()),
        Dtype::BF16 => each(bytes, |b| half::bf16::from_le_bytes(b).to_f32()),
        Dtype::F64 => each(bytes, |b| f64::from_le_bytes(b) as f32),
        Dtype::BOOL | Dtype::U8 => each(bytes, |[b]| b as f32),
        Dtype::I8 => each(bytes, |[b]| b as i8 as f32),
        Dtype::I16 => each(bytes, |b| i16::from_le_bytes(b) as f32),
        Dtype::I32 => each(bytes, |b| i32::from_le_bytes(b) as f32),
        Dtype::I64 => each(bytes, |b| i64::from_le_bytes(b) as f32),
        _ => return None,
    })
}

struct F32View<'a>(&'a Tensor);

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.0.shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.0.data().iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.0.len() * 4
    }
}

/// Writes `tensors` as `f32` with an optional `__metadata__` map.
pub fn write<'a>(
    path: impl AsRef<Path>,
    tensors: impl IntoIterator<Item = (String, &'a Tensor)>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let views: Vec<(String, F32View)> = tensors.into_iter().map(|(n, t)| (n, F32View(t))).collect();
    let metadata: Option<HashMap<String, String>> =
        (!metadata.is_empty()).then(|| metadata.clone().into_iter().collect());
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        message: format!("cannot write safetensors: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_half_precision() {
        let dir = std::env::temp_dir().join(format!("sparseflow-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let t = Tensor::new(vec![2, 3], vec![0.5, -1.0, 2.25, 3.0, 0.0, -0.125]).unwrap();
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        write(&path, [("a.weight".to_string(), &t)], &meta).unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back.tensors["a.weight"], t);
        assert_eq!(back.metadata, meta);

        let halves: Vec<u8> = t
            .data()
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(to_f32(Dtype::F16, &halves).unwrap(), t.data());
        let bf: Vec<u8> = t
            .data()
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(to_f32(Dtype::BF16, &bf).unwrap(), t.data());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn truncated_and_garbage_files_are_format_errors() {
        let dir = std::env::temp_dir().join(format!("sparseflow-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let t = Tensor::new(vec![64], vec![1.0; 64]).unwrap();
        write(&path, [("x".to_string(), &t)], &BTreeMap::new()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 4, 8, 20, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            assert!(
                matches!(read(&path), Err(Error::Format { .. })),
                "cut at {cut}"
            );
        }
        std::fs::write(&path, b"definitely not safetensors").unwrap();
        assert!(matches!(read(&path), Err(Error::Format { .. })));
        assert!(matches!(read(dir.join("absent")), Err(Error::Io { .. })));
        std::fs::remove_dir_all(&dir).ok();
    }
}

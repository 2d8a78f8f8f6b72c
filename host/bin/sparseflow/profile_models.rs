//! `sparseflow profile`: how sparse the zoo's spike-fed layers are on synthetic input, in the
//! seed library's table format (average sparsity, zero-block ratios at tiles 8 and 16).
use clap::Args;
use sparseflow::encode::Encoding;
use sparseflow::model::{self, init, ModelConfig};
use sparseflow::optimize::{optimize, OptimizeOptions};
use sparseflow::profile::{profile, ProfileOptions};
use sparseflow::{Device, Result};

#[derive(Args)]
pub struct ProfileArgs {
    /// Comma-separated zoo models
    #[arg(
        long,
        default_value = "spiking_resnet18,spiking_resnet34,spiking_resnet50,sew_resnet18"
    )]
    models: String,
    #[arg(long, default_value_t = 4)]
    timesteps: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Image height and width
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn profile_models(a: &ProfileArgs) -> Result<()> {
    let device = Device::from_name(&a.device)?.device;
    let x = crate::bench::synthetic_images(
        a.batch,
        a.size,
        a.timesteps,
        Encoding::Poisson { seed: 11 },
    )?;
    println!(
        "Poisson input T={} N={} {}x{}, seeded weights with BatchNorm calibrated; averages over the \
         inputs of the spike-fed convolutions (mean over layers)\n",
        a.timesteps, a.batch, a.size, a.size
    );
    println!(
        "| Model | Sparse layers | Avg sparsity | Zero-block ratio (block=8) | Zero-block ratio (block=16) |"
    );
    println!("|---|---|---|---|---|");
    for name in a.models.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let mut g = model::build(name, &ModelConfig::default())?;
        init::init_seeded(&mut g, 1)?;
        init::calibrate_batchnorm(&mut g, &x)?;
        let options = OptimizeOptions {
            input_hw: Some((a.size, a.size)),
            device,
            ..OptimizeOptions::default()
        };
        optimize(&mut g, &options)?;
        let stats = ProfileOptions {
            repeats: 0,
            blocks: vec![8, 16],
        };
        let p = profile(&g, &x, device, &stats, &mut || {})?;
        let layers: Vec<_> = p.nodes.iter().filter(|n| n.op == "SparseConv2d").collect();
        let mean = |f: &dyn Fn(&sparseflow::profile::NodeProfile) -> f64| {
            layers.iter().map(|n| f(n)).sum::<f64>() / layers.len().max(1) as f64
        };
        let block = |b: usize| {
            move |n: &sparseflow::profile::NodeProfile| {
                n.input_zero_blocks
                    .iter()
                    .find(|(size, _)| *size == b)
                    .map_or(0.0, |r| r.1)
            }
        };
        println!(
            "| {name} | {} | {:.2}% | {:.2}% | {:.2}% |",
            layers.len(),
            100.0 * mean(&|n| n.input_zeros),
            100.0 * mean(&block(8)),
            100.0 * mean(&block(16)),
        );
    }
    Ok(())
}

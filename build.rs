//! Compiles `kernels-gpu/` to PTX with rustc's NVPTX backend and hands the module to the library
//! (`OUT_DIR/sparseflow_kernels.ptx`, embedded with `include_str!`).
//!
//! The nvptx toolchain (Debian's `rustc-web` + `rust-web-src`, see the README) is optional: when
//! it is absent the committed `kernels-gpu/ptx/sparseflow_kernels.ptx` is used, so a user's plain
//! `cargo build` never needs it. `SPARSEFLOW_PTX` selects the mode:
//!
//! - `auto` (default): build if the toolchain is present, else use the committed PTX;
//! - `committed`: always use the committed PTX;
//! - `check`: build, and fail if the result differs from the committed PTX (CI);
//! - `write`: build, and overwrite the committed PTX and its toolchain record.
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const KERNEL_DIR: &str = "kernels-gpu";
const COMMITTED_TOOLCHAIN: &str = "kernels-gpu/ptx/TOOLCHAIN";

/// One PTX module built from the kernel crate.
struct Module {
    /// The committed copy, relative to the repository root.
    committed: &'static str,
    /// Its name in `OUT_DIR` (what the library embeds).
    name: &'static str,
    target_cpu: &'static str,
    /// A `--cfg` for the kernel crate, if any.
    cfg: Option<&'static str>,
    /// `-Ctarget-feature` for LLVM, if any.
    features: Option<&'static str>,
}

/// The generic module (sm_80 and later) and the Hopper one, which adds the `wgmma` kernels.
const MODULES: [Module; 2] = [
    Module {
        committed: "kernels-gpu/ptx/sparseflow_kernels.ptx",
        name: "sparseflow_kernels.ptx",
        target_cpu: "sm_80",
        cfg: None,
        features: None,
    },
    Module {
        committed: "kernels-gpu/ptx/sparseflow_kernels_sm90.ptx",
        name: "sparseflow_kernels_sm90.ptx",
        target_cpu: "sm_90a",
        cfg: Some("sparseflow_sm90"),
        // PTX ISA 8.4: `wgmma` with mixed integer types (unsigned inputs, signed weight limbs).
        features: Some("+ptx84"),
    },
];

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Auto,
    Committed,
    Check,
    Write,
}

fn main() {
    for path in [
        "kernels-gpu/src",
        "kernels-gpu/Cargo.toml",
        COMMITTED_TOOLCHAIN,
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    for module in &MODULES {
        println!("cargo:rerun-if-changed={}", module.committed);
    }
    for var in [
        "SPARSEFLOW_PTX",
        "SPARSEFLOW_NVPTX_RUSTC",
        "SPARSEFLOW_NVPTX_CARGO",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let mode = match env::var("SPARSEFLOW_PTX").as_deref() {
        Err(_) | Ok("") | Ok("auto") => Mode::Auto,
        Ok("committed") => Mode::Committed,
        Ok("check") => Mode::Check,
        Ok("write") => Mode::Write,
        Ok(other) => fail(&format!(
            "SPARSEFLOW_PTX={other}: expected auto, committed, check or write"
        )),
    };
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo::rustc-check-cfg=cfg(sparseflow_ptx_from_kernels_crate)");
    if !root.join(KERNEL_DIR).exists() {
        // A packaged build (e.g. from crates.io): the kernel sources ship in the
        // `sparseflow-kernels` crate, whose `COMMITTED_PTX` the library embeds instead.
        if matches!(mode, Mode::Check | Mode::Write) {
            fail("SPARSEFLOW_PTX=check/write need the kernels-gpu/ sources of the repository");
        }
        println!("cargo:rustc-cfg=sparseflow_ptx_from_kernels_crate");
        for module in &MODULES {
            fs::write(out_dir.join(module.name), "").unwrap();
        }
        println!("cargo:rustc-env=SPARSEFLOW_PTX_ORIGIN=committed");
        return;
    }
    let toolchain = Toolchain::locate();
    let mut origins = Vec::new();
    for module in &MODULES {
        let (ptx, origin) = build_module(module, mode, &root, &out_dir, &toolchain);
        fs::write(out_dir.join(module.name), ptx).unwrap();
        origins.push(origin);
    }
    origins.dedup();
    println!(
        "cargo:rustc-env=SPARSEFLOW_PTX_ORIGIN={}",
        origins.join("+")
    );
}

/// The PTX of `module` and where it came from ("built" or "committed"), as `mode` asks.
fn build_module(
    module: &Module,
    mode: Mode,
    root: &Path,
    out_dir: &Path,
    toolchain: &Result<Toolchain, String>,
) -> (String, &'static str) {
    let committed_path = module.committed;
    let committed = fs::read_to_string(root.join(committed_path)).ok();
    match (mode, toolchain) {
        (Mode::Committed, _) | (Mode::Auto, Err(_)) => {
            if let (Mode::Auto, Err(why)) = (mode, &toolchain) {
                println!(
                    "cargo:warning=using the committed PTX ({committed_path}): the nvptx kernel toolchain is not installed ({why})"
                );
            }
            let ptx = committed.clone().unwrap_or_else(|| {
                fail(&format!(
                    "{committed_path} is missing and the kernels cannot be built here"
                ))
            });
            (ptx, "committed")
        }
        (Mode::Check | Mode::Write, Err(why)) => fail(&format!(
            "SPARSEFLOW_PTX needs the nvptx kernel toolchain, which is not usable: {why}"
        )),
        (_, Ok(tc)) => match tc.build(module, root, out_dir) {
            Ok(ptx) => {
                let stale = committed.as_deref() != Some(ptx.as_str());
                let recorded =
                    fs::read_to_string(root.join(COMMITTED_TOOLCHAIN)).unwrap_or_default();
                let why = if recorded.trim() != tc.version.trim() {
                    format!(
                        "the kernel toolchain changed ({} -> {}): regenerate with `SPARSEFLOW_PTX=write cargo build`",
                        recorded.lines().next().unwrap_or("none recorded"),
                        tc.version.lines().next().unwrap_or("?")
                    )
                } else {
                    "kernel sources changed without regenerating it: run `SPARSEFLOW_PTX=write cargo build` and commit kernels-gpu/ptx/".to_string()
                };
                match mode {
                    Mode::Check if stale => fail(&format!("{committed_path} is stale: {why}")),
                    Mode::Write => {
                        fs::write(root.join(committed_path), &ptx).unwrap();
                        fs::write(root.join(COMMITTED_TOOLCHAIN), &tc.version).unwrap();
                        println!("cargo:warning=wrote {committed_path}");
                    }
                    _ if stale => println!("cargo:warning={committed_path} is stale: {why}"),
                    _ => {}
                }
                (ptx, "built")
            }
            Err(err) if mode == Mode::Auto => {
                println!("cargo:warning=building the GPU kernels failed, using the committed PTX instead:");
                for line in err.lines().filter(|l| !l.trim().is_empty()).take(40) {
                    println!("cargo:warning=  {line}");
                }
                let ptx = committed.clone().unwrap_or_else(|| fail(&err));
                (ptx, "committed")
            }
            Err(err) => fail(&err),
        },
    }
}

struct Toolchain {
    rustc: PathBuf,
    cargo: PathBuf,
    version: String,
}

impl Toolchain {
    /// The toolchain is usable when its rustc knows the nvptx target and its sysroot has `core`'s
    /// sources (needed by `-Zbuild-std`).
    fn locate() -> Result<Self, String> {
        let rustc =
            PathBuf::from(env::var("SPARSEFLOW_NVPTX_RUSTC").unwrap_or("/usr/bin/rustc".into()));
        let cargo =
            PathBuf::from(env::var("SPARSEFLOW_NVPTX_CARGO").unwrap_or("/usr/bin/cargo".into()));
        if !rustc.exists() || !cargo.exists() {
            return Err(format!(
                "{} or {} not found",
                rustc.display(),
                cargo.display()
            ));
        }
        let version = run_capture(Command::new(&rustc).arg("-vV"))?;
        let sysroot = run_capture(Command::new(&rustc).args(["--print", "sysroot"]))?;
        let core_src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
        if !core_src.exists() {
            return Err(format!(
                "{} is missing (install rust-web-src)",
                core_src.display()
            ));
        }
        let targets = run_capture(Command::new(&rustc).args(["--print", "target-list"]))?;
        if !targets.lines().any(|t| t == "nvptx64-nvidia-cuda") {
            return Err(format!(
                "{} has no nvptx64-nvidia-cuda target",
                rustc.display()
            ));
        }
        Ok(Self {
            rustc,
            cargo,
            version,
        })
    }

    /// Runs the recipe of DESIGN.md in a clean environment and its own target directory, so no
    /// outer `RUSTFLAGS`/`CARGO_*` setting leaks into the device build.
    fn build(&self, module: &Module, root: &Path, out_dir: &Path) -> Result<String, String> {
        let target_dir = out_dir.join(format!("nvptx-target-{}", module.target_cpu));
        let mut cmd = Command::new(&self.cargo);
        cmd.env_clear()
            .current_dir(root.join(KERNEL_DIR))
            .env("RUSTC", &self.rustc)
            .env("RUSTC_BOOTSTRAP", "1");
        for var in [
            "PATH",
            "HOME",
            "CARGO_HOME",
            "TMPDIR",
            "http_proxy",
            "https_proxy",
            "HTTPS_PROXY",
            "HTTP_PROXY",
            "NO_PROXY",
        ] {
            if let Ok(v) = env::var(var) {
                cmd.env(var, v);
            }
        }
        // The device build's profile: aborting panics and fat LTO, so that core's panic paths are
        // compiled into the one PTX module instead of left as unresolved externs.
        cmd.args(["rustc", "--release", "--quiet", "-Zbuild-std=core"])
            .args(["--config", "profile.release.panic=\"abort\""])
            .args(["--config", "profile.release.lto=\"fat\""])
            .args(["--config", "profile.release.codegen-units=1"])
            .args(["--config", "profile.release.opt-level=3"])
            .args(["--target", "nvptx64-nvidia-cuda", "--crate-type", "cdylib"])
            .arg("--target-dir")
            .arg(&target_dir)
            .args(["--", "--emit=asm", "-C", "linker=true"])
            .arg(format!("-Ctarget-cpu={}", module.target_cpu));
        if let Some(features) = module.features {
            cmd.arg(format!("-Ctarget-feature={features}"));
        }
        if let Some(cfg) = module.cfg {
            cmd.args(["--cfg", cfg]);
        }
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.cargo.display()))?;
        if !out.status.success() {
            return Err(format!(
                "kernel build failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let asm = target_dir.join("nvptx64-nvidia-cuda/release/deps/sparseflow_kernels.s");
        fs::read_to_string(&asm)
            .map(|ptx| with_launch_bounds(&ptx))
            .map_err(|e| format!("cannot read {}: {e}", asm.display()))
    }
}

/// Entries launched with at most this many threads a CTA, which ptxas then fits into the
/// registers that many threads leave (CUDA C's `__launch_bounds__`; Rust's nvptx target has no
/// attribute for it), and where given, the registers a thread may use (`.maxnreg`: for sm_80,
/// ptxas otherwise settled on 96 registers for the sweep and spilled). The resident `wgmma`
/// kernel runs three warpgroups a CTA: 168 registers.
const LAUNCH_BOUNDS: [(&str, u32, Option<u32>); 4] = [
    ("sweep_conv3x3", 512, Some(128)),
    ("wgmma_resident_conv2d_spikes", 384, None),
    ("wgmma_resident_conv2d_spike_planes", 384, None),
    ("wgmma_window_conv2d", 384, None),
];

/// `ptx` with the directives of [`LAUNCH_BOUNDS`] between each of its entries' parameters and
/// body.
fn with_launch_bounds(ptx: &str) -> String {
    let mut out = String::with_capacity(ptx.len());
    let mut pending = None;
    for line in ptx.split_inclusive('\n') {
        if let Some(&(_, threads, registers)) = LAUNCH_BOUNDS
            .iter()
            .find(|(entry, ..)| line.trim_end() == format!(".visible .entry {entry}("))
        {
            pending = Some((threads, registers));
        }
        if let (Some((threads, registers)), "{") = (pending, line.trim()) {
            out.push_str(&format!(".maxntid {threads}, 1, 1\n"));
            if let Some(registers) = registers {
                out.push_str(&format!(".maxnreg {registers}\n"));
            }
            pending = None;
        }
        out.push_str(line);
    }
    out
}

fn run_capture(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    panic!("{msg}");
}

#!/usr/bin/env python3
"""SparseFlow against spikingjelly 2.0 on the same GPU, the same weights and the same input.

For each model this script
  1. runs `sparseflow bench --device cuda ... --json --export DIR/MODEL`: SparseFlow's dense and
     optimized models, timed with CUDA events (median), per-layer table, and the calibrated
     weights, the input and both outputs written to DIR/MODEL;
  2. builds the same network in spikingjelly 2.0 (multi-step mode, LIFNode with its defaults,
     torch backend), loads those weights, and times its forward on the same input with CUDA events
     (median of --repeats after warm-up), twice: PyTorch's defaults (cuDNN convolutions may use
     TF32) and strict fp32 (TF32 off everywhere);
  3. compares spikingjelly's logits with SparseFlow's dense model's: largest and mean difference
     (relative to the largest / mean |logit|) and top-1 agreement. On small inputs the two agree
     to rounding (tests/golden.rs); at B=32, 224x224 a few membranes land within rounding of the
     threshold and their flips propagate, so expect close, not exact, agreement.

Needs torch (CUDA), safetensors and spikingjelly==2.0.0 (+ loguru).  Usage, from the repository
root on the GPU machine:
    python3 scripts/compare-spikingjelly.py --sparseflow .gpu/sparseflow --out $OUT/compare
"""
import argparse
import json
import os
import subprocess
import sys


def build_sj(model):
    from spikingjelly.activation_based import functional, neuron
    from spikingjelly.activation_based.model import sew_resnet, spiking_resnet

    if model.startswith("sew"):
        net = getattr(sew_resnet, model)(spiking_neuron=neuron.LIFNode, cnf="ADD")
    else:
        net = getattr(spiking_resnet, model)(spiking_neuron=neuron.LIFNode)
    functional.set_step_mode(net, "m")
    return net, functional


def time_sj(net, functional, x, repeats, tf32):
    import torch

    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times, out = [], None
    with torch.no_grad():
        for i in range(3 + repeats):
            functional.reset_net(net)
            start.record()
            out = net(x)
            end.record()
            end.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparseflow", default=".gpu/sparseflow", help="the sparseflow binary")
    ap.add_argument("--models", default="spiking_resnet18,sew_resnet18")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--timesteps", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="compare-out")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    device_name = torch.cuda.get_device_name(0)
    results = []
    for model in [m for m in args.models.split(",") if m]:
        out_dir = os.path.join(args.out, model)
        os.makedirs(out_dir, exist_ok=True)
        cmd = [args.sparseflow, "bench", "--model", model, "--device", "cuda",
               "--batch", str(args.batch), "--timesteps", str(args.timesteps),
               "--size", str(args.size), "--repeats", str(args.repeats),
               "--json", "--export", out_dir]
        print("$", " ".join(cmd), flush=True)
        bench = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        with open(os.path.join(out_dir, "bench.json"), "w") as f:
            json.dump(bench, f, indent=1)

        net, functional = build_sj(model)
        state = load_file(os.path.join(out_dir, "weights.safetensors"))
        missing, unexpected = net.load_state_dict(state, strict=False)
        # BatchNorm's num_batches_tracked is a training counter SparseFlow does not keep.
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            sys.exit(f"{model}: state_dict mismatch: missing {missing} unexpected {unexpected}")
        net = net.cuda().eval()
        data = load_file(os.path.join(out_dir, "input.safetensors"))
        x = data["input"].cuda()
        row = {"model": model, "device": device_name, "batch": args.batch,
               "timesteps": args.timesteps, "size": args.size, "repeats": args.repeats,
               "sparseflow_dense_conv_engine": bench["dense_conv_engine"],
               "sparseflow_dense_ms": bench["dense_ms"],
               "sparseflow_optimized_ms": bench["optimized_ms"]}
        for label, tf32 in (("fp32", False), ("default_tf32", True)):
            ms, out = time_sj(net, functional, x, args.repeats, tf32)
            ref = data["dense_output"].cuda()
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            mean_err = ((out - ref).abs().sum() / ref.abs().sum()).item()
            top1 = (out.mean(0).argmax(-1) == ref.mean(0).argmax(-1)).float().mean().item()
            row[f"spikingjelly_{label}_ms"] = ms
            row[f"spikingjelly_{label}_vs_sparseflow_dense_error"] = err
            row[f"spikingjelly_{label}_vs_sparseflow_dense_mean_error"] = mean_err
            row[f"spikingjelly_{label}_vs_sparseflow_dense_top1"] = top1
        row["speedup_vs_spikingjelly_fp32"] = row["spikingjelly_fp32_ms"] / bench["optimized_ms"]
        row["speedup_vs_spikingjelly_tf32"] = row["spikingjelly_default_tf32_ms"] / bench["optimized_ms"]
        row["speedup_vs_own_dense"] = bench["dense_ms"] / bench["optimized_ms"]
        results.append(row)
        print(json.dumps(row), flush=True)
        del net
        torch.cuda.empty_cache()

    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nSparseFlow's dense convolutions: {results[0]['sparseflow_dense_conv_engine'] if results else '-'}")
    print(f"{'model':18} {'sj fp32':>9} {'sj tf32':>9} {'sf dense':>9} {'sf sparse':>9} "
          f"{'x sj fp32':>9} {'x sj tf32':>9} {'x dense':>8} {'sj max err':>10} {'mean err':>8} {'top-1':>6}")
    for r in results:
        print(f"{r['model']:18} {r['spikingjelly_fp32_ms']:9.2f} {r['spikingjelly_default_tf32_ms']:9.2f} "
              f"{r['sparseflow_dense_ms']:9.2f} {r['sparseflow_optimized_ms']:9.2f} "
              f"{r['speedup_vs_spikingjelly_fp32']:9.2f} {r['speedup_vs_spikingjelly_tf32']:9.2f} "
              f"{r['speedup_vs_own_dense']:8.2f} {r['spikingjelly_fp32_vs_sparseflow_dense_error']:10.1e} "
              f"{r['spikingjelly_fp32_vs_sparseflow_dense_mean_error']:8.1e} "
              f"{100 * r['spikingjelly_fp32_vs_sparseflow_dense_top1']:5.1f}%")


if __name__ == "__main__":
    main()

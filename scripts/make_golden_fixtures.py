#!/usr/bin/env python3
"""Generate golden-output fixtures from spikingjelly 2.0.0 for SparseFlow.

Usage:
    python3 scripts/make_golden_fixtures.py OUT_DIR [--only NAME[,NAME...]] [--threads N]

Writes, for every configuration NAME in CONFIGS:
    OUT_DIR/NAME.safetensors
and
    OUT_DIR/state_dict_keys.txt

Needs: torch (fp32, CPU is used), numpy, safetensors, spikingjelly==2.0.0
(+ loguru, which spikingjelly imports).  See tests/fixtures/README.md.

Conv2d / Linear weights are NOT stored in the fixtures.  Both this script and
the Rust side generate them with `gen_weight` below (SplitMix64 stream seeded
by FNV-1a-64 of the state_dict key xor base_seed, uniform in
[-1/sqrt(fan_in), 1/sqrt(fan_in)), rounded float64 -> float16 -> float32).
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

# ---------------------------------------------------------------------------
# Deterministic weight generator (reimplemented bit-for-bit on the Rust side)
# ---------------------------------------------------------------------------

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    h = FNV_OFFSET
    for b in data:
        h ^= b
        h = (h * FNV_PRIME) & MASK64
    return h


def splitmix64_stream(seed: int, n: int) -> np.ndarray:
    """Outputs 1..n of SplitMix64 started at state `seed` (element i uses
    state seed + (i+1)*golden)."""
    i1 = np.arange(1, n + 1, dtype=np.uint64)
    z = np.uint64(seed) + i1 * np.uint64(0x9E3779B97F4A7C15)  # wrapping
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return z


def gen_weight(name: str, shape, fan_in: int, base_seed: int) -> np.ndarray:
    """float32 tensor of `shape` (row-major) for state_dict key `name`."""
    n = int(np.prod(shape))
    seed = fnv1a64(name.encode("utf-8")) ^ (base_seed & MASK64)
    with np.errstate(over="ignore"):
        z = splitmix64_stream(seed, n)
    u = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    bound = 1.0 / math.sqrt(fan_in)
    w = (2.0 * u - 1.0) * bound  # float64
    # float64 -> float16 directly (round to nearest even), then exact widening to f32
    return w.astype(np.float16).astype(np.float32).reshape(shape)


def f32_hex(x) -> str:
    return "0x%08x" % int(np.asarray(x, dtype=np.float32).view(np.uint32))


def self_check():
    """First 4 generated values of "conv1.weight" (fan_in 3*7*7) with base_seed 0,
    plus the intermediate FNV hash and raw SplitMix64 outputs (for debugging)."""
    w = gen_weight("conv1.weight", (64, 3, 7, 7), 3 * 7 * 7, 0).reshape(-1)[:4]
    seed = fnv1a64(b"conv1.weight")
    with np.errstate(over="ignore"):
        z = splitmix64_stream(seed, 4)
    return ([f32_hex(v) for v in w], [repr(float(v)) for v in w],
            "0x%016x" % seed, ["0x%016x" % int(v) for v in z])


# ---------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------

CONFIGS = [
    # name, model fn, cnf, neuron kind, neuron kwargs
    dict(name="spiking_resnet18_lif", model="spiking_resnet18", cnf=None, neuron="lif",
         kw=dict(tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0, detach_reset=True)),
    dict(name="spiking_resnet18_if_soft", model="spiking_resnet18", cnf=None, neuron="if",
         kw=dict(v_threshold=1.0, v_reset=None)),
    dict(name="spiking_resnet18_plif", model="spiking_resnet18", cnf=None, neuron="plif",
         kw=dict(init_tau=2.0, decay_input=False, v_reset=0.0)),
    dict(name="sew_resnet18_add_lif", model="sew_resnet18", cnf="ADD", neuron="lif",
         kw=dict(tau=2.0, v_reset=0.0)),
    dict(name="sew_resnet18_iand_lif_soft", model="sew_resnet18", cnf="IAND", neuron="lif",
         kw=dict(tau=1.5, decay_input=False, v_reset=None, v_threshold=0.8)),
    dict(name="spiking_resnet50_lif", model="spiking_resnet50", cnf=None, neuron="lif",
         kw=dict(tau=2.0)),
    dict(name="sew_resnet50_iand_lif", model="sew_resnet50", cnf="IAND", neuron="lif",
         kw=dict(tau=2.0)),
]

T, N, NUM_CLASSES = 2, 2, 10
N_CAL = 16           # calibration batch (images per timestep)
RATE_LO, RATE_HI = 0.04, 0.30   # tuning target (acceptance: 0.02 .. 0.40)
MARGIN_MIN = 2e-5    # wanted min |h - v_threshold| over all neurons for the test input
MAX_INPUT_TRIES = 40


def import_sj():
    import torch  # noqa: F401
    from spikingjelly.activation_based import functional, neuron
    from spikingjelly.activation_based.model import sew_resnet, spiking_resnet
    return functional, neuron, spiking_resnet, sew_resnet


def neuron_class(neuron, kind):
    return {"lif": neuron.LIFNode, "if": neuron.IFNode, "plif": neuron.ParametricLIFNode}[kind]


def build(cfg, neuron, spiking_resnet, sew_resnet, num_classes=NUM_CLASSES):
    fn_mod = sew_resnet if cfg["model"].startswith("sew") else spiking_resnet
    fn = getattr(fn_mod, cfg["model"])
    kwargs = dict(spiking_neuron=neuron_class(neuron, cfg["neuron"]), num_classes=num_classes)
    if cfg["cnf"] is not None:
        kwargs["cnf"] = cfg["cnf"]
    kwargs.update(cfg["kw"])
    return fn(**kwargs)


def neuron_defaults(cfg, neuron):
    """Effective neuron parameters (constructor defaults filled in)."""
    import inspect
    cls = neuron_class(neuron, cfg["neuron"])
    sig = inspect.signature(cls.__init__)
    eff = {k: v.default for k, v in sig.parameters.items()
           if k not in ("self",) and v.default is not inspect.Parameter.empty}
    eff.update(cfg["kw"])
    return eff


def is_neuron(m, neuron):
    return isinstance(m, neuron.BaseNode)


def bn_for_neuron(path):
    """The BatchNorm that feeds a spiking neuron (its charge input)."""
    if path.endswith("downsample_sn"):
        return path[: -len("downsample_sn")] + "downsample.1"
    head, _, leaf = path.rpartition(".")
    assert leaf.startswith("sn"), path
    bn = "bn" + leaf[2:]
    return (head + "." + bn) if head else bn


# ---------------------------------------------------------------------------
# Independent re-implementation (reads ONLY the fixture + the generator) used
# to check that a fixture is self-contained and that the documented semantics
# are right.  Neuron dynamics are done in numpy float32 with the same
# expression order as spikingjelly 2.0.0's CPU kernels (true division by tau).
# ---------------------------------------------------------------------------

ARCH = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet50": ("bottleneck", [3, 4, 6, 3])}


def np_neuron(x_seq, meta, w=None):
    """x_seq float32 [T, ...] -> (spikes float32 [T, ...], h float32 [T, ...])."""
    kind = meta["neuron"]
    thr = np.float32(float(meta["v_threshold"]))
    vr = None if meta["v_reset"] == "none" else np.float32(float(meta["v_reset"]))
    rv = np.float32(0.0) if vr is None else vr
    decay_input = meta["decay_input"] == "true"
    if kind == "lif":
        tau = np.float32(float(meta["tau"]))
    elif kind == "plif":
        q = np.float32(1.0) / (np.float32(1.0) + np.exp(-np.float32(w)))  # sigmoid(w)
    v = np.full(x_seq.shape[1:], rv, dtype=np.float32)
    spikes, hs = [], []
    for x in x_seq.astype(np.float32):
        if kind == "if":
            h = v + x
        elif kind == "lif":
            h = v + (x - (v - rv)) / tau if decay_input else v - (v - rv) / tau + x
        else:
            h = v + (x - (v - rv)) * q if decay_input else v - (v - rv) * q + x
        h = h.astype(np.float32)
        s = (h >= thr).astype(np.float32)
        v = (h - s * thr) if vr is None else (s * vr + (np.float32(1.0) - s) * h)
        v = v.astype(np.float32)
        spikes.append(s)
        hs.append(h)
    return np.stack(spikes), np.stack(hs)


def reference_forward(path, threads=8):
    import torch
    import torch.nn.functional as F
    from safetensors import safe_open

    torch.set_num_threads(threads)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tens = {k: f.get_tensor(k) for k in f.keys()}
    base_seed = int(meta["base_seed"])
    model = meta["model"]
    sew = model.startswith("sew")
    cnf = meta["connect"]
    btype, layers = ARCH[model.split("_")[-1]]
    P = {k[len("param."):]: v for k, v in tens.items() if k.startswith("param.")}
    x = tens["input"]
    T_, N_ = x.shape[0], x.shape[1]
    spikes, margins = {}, []
    thr = float(meta["v_threshold"])

    def W(key, cout, cin, k):
        return torch.from_numpy(gen_weight(key, (cout, cin, k, k), cin * k * k, base_seed))

    def conv(name, t, cin, cout, k, stride, pad):
        y = F.conv2d(t.flatten(0, 1), W(name + ".weight", cout, cin, k), None, stride, pad)
        return y.view(T_, N_, *y.shape[1:])

    def bn(name, t):
        y = F.batch_norm(t.flatten(0, 1), P[name + ".running_mean"], P[name + ".running_var"],
                         P[name + ".weight"], P[name + ".bias"], False, 0.0, 1e-5)
        return y.view(t.shape)

    def sn(name, t):
        s, h = np_neuron(t.numpy(), meta, P.get(name + ".w", torch.tensor(0.0)).item()
                         if meta["neuron"] == "plif" else None)
        spikes[name] = s
        margins.append(np.abs(h.astype(np.float64) - thr).ravel())
        return torch.from_numpy(s)

    def sewf(a, b):
        if cnf == "add":
            return a + b
        if cnf == "and":
            return a * b
        if cnf == "iand":
            return a * (1.0 - b)
        raise ValueError(cnf)

    with torch.no_grad():
        t = sn("sn1", bn("bn1", conv("conv1", x, 3, 64, 7, 2, 3)))
        t = F.max_pool2d(t.flatten(0, 1), 3, 2, 1)
        t = t.view(T_, N_, *t.shape[1:])
        inplanes = 64
        exp = 1 if btype == "basic" else 4
        for li, nb in enumerate(layers, start=1):
            planes = 64 * 2 ** (li - 1)
            for bi in range(nb):
                p = "layer%d.%d." % (li, bi)
                stride = 2 if (li > 1 and bi == 0) else 1
                has_ds = bi == 0 and (stride != 1 or inplanes != planes * exp)
                xin = t
                if btype == "basic":
                    o = sn(p + "sn1", bn(p + "bn1", conv(p + "conv1", xin, inplanes, planes, 3, stride, 1)))
                    o = bn(p + "bn2", conv(p + "conv2", o, planes, planes, 3, 1, 1))
                    last = p + "sn2"
                else:
                    o = sn(p + "sn1", bn(p + "bn1", conv(p + "conv1", xin, inplanes, planes, 1, 1, 0)))
                    o = sn(p + "sn2", bn(p + "bn2", conv(p + "conv2", o, planes, planes, 3, stride, 1)))
                    o = bn(p + "bn3", conv(p + "conv3", o, planes, planes * 4, 1, 1, 0))
                    last = p + "sn3"
                idn = xin
                if has_ds:
                    idn = bn(p + "downsample.1",
                             conv(p + "downsample.0", xin, inplanes, planes * exp, 1, stride, 0))
                if not sew:
                    t = sn(last, o + idn)
                else:
                    o = sn(last, o)
                    if has_ds:
                        idn = sn(p + "downsample_sn", idn)
                    # BasicBlock: sew(identity, out); Bottleneck: sew(out, identity)
                    t = sewf(idn, o) if btype == "basic" else sewf(o, idn)
                inplanes = planes * exp
        t = t.mean(dim=(3, 4))  # AdaptiveAvgPool2d((1,1)) + flatten(x, 2) -> [T, N, C]
        out = F.linear(t, torch.from_numpy(gen_weight("fc.weight", (int(meta["num_classes"]), inplanes),
                                                       inplanes, base_seed)), P["fc.bias"])
    m = np.concatenate(margins)
    res = {
        "output_max_abs_diff": float((out - tens["output"]).abs().max()),
        "output_bit_equal": bool(torch.equal(out, tens["output"])),
        "spike_mismatches": {k[len("spikes."):]: int((spikes[k[len("spikes."):]] != v.numpy()).sum())
                             for k, v in tens.items() if k.startswith("spikes.")},
        "neuron_steps": int(m.size),
        "min_abs_h_minus_thr": float(m.min()),
        "n_abs_h_minus_thr_lt_1e-4": int((m < 1e-4).sum()),
        "n_abs_h_minus_thr_lt_1e-5": int((m < 1e-5).sum()),
        "n_abs_h_minus_thr_lt_1e-6": int((m < 1e-6).sum()),
    }
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--only", default="")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--no-keys", action="store_true")
    ap.add_argument("--verify-only", action="store_true",
                    help="only re-check existing OUT_DIR/*.safetensors against the reference")
    args = ap.parse_args()
    if args.verify_only:
        for fn in sorted(os.listdir(args.out_dir)):
            if fn.endswith(".safetensors"):
                print(fn, json.dumps(reference_forward(os.path.join(args.out_dir, fn), args.threads)))
        return

    import torch
    import torch.nn as nn
    from safetensors.torch import save_file
    import spikingjelly

    torch.set_num_threads(args.threads)
    functional, neuron, spiking_resnet, sew_resnet = import_sj()
    sj_version = getattr(spikingjelly, "__version__", None)
    if sj_version is None:
        from importlib.metadata import version
        sj_version = version("spikingjelly")
    os.makedirs(args.out_dir, exist_ok=True)

    chk_hex, chk_repr, chk_fnv, chk_z = self_check()
    print("self-check conv1.weight base_seed=0 first4:", chk_hex, chk_repr,
          "fnv1a64:", chk_fnv, "splitmix:", chk_z, flush=True)
    print("torch", torch.__version__, "spikingjelly", sj_version, flush=True)

    only = set(x for x in args.only.split(",") if x)
    for idx, cfg in enumerate(CONFIGS, start=1):
        if only and cfg["name"] not in only:
            continue
        t0 = time.time()
        base_seed = idx
        torch.manual_seed(1234 + base_seed)
        net = build(cfg, neuron, spiking_resnet, sew_resnet)
        functional.set_step_mode(net, "m")

        # --- generated conv / linear weights
        gen_keys = []
        with torch.no_grad():
            for mname, m in net.named_modules():
                if isinstance(m, nn.Conv2d):
                    fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                elif isinstance(m, nn.Linear):
                    fan_in = m.in_features
                else:
                    continue
                key = mname + ".weight"
                w = gen_weight(key, tuple(m.weight.shape), fan_in, base_seed)
                m.weight.copy_(torch.from_numpy(w))
                gen_keys.append(key)
            # fc bias: small deterministic values (stored in the fixture)
            g = torch.Generator().manual_seed(5000 + base_seed)
            fc_bound = 1.0 / math.sqrt(net.fc.in_features)
            net.fc.bias.copy_((torch.rand(net.fc.bias.shape, generator=g) * 2 - 1) * fc_bound)

            # --- PLIF: per-neuron-layer w = -log(tau - 1), tau ~ U(1.5, 3.0)
            if cfg["neuron"] == "plif":
                g = torch.Generator().manual_seed(6000 + base_seed)
                for mname, m in net.named_modules():
                    if isinstance(m, neuron.ParametricLIFNode):
                        tau = 1.5 + 1.5 * torch.rand((), generator=g).item()
                        m.w.fill_(-math.log(tau - 1.0))

            # --- BN affine: weight ~ U(0.6, 1.6), bias ~ U(-0.3, 0.5)
            g = torch.Generator().manual_seed(7000 + base_seed)
            bns = {}
            for mname, m in net.named_modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.copy_(0.6 + 1.0 * torch.rand(m.weight.shape, generator=g))
                    m.bias.copy_(-0.3 + 0.8 * torch.rand(m.bias.shape, generator=g))
                    m.momentum = None
                    bns[mname] = m

        neurons = [(n_, m) for n_, m in net.named_modules() if is_neuron(m, neuron)]
        neuron_paths = [n_ for n_, _ in neurons]
        eff = neuron_defaults(cfg, neuron)
        kind = cfg["neuron"]
        tau = eff.get("tau", eff.get("init_tau"))
        nmeta = {
            "neuron": kind,
            # IF has no tau; "nan" keeps the field parseable as a float
            "tau": "nan" if kind == "if" else repr(float(tau)),
            "decay_input": ("false" if kind == "if" else ("true" if eff["decay_input"] else "false")),
            "v_threshold": repr(float(eff["v_threshold"])),
            "v_reset": "none" if eff["v_reset"] is None else repr(float(eff["v_reset"])),
        }

        # calibration input
        gi = torch.Generator().manual_seed(9000 + base_seed)
        x_cal = torch.rand((T, N_CAL, 3, 32, 32), generator=gi, dtype=torch.float32)

        # recording hooks: neuron input (charge current) and output spikes
        record, record_in = {}, {}

        def make_hook(path):
            def hook(mod, inp, out):
                record[path] = out.detach()
                record_in[path] = inp[0].detach()
            return hook

        handles = [m.register_forward_hook(make_hook(n_)) for n_, m in neurons]

        def calibrate():
            with torch.no_grad():
                for m in bns.values():
                    m.reset_running_stats()
                net.train()
                functional.reset_net(net)
                net(x_cal)
                functional.reset_net(net)
                net.eval()

        def rates_on(inp):
            record.clear()
            record_in.clear()
            with torch.no_grad():
                functional.reset_net(net)
                out = net(inp)
                functional.reset_net(net)
            return out, {p: float(record[p].float().mean()) for p in neuron_paths}

        def min_margin():
            """min |h - v_threshold| over all neurons/steps of the last forward."""
            mm = float("inf")
            for p, m in neurons:
                w = m.w.item() if kind == "plif" else None
                s_ref, h = np_neuron(record_in[p].numpy(), nmeta, w)
                assert np.array_equal(s_ref, record[p].numpy()), p  # formula check
                mm = min(mm, float(np.abs(h.astype(np.float64) - float(eff["v_threshold"])).min()))
            return mm

        # --- tuning loop: recalibrate BN stats, shift BN bias of layers out of range
        for it in range(30):
            calibrate()
            _, r = rates_on(x_cal)
            bad = {p: v for p, v in r.items() if not (RATE_LO <= v <= RATE_HI)}
            if not bad:
                break
            with torch.no_grad():
                for p, v in bad.items():
                    bn = bns[bn_for_neuron(p)]
                    step = 0.15 * bn.weight.abs().mean().item()
                    bn.bias.add_(step if v < RATE_LO else -step)
        calibrate()
        _, r_cal = rates_on(x_cal)

        # --- test input: try input seeds until no neuron is within MARGIN_MIN of
        # its threshold (so that a reimplementation with another fp32 summation
        # order reproduces the spikes exactly); keep the best seed otherwise.
        best = None
        for k in range(MAX_INPUT_TRIES):
            input_seed = 10000 + 100 * base_seed + k
            x_try = torch.rand((T, N, 3, 32, 32), generator=torch.Generator().manual_seed(input_seed),
                               dtype=torch.float32)
            out_try, r_try = rates_on(x_try)
            mm = min_margin()
            ok_rates = all(0.02 <= v <= 0.40 for v in r_try.values())
            if best is None or (ok_rates, mm) > (best[0], best[1]):
                best = (ok_rates, mm, input_seed, x_try)
            if ok_rates and mm >= MARGIN_MIN:
                break
        _, margin, input_seed, x = best
        n_input_tries = k + 1
        out, r_eval = rates_on(x)

        # --- spikes to store
        last_leaf = "sn3" if "50" in cfg["model"] else "sn2"
        n_l4 = len(net.layer4)
        wanted = ["sn1", "layer1.0.sn1", "layer1.0." + last_leaf, "layer2.0." + last_leaf,
                  "layer4.%d.%s" % (n_l4 - 1, last_leaf)]
        if cfg["model"].startswith("sew"):
            wanted.append("layer2.0.downsample_sn")
            if "layer1.0.downsample_sn" in neuron_paths:
                wanted.append("layer1.0.downsample_sn")
        for p in wanted:
            assert p in neuron_paths, p

        tensors = {"input": x.contiguous(), "output": out.detach().contiguous()}
        sd = net.state_dict()
        stored_params = []
        for k, v in sd.items():
            if k in gen_keys or k.endswith("num_batches_tracked"):
                continue
            tensors["param." + k] = v.detach().to(torch.float32).contiguous().clone()
            stored_params.append(k)
        # re-run eval forward once more to capture spikes of the final eval pass
        record.clear()
        with torch.no_grad():
            functional.reset_net(net)
            out2 = net(x)
            functional.reset_net(net)
        assert torch.equal(out2, out)
        for p in wanted:
            s = record[p]
            assert bool(((s == 0) | (s == 1)).all()), p
            tensors["spikes." + p] = s.to(torch.uint8).contiguous()
        for h in handles:
            h.remove()

        meta = {
            "model": cfg["model"],
            "config": cfg["name"],
            **nmeta,
            "detach_reset": "true" if eff["detach_reset"] else "false",
            "surrogate": type(eff["surrogate_function"]).__name__,
            "connect": {None: "", "ADD": "add", "AND": "and", "IAND": "iand"}[cfg["cnf"]],
            "num_classes": str(NUM_CLASSES),
            "timesteps": str(T),
            "batch": str(N),
            "input_shape": json.dumps([T, N, 3, 32, 32]),
            "base_seed": str(base_seed),
            "spikingjelly_version": str(sj_version),
            "torch_version": torch.__version__,
            "check_conv1_weight_first4": "[" + ", ".join(chk_repr) + "]",
            "check_conv1_weight_first4_hex": json.dumps(chk_hex),
            "check_conv1_weight_fnv1a64": chk_fnv,
            "check_conv1_weight_splitmix_first4": json.dumps(chk_z),
            "generated_weights": json.dumps(gen_keys),
            "stored_params": json.dumps(stored_params),
            "spike_layers": json.dumps(wanted),
            "firing_rates": json.dumps({p: round(v, 6) for p, v in r_eval.items()}),
            "firing_rates_calibration_batch": json.dumps({p: round(v, 6) for p, v in r_cal.items()}),
            "bn_calibration": "momentum=None, reset_running_stats, one train-mode forward on a "
                              "[T,%d,3,32,32] U[0,1) batch, then eval" % N_CAL,
            "tuning_iterations": str(it),
            "input": "torch.rand([T,N,3,32,32], generator=torch.Generator().manual_seed(input_seed))",
            "input_seed": str(input_seed),
            "input_seed_tries": str(n_input_tries),
            "min_abs_h_minus_threshold": repr(margin),
        }
        path = os.path.join(args.out_dir, cfg["name"] + ".safetensors")
        save_file(tensors, path, metadata=meta)
        # independent re-implementation from the fixture alone; its margins go in the metadata
        ver = reference_forward(path, args.threads)
        print("  verify:", json.dumps(ver), flush=True)
        meta["reference_check"] = json.dumps(ver)
        save_file(tensors, path, metadata=meta)
        rmin = min(r_eval.values())
        rmax = max(r_eval.values())
        print("%s: %.1fs tune_it=%d input_seed=%d tries=%d margin=%.3g eval rates min=%.4f max=%.4f mean=%.4f out_absmax=%.4f size=%d"
              % (cfg["name"], time.time() - t0, it, input_seed, n_input_tries, margin, rmin, rmax,
                 sum(r_eval.values()) / len(r_eval), float(out.abs().max()),
                 os.path.getsize(path)), flush=True)

    # --- state_dict key lists (format read by tests/model_zoo.rs:
    #     "## <model> <neuron> [more words]" then "<key> <json shape>" lines)
    if not args.no_keys:
        lines = []
        for model, cnf in [("spiking_resnet18", None), ("spiking_resnet50", None),
                           ("sew_resnet18", "ADD"), ("sew_resnet50", "ADD")]:
            for kind in ("lif", "plif"):
                cfg = dict(model=model, cnf=cnf, neuron=kind,
                           kw=dict(tau=2.0) if kind == "lif" else dict(init_tau=2.0))
                net = build(cfg, neuron, spiking_resnet, sew_resnet, num_classes=1000)
                sd = net.state_dict()
                lines.append("## %s %s%s num_classes=1000 keys=%d"
                             % (model, kind, " cnf=%s" % cnf if cnf else "", len(sd)))
                for k, v in sd.items():
                    lines.append("%s %s" % (k, json.dumps(list(v.shape))))
                lines.append("")
        with open(os.path.join(args.out_dir, "state_dict_keys.txt"), "w") as f:
            f.write("# state_dict keys of spikingjelly %s models (torch %s), built with\n"
                    "# num_classes=1000 (the default); each line: key [shape].  All tensors are\n"
                    "# float32 except *.num_batches_tracked (int64, shape []).  PLIF's per-layer\n"
                    "# parameter <neuron path>.w is a 0-dim tensor.  LIF/IF neurons have no\n"
                    "# state_dict entries.  cnf does not change the key set of SEW models.\n\n"
                    % (sj_version, torch.__version__))
            f.write("\n".join(lines))
        print("wrote state_dict_keys.txt", flush=True)


if __name__ == "__main__":
    main()

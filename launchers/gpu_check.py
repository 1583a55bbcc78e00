"""The project's GPU checks, prepared so that a lent GPU's few minutes go to measuring (docs/benchmarks.md, "When
a GPU is lent", has the procedure; launchers/gpu_run.sh runs these steps on the device machine).

    python launchers/gpu_check.py kernels --out $OUT/kernels.json               # GPU: correctness, then timing
    python launchers/gpu_check.py tune --out $OUT/tune.json                     # GPU: the sm_90 tile table
    python launchers/gpu_check.py training --out $OUT/training.json model.preset=blip2-opt-2.7b model.dtype=bf16
    python launchers/gpu_check.py kernels --smoke --out /tmp/k.json             # CPU, TRITON_INTERPRET=1, tiny

kernels: both Triton kernels (classic prefix attention, Prefix-Tuning+) against float64 references on upcast
inputs (ptscale_kernels.prefix_attention_reference; SDPA + ptscale.prefix.plus.memory_term), output and every
gradient, as ||got - ref|| / ||ref||, beside the same number for the PEFT path (expand + concat + SDPA at the
case's dtype). bf16 / fp16 / fp32; BLIP-2 OPT-2.7B (head dim 80) and Q-Former shapes, d=128 L=1024, odd sizes,
no prefix, a case past 2**31 elements (int64 offsets). Fresh random inputs per case; every kernel output
buffer starts NaN-poisoned, so an unwritten element fails; each case runs twice and must be bitwise identical.
Then the two ceilings of the device (a large device-to-device copy, a large bf16 matmul) and the timing:
triton.testing.do_bench (CUDA events, L2 flushed before every rep, median), forward and forward + backward,
each method twice (the spread), ours vs the PEFT path vs SDPA without prefix. FLOPs: fwd 4*B*H*L*(P + L/2
causal | L)*D, fwd+bwd 3.5x fwd. The launch configuration of every timed shape (tile sizes, head-dim parts)
is recorded with it.

tune: each sm_90 tile candidate (ptscale_kernels.triton_prefix_attention.SM90_CANDIDATES) and the heuristic at
the shapes training launches, checked against float64 and timed (forward + backward, twice); the fastest per
shape class goes to tuned_sm90.json beside the report, to be committed as kernels/ptscale_kernels/tuned_sm90.json.

training: BLIP-2 OPT-2.7B geometry (random weights, ZeRO-3, world size 1, bf16): the loss through the kernel
against the reference path on one batch (eval mode, so dropout-free layers take the kernel), then
launchers/bench_train.run_mode per stage in the modes baseline / kernel / cache / ptscale, with the count
of prefix-attention calls each path served.

--smoke runs the same code on CPU under the Triton interpreter at tiny shapes (no do_bench, no ceilings; the
training step forces the hook onto the interpreted kernel for its parity check): a test runs it in CI so the
scripts are known to run before a GPU is spent on them. Exit status 1 when any check failed or errored.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "launchers", ROOT / "kernels", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

T0 = time.perf_counter()

# ||got - ref|| / ||ref|| allowed vs float64 (METHOD.md: fp32 far under 1e-3, bf16 operands 1e-3 .. 1e-2);
# fp32 runs the kernels' "ieee" dots unless torch's matmul precision says otherwise.
TOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}

# name, B, H, L, P, D, causal, pad, dtype, layout ("bhld" contiguous; "blhd" = HF's view(B, L, H, D).transpose(1, 2))
CASES = [
    ("opt2.7b-train", 16, 32, 50, 8, 80, True, True, "bf16", "blhd"),
    ("opt2.7b-train", 16, 32, 50, 16, 80, True, True, "fp16", "blhd"),
    ("opt2.7b-bench", 64, 32, 64, 8, 80, True, False, "bf16", "bhld"),
    ("qformer", 16, 12, 32, 8, 64, False, True, "bf16", "blhd"),
    ("qformer", 16, 12, 32, 8, 64, False, False, "fp32", "bhld"),
    ("lm-d128", 4, 32, 1024, 32, 128, True, False, "bf16", "bhld"),
    ("lm-d128-odd", 2, 8, 777, 24, 128, True, True, "fp16", "blhd"),
    ("d96", 4, 8, 200, 16, 96, True, True, "bf16", "blhd"),
    ("no-prefix", 2, 8, 100, 0, 64, True, True, "bf16", "bhld"),
    # B*H*L*D > 2**31: int64 offsets. Compared on the last batch row only (float64 of the whole would not fit).
    ("int64-offsets", 260, 32, 2048, 16, 128, True, False, "bf16", "bhld"),
]
PLUS_CASES = [  # name, B, H, L, P, D, causal, pad, dtype, feature map
    ("plus-opt2.7b", 16, 32, 50, 8, 80, True, True, "bf16", "elu1"),
    ("plus-qformer", 16, 12, 32, 8, 64, False, False, "fp32", "identity"),
    ("plus-lm-d128", 4, 32, 1024, 32, 128, True, False, "bf16", "relu"),
]
# name, B, H, L, P, D, causal. The Q-Former rows time the dropout-free kernel: in training with the 2.7B
# preset's attention dropout 0.1 the hook sends the Q-Former to the reference path (see docs/benchmarks.md).
TIMING = [
    ("opt2.7b-train", 16, 32, 43, 8, 80, True),  # 32 query tokens + ~11 text tokens
    ("opt2.7b-bench", 64, 32, 64, 16, 80, True),
    ("qformer-nodropout", 64, 12, 32, 8, 64, False),
    ("lm-d128", 8, 32, 1024, 32, 128, True),
    ("lm-d128", 8, 32, 4096, 32, 128, True),
]
# tune: the shapes training launches in 16-bit (the Q-Former runs in fp32 and keeps the heuristic), one per
# sm_90 shape class; name, B, H, L, P, D, causal, dtype.
TUNE = [
    ("opt2.7b-train", 16, 32, 43, 8, 80, True, "bf16"),  # class bfloat16/d80/L64
    ("opt2.7b-bench", 64, 32, 64, 16, 80, True, "bf16"),  # the same class at the benchmark's batch: a check
    ("opt2.7b-long", 16, 32, 100, 8, 80, True, "bf16"),  # bfloat16/d80/L128: long captions / VQA prompts
    ("lm-d128", 8, 32, 1024, 32, 128, True, "bf16"),  # bfloat16/d128/L1024
]
SMOKE_TUNE = [("smoke", 1, 2, 20, 4, 80, True, "fp16")]
SMOKE_CASES = [
    ("smoke", 2, 2, 21, 5, 80, True, True, "fp32", "blhd"),
    ("smoke", 2, 3, 17, 3, 64, False, False, "fp16", "bhld"),
    ("smoke-p0", 1, 2, 9, 0, 16, True, True, "fp32", "bhld"),
]
SMOKE_PLUS = [("smoke", 2, 2, 19, 4, 32, True, True, "fp32", "elu1")]
SMOKE_TIMING = [("smoke", 1, 2, 16, 4, 80, True)]


def stamp(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def rel(got, ref) -> float:
    """||got - ref|| / ||ref|| in float64; inf for a missing or non-finite result (NaN never passes)."""
    if got is None or ref is None:
        return math.inf
    got, ref = got.double(), ref.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def worst(values) -> float:
    values = list(values)
    return math.inf if any(math.isnan(v) for v in values) else max(values, default=0.0)


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _make(b, h, length, d, dtype, layout, dev, gen):
    import torch

    if layout == "blhd":
        x = torch.randn(b, length, h, d, generator=gen, device=dev, dtype=dtype).transpose(1, 2)
    else:
        x = torch.randn(b, h, length, d, generator=gen, device=dev, dtype=dtype)
    return x.requires_grad_()


def _padding(b, length, dev, gen):
    import torch

    lengths = torch.randint(max(1, length // 2), length + 1, (b,), generator=gen, device=dev)
    lengths[0] = length
    return torch.arange(length, device=dev)[None, :] < lengths[:, None]


def _run(fn, leaves, grad_out):
    for t in leaves:
        t.grad = None
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [None if t.grad is None else t.grad.detach().clone() for t in leaves]


def _bitwise_same(a, b) -> bool:
    import torch

    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x.nan_to_num(7.0),
                                                                                                 y.nan_to_num(7.0)))
               for x, y in zip(a, b, strict=True))


def poison(on: bool) -> None:
    """Every buffer the kernels write starts as NaN (on) or uninitialised (off)."""
    import ptscale_kernels.triton_prefix_attention as tpa
    import ptscale_kernels.triton_prefix_plus as tpp
    import torch

    for m in (tpa, tpp):
        if on:
            m._empty = lambda *a, **k: torch.empty(*a, **k).fill_(float("nan"))
            m._empty_like = lambda *a, **k: torch.empty_like(*a, **k).fill_(float("nan"))
        else:
            m._empty, m._empty_like = torch.empty, torch.empty_like


def check_classic(case, dev, seed: int) -> dict:
    import torch
    from ptscale_kernels import prefix_attention, prefix_attention_reference

    name, b, h, length, p, d, causal, pad, dt, layout = case
    dtype = _dtype(dt)
    gen = torch.Generator(device=dev).manual_seed(seed)
    q, k, v = (_make(b, h, length, d, dtype, layout, dev, gen) for _ in range(3))
    pk, pv = (torch.randn(h, p, d, generator=gen, device=dev, dtype=dtype).requires_grad_() for _ in range(2))
    grad_out = torch.randn(b, h, length, d, generator=gen, device=dev, dtype=dtype)
    mask = _padding(b, length, dev, gen) if pad else None
    leaves = [q, k, v, pk, pv]
    names = ["o", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]
    big = b * h * length * d > 2**31

    def ours(*x):
        return prefix_attention(*x, key_padding_mask=mask, causal=causal)

    t0 = time.perf_counter()
    got = _run(ours, leaves, grad_out)
    deterministic = _bitwise_same(got, _run(ours, leaves, grad_out))
    # Past 2**31 elements the float64 oracle runs on the last batch row (the prefix gradients sum over the
    # whole batch, so they are not compared there); elsewhere on everything.
    rows = slice(b - 1, b) if big else slice(None)
    leaves64 = [t[rows].detach().double().requires_grad_() if i < 3 else t.detach().double().requires_grad_()
                for i, t in enumerate(leaves)]
    mask64 = None if mask is None else mask[rows]
    want = _run(lambda *x: prefix_attention_reference(*x, key_padding_mask=mask64, causal=causal), leaves64,
                grad_out[rows].double())
    peft = None
    if not big:
        peft = _run(lambda *x: prefix_attention_reference(*x, key_padding_mask=mask, causal=causal),
                    [t.detach().clone().requires_grad_() for t in leaves], grad_out)
    res = {"kind": "classic", "case": name, "B": b, "H": h, "L": length, "P": p, "D": d, "causal": causal,
           "pad": pad, "dtype": dt, "layout": layout, "deterministic": deterministic}
    errors = []
    for i, n in enumerate(names):
        if big and i >= 4:
            continue
        g = got[i][rows] if i < 4 else got[i]
        res[f"ours_{n}"] = e = rel(g, want[i])
        errors.append(e)
        res[f"nonfinite_{n}"] = int((~got[i].isfinite()).sum().item())
        if peft is not None:
            res[f"peft_{n}"] = rel(peft[i], want[i])
    res["worst"], res["tol"] = worst(errors), TOL[dt]
    res["passed"] = bool(res["worst"] <= TOL[dt] and deterministic)
    res["seconds"] = time.perf_counter() - t0
    return res


def check_plus(case, dev, seed: int) -> dict:
    import torch
    import torch.nn.functional as F
    from ptscale_kernels import plus_memory, prefix_attention_mask, prefix_plus_attention

    from ptscale.prefix.plus import PlusLayer, memory_term

    name, b, h, length, p, d, causal, pad, dt, fm = case
    dtype = _dtype(dt)
    gen = torch.Generator(device=dev).manual_seed(seed)
    q, k, v = (_make(b, h, length, d, dtype, "blhd", dev, gen) for _ in range(3))
    pk, pv = (torch.randn(h, p, d, generator=gen, device=dev, dtype=dtype).requires_grad_() for _ in range(2))
    gate = torch.randn(h, generator=gen, device=dev).requires_grad_()
    grad_out = torch.randn(b, h, length, d, generator=gen, device=dev, dtype=dtype)
    mask = _padding(b, length, dev, gen) if pad else None
    leaves = [q, k, v, pk, pv, gate]

    def ours(q, k, v, pk, pv, gate):
        memory, norm = plus_memory(pk, pv, fm)
        return prefix_plus_attention(q, k, v, memory, norm, gate, feature_map=fm, key_padding_mask=mask,
                                     causal=causal)

    def torch_path(q, k, v, pk, pv, gate):
        m = prefix_attention_mask(b, length, 0, key_padding_mask=mask, causal=causal, device=q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        return out + memory_term(q, PlusLayer(pk, pv, gate, fm), d ** -0.5).to(out.dtype)

    got = _run(ours, leaves, grad_out)
    deterministic = _bitwise_same(got, _run(ours, leaves, grad_out))
    want = _run(torch_path, [t.detach().double().requires_grad_() for t in leaves], grad_out.double())
    res = {"kind": "plus", "case": name, "B": b, "H": h, "L": length, "P": p, "D": d, "causal": causal, "pad": pad,
           "dtype": dt, "feature_map": fm, "deterministic": deterministic}
    errors = []
    for i, n in enumerate(["o", "dq", "dk", "dv", "dprefix_k", "dprefix_v", "dgate"]):
        res[f"ours_{n}"] = e = rel(got[i], want[i])
        errors.append(e)
    res["worst"], res["tol"] = worst(errors), TOL[dt]
    res["passed"] = bool(res["worst"] <= TOL[dt] and deterministic)
    return res


def flops(b, h, length, p, d, causal) -> tuple[float, float]:
    fwd = 4.0 * b * h * length * (p + (length / 2 if causal else length)) * d
    return fwd, 3.5 * fwd


def ceilings(dev) -> dict:
    """The device's two ceilings, measured (METHOD.md): copy bandwidth (bytes read + written) and bf16 matmul."""
    import torch
    from triton.testing import do_bench

    def copy_ms() -> float:
        src = torch.randn(2**28, device=dev, dtype=torch.float32)  # 1 GiB, random (never zeros)
        dst = torch.empty_like(src)
        return do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")

    def matmul_ms(n: int) -> float:
        a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
        return do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")

    n = 8192
    return {"copy_gb_per_s": 2 * 2**28 * 4 / copy_ms() / 1e6, "bf16_matmul_tflops": 2 * n**3 / matmul_ms(n) / 1e9,
            "matmul_n": n}


def _fwd_bwd_ms(fn, grad_out, leaves, warmup: float, rep: float) -> float:
    from triton.testing import do_bench

    return do_bench(lambda: fn().backward(grad_out), warmup=warmup, rep=rep, grad_to_none=leaves,
                    return_mode="median")


def timing(row, dev, smoke: bool) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from ptscale_kernels import prefix_attention, prefix_attention_mask
    from ptscale_kernels import triton_prefix_attention as tpa

    name, b, h, length, p, d, causal = row
    dtype = torch.float32 if smoke else torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(1234)
    q, k, v = (_make(b, h, length, d, dtype, "blhd", dev, gen) for _ in range(3))
    pk, pv = (torch.randn(h, p, d, generator=gen, device=dev, dtype=dtype).requires_grad_() for _ in range(2))
    grad_out = torch.randn(b, h, length, d, generator=gen, device=dev, dtype=dtype)
    mask = prefix_attention_mask(b, length, p, causal=causal, device=dev)  # built once per forward in a model
    launch = tpa.describe_launch(b, h, length, p, d, dtype, dev)

    def ours():
        return prefix_attention(q, k, v, pk, pv, causal=causal)

    def peft():
        kk = torch.cat([pk.unsqueeze(0).expand(b, h, p, d), k], 2)
        vv = torch.cat([pv.unsqueeze(0).expand(b, h, p, d), v], 2)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)

    def plain():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    out = []
    for method, fn in (("ours", ours), ("peft", peft), ("sdpa_no_prefix", plain)):
        f_fwd, f_all = flops(b, h, length, 0 if method == "sdpa_no_prefix" else p, d, causal)
        if smoke:  # the interpreter: one run each, to prove the closures work; not a timing
            t = time.perf_counter()
            fn().backward(grad_out)
            ms_all = ms_fwd = ms_again = (time.perf_counter() - t) * 1e3
        else:
            from triton.testing import do_bench

            leaves = [q, k, v, pk, pv]
            with torch.no_grad():
                ms_fwd = do_bench(fn, warmup=25, rep=100, return_mode="median")
            ms_all = _fwd_bwd_ms(fn, grad_out, leaves, 25, 150)
            ms_again = _fwd_bwd_ms(fn, grad_out, leaves, 10, 100)  # the same again: the spread of one timing
        out.append({"shape": name, "B": b, "H": h, "L": length, "P": p, "D": d, "causal": causal, "method": method,
                    "dtype": str(dtype).removeprefix("torch."), "ms_fwd": ms_fwd, "ms_fwd_bwd": ms_all,
                    "ms_fwd_bwd_again": ms_again, "tflops_fwd": f_fwd / ms_fwd / 1e9,
                    "tflops_fwd_bwd": f_all / ms_all / 1e9, "launch": launch if method == "ours" else None})
    return out


def tune(row, dev, smoke: bool) -> dict:
    """Every sm_90 tile candidate and the heuristic at one shape: checked against float64 (a wrong or
    non-finite result disqualifies), then forward + backward timed twice with do_bench; the fastest wins."""
    import torch
    from ptscale_kernels import prefix_attention_reference
    from ptscale_kernels import triton_prefix_attention as tpa

    name, b, h, length, p, d, causal, dt = row
    dtype = _dtype(dt)
    gen = torch.Generator(device=dev).manual_seed(4321)
    q, k, v = (_make(b, h, length, d, dtype, "blhd", dev, gen) for _ in range(3))
    pk, pv = (torch.randn(h, p, d, generator=gen, device=dev, dtype=dtype).requires_grad_() for _ in range(2))
    grad_out = torch.randn(b, h, length, d, generator=gen, device=dev, dtype=dtype)
    leaves = [q, k, v, pk, pv]
    want = _run(lambda *x: prefix_attention_reference(*x, causal=causal),
                [t.detach().double().requires_grad_() for t in leaves], grad_out.double())
    shape = (b, h, length, p, d, dtype, dev)
    candidates = {"heuristic": tpa._heuristic_config(*shape)}
    for i, tiles in enumerate(tpa.SM90_CANDIDATES[:2] if smoke else tpa.SM90_CANDIDATES):
        candidates[f"cand{i}"] = tpa.candidate_config(tiles, *shape)
    results = []
    for label, cfg in candidates.items():
        res = {"candidate": label, "tiles": list(tpa.config_tiles(cfg))}
        try:
            def fn(*_, cfg=cfg):  # the leaves are closed over; _run passes them again
                return tpa._prefix_attention(q, k, v, pk, pv, causal=causal, config=cfg)

            res["worst"] = worst(rel(g, w) for g, w in zip(_run(fn, leaves, grad_out), want, strict=True))
            res["ok"] = res["worst"] <= TOL[dt]
            if smoke:
                t = time.perf_counter()
                fn().backward(grad_out)
                res["ms_fwd_bwd"] = res["ms_fwd_bwd_again"] = (time.perf_counter() - t) * 1e3
            else:
                res["ms_fwd_bwd"] = _fwd_bwd_ms(fn, grad_out, leaves, 25, 100)
                res["ms_fwd_bwd_again"] = _fwd_bwd_ms(fn, grad_out, leaves, 10, 100)
        except Exception as e:  # noqa: BLE001 - a candidate that fails (e.g. out of shared memory) is out
            res["ok"], res["error"] = False, f"{type(e).__name__}: {e}"[:500]
        results.append(res)
    valid = [r for r in results if r["ok"]]
    best = min(valid, key=lambda r: r["ms_fwd_bwd"]) if valid else None
    return {"shape": name, "B": b, "H": h, "L": length, "P": p, "D": d, "causal": causal, "dtype": dt,
            "shape_class": tpa.shape_class(length, d, dtype), "candidates": results,
            "best": None if best is None else best["candidate"], "tiles": None if best is None else best["tiles"]}


def step_tune(args) -> int:
    import torch

    dev = torch.device("cpu" if args.smoke else "cuda")
    report = _metadata(args.smoke) | {"step": "tune", "shapes": [], "errors": []}
    for row in SMOKE_TUNE if args.smoke else TUNE:
        try:
            r = tune(row, dev, args.smoke)
        except Exception as e:  # noqa: BLE001
            report["errors"].append({"tune": row, "error": traceback.format_exc()[-3000:]})
            stamp(f"ERROR tune {row}: {type(e).__name__}: {e}")
            continue
        report["shapes"].append(r)
        stamp(f"tune {r['shape']} ({r['shape_class']}): best {r['best']} " + " ".join(
            f"{c['candidate']}={c.get('ms_fwd_bwd', float('nan')):.3f}ms{'' if c['ok'] else '(out)'}"
            for c in r["candidates"]))
        _save(args.out, report)
    # One entry per class: the first shape listed for a class decides it (later ones are checks of it).
    classes: dict[str, dict] = {}
    for r in report["shapes"]:
        if r["tiles"] is not None and r["shape_class"] not in classes:
            classes[r["shape_class"]] = {"tiles": r["tiles"], "from": r["shape"], "candidate": r["best"]}
    table = {"device": report["device"], "date": report["date"], "triton": report["triton"],
             "command": report["command"], "classes": classes}
    report["table"] = table
    _save(args.out, report)
    _save(args.out.with_name("tuned_sm90.json"), table)
    print(f"gpu_check tune: {len(classes)} classes -> {args.out.with_name('tuned_sm90.json')} (commit it as "
          "kernels/ptscale_kernels/tuned_sm90.json)")
    return 1 if report["errors"] or not classes else 0


def _metadata(smoke: bool) -> dict:
    import torch
    import triton

    meta = {"command": shlex.join([sys.executable, *sys.argv]), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "device": "cpu (TRITON_INTERPRET=1)" if smoke else torch.cuda.get_device_name(),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    return meta


def _save(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")


def step_kernels(args) -> int:
    import torch

    dev = torch.device("cpu" if args.smoke else "cuda")
    report = _metadata(args.smoke) | {"step": "kernels", "checks": [], "timing": [], "errors": []}
    poison(True)
    cases = SMOKE_CASES if args.smoke else CASES
    for i, case in enumerate(cases):
        try:
            r = check_classic(case, dev, seed=100 + i)
        except Exception as e:  # noqa: BLE001 - record and go on: one failure must not cost the others
            report["errors"].append({"case": case, "error": traceback.format_exc()[-3000:]})
            stamp(f"ERROR {case}: {type(e).__name__}: {e}")
            continue
        finally:
            if not args.smoke:
                torch.cuda.empty_cache()
        report["checks"].append(r)
        stamp(f"{'PASS' if r['passed'] else 'FAIL'} {r['case']:14s} {r['dtype']} L{r['L']} P{r['P']} D{r['D']} "
              f"{'causal' if r['causal'] else 'bidir'}{' pad' if r['pad'] else ''} {r['layout']}: worst "
              f"{r['worst']:.2e} (tol {r['tol']:.0e}) det={r['deterministic']}")
        _save(args.out, report)
    for i, case in enumerate(SMOKE_PLUS if args.smoke else PLUS_CASES):
        try:
            r = check_plus(case, dev, seed=200 + i)
        except Exception as e:  # noqa: BLE001
            report["errors"].append({"case": case, "error": traceback.format_exc()[-3000:]})
            stamp(f"ERROR {case}: {type(e).__name__}: {e}")
            continue
        report["checks"].append(r)
        stamp(f"{'PASS' if r['passed'] else 'FAIL'} {r['case']:14s} {r['dtype']} {r['feature_map']}: worst "
              f"{r['worst']:.2e} (tol {r['tol']:.0e}) det={r['deterministic']}")
        _save(args.out, report)
    poison(False)
    if not args.no_timing:
        if not args.smoke:
            try:
                report["ceilings"] = ceilings(dev)
                stamp(f"ceilings: {report['ceilings']}")
            except Exception:  # noqa: BLE001
                report["errors"].append({"ceilings": True, "error": traceback.format_exc()[-3000:]})
        for row in SMOKE_TIMING if args.smoke else TIMING:
            try:
                report["timing"] += timing(row, dev, args.smoke)
            except Exception as e:  # noqa: BLE001
                report["errors"].append({"timing": row, "error": traceback.format_exc()[-3000:]})
                stamp(f"ERROR timing {row}: {type(e).__name__}: {e}")
            _save(args.out, report)
        print(f"{'shape':18s} {'L':>5s} {'P':>3s} {'D':>3s} {'method':15s} {'fwd ms':>8s} {'fwd TF/s':>9s} "
              f"{'f+b ms':>8s} {'f+b TF/s':>9s} {'again ms':>9s}")
        for t in report["timing"]:
            print(f"{t['shape']:18s} {t['L']:5d} {t['P']:3d} {t['D']:3d} {t['method']:15s} {t['ms_fwd']:8.3f} "
                  f"{t['tflops_fwd']:9.1f} {t['ms_fwd_bwd']:8.3f} {t['tflops_fwd_bwd']:9.1f} "
                  f"{t['ms_fwd_bwd_again']:9.3f}")
    failed = sum(not c["passed"] for c in report["checks"]) + len(report["errors"])
    report["summary"] = {"checks": len(report["checks"]), "failed_or_errors": failed}
    _save(args.out, report)
    print(f"gpu_check kernels: {len(report['checks'])} checks, {failed} failed or errored -> {args.out}")
    return 1 if failed else 0


def step_training(args) -> int:
    import bench_train as bt
    import torch

    from ptscale.config import load_recipe
    from ptscale.data.collate import make_collator
    from ptscale.data.sources import load_splits
    from ptscale.models.backbone import resolve_source
    from ptscale.models.build import build_model
    from ptscale.models.groups import set_trainable
    from ptscale.prefix import attention
    from ptscale.training import engine as ds
    from ptscale.training.sharded import build_backbone, cast_added_parameters

    report = _metadata(args.smoke) | {"step": "training", "phases": {}, "rows": [], "errors": []}
    try:
        import deepspeed

        report["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    stamp("imports done")
    cfg = load_recipe(None, args.overrides)
    dist = ds.init_distributed()
    template = ds.load_ds_template(args.ds)
    t = time.perf_counter()
    source = resolve_source(cfg.model, rank=dist.rank, barrier=ds.barrier)
    backbone = build_backbone(source, cfg.model, ds.zero3_config(template, cfg.stages[0], cfg.model.dtype,
                                                                 dist.world_size))
    model = build_model(cfg, backbone)
    cast_added_parameters(model, cfg.model.dtype)
    report["phases"]["build_s"] = time.perf_counter() - t
    if torch.cuda.is_available():
        report["phases"]["build_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    stamp(f"model built ({report['phases']['build_s']:.1f}s)")
    collator = make_collator(backbone, cfg.data)
    records = list(load_splits(cfg.data, collator).train)
    _save(args.out, report)

    # Parity at full geometry: one batch through the reference path and through the kernel (eval mode: no
    # dropout, so the Q-Former layers take the kernel too). PTSCALE_ATTENTION=triton raises where the kernel
    # cannot run. --smoke: the hook only offers the kernel on CUDA, so it is forced onto the interpreted one.
    real_choose = attention.choose_backend
    if args.smoke:
        attention.choose_backend = (lambda query, dropout, *, variant="classic":
                                    os.environ.get("PTSCALE_ATTENTION", "auto").replace("auto", "reference"))
    engine = None
    try:
        stage = cfg.stages[0]
        set_trainable(model, stage.train)
        engine = ds.build_engine(model, stage, ds.resolve_ds_config(template, stage, cfg.model.dtype,
                                                                    dist.world_size), 1)
        batch = collator.train_batch(records[: stage.batch_size])
        batch.pop("image_keys")
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        engine.module.eval()
        losses, served = {}, {}
        with torch.no_grad():
            for backend in ("reference", "triton", "reference"):
                os.environ["PTSCALE_ATTENTION"] = backend
                attention.served.clear()
                losses.setdefault(backend, []).append(float(engine(**batch).loss))
                served[backend] = {f"{v}/{p}": n for (v, p), n in attention.served.items()}
        ref, tri = losses["reference"][0], losses["triton"][0]
        report["parity"] = {"loss_reference": losses["reference"], "loss_triton": tri, "served": served,
                            "rel_diff": abs(tri - ref) / max(abs(ref), 1e-12)}
        # bf16 activations through 32 layers: the two paths round differently; 1e-2 relative on the loss.
        tol = 1e-2 if cfg.model.dtype == "bf16" else 1e-4
        report["parity"]["reference_repeatable"] = losses["reference"][0] == losses["reference"][1]
        report["parity"]["passed"] = bool(report["parity"]["rel_diff"] <= tol
                                          and set(served["triton"]) == {f"{cfg.prefix.kind}/triton"})
        stamp(f"parity: {report['parity']}")
        if not report["parity"]["passed"]:
            report["errors"].append({"phase": "parity", "error": "parity check failed", **report["parity"]})
    except Exception:  # noqa: BLE001
        report["errors"].append({"phase": "parity", "error": traceback.format_exc()[-4000:]})
        stamp("parity FAILED:\n" + traceback.format_exc()[-2000:])
    finally:
        attention.choose_backend = real_choose
        os.environ["PTSCALE_ATTENTION"] = "auto"
        if engine is not None:
            engine.module.train()
            ds.release(engine)  # an unreleased engine's hooks would corrupt every later one
    _save(args.out, report)

    for stage in cfg.stages:
        for mode in args.modes.split(","):
            t = time.perf_counter()
            try:
                row = bt.run_mode(model, collator, records, stage, template, cfg.model.dtype, dist.world_size,
                                  mode, args.steps, args.warmup)
                row["wall_s"] = time.perf_counter() - t
                report["rows"].append(row)
                stamp(f"{stage.name} {mode}: {row['samples_per_s']:.2f} samples/s, peak "
                      f"{row['peak_memory_mib'] / 1024:.1f} GiB, served {row['served']}, {row['wall_s']:.1f}s wall")
            except Exception:  # noqa: BLE001
                report["errors"].append({"phase": f"{stage.name}/{mode}", "error": traceback.format_exc()[-4000:]})
                stamp(f"{stage.name} {mode} FAILED:\n" + traceback.format_exc()[-2000:])
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            _save(args.out, report)
    bt.add_speedups(report["rows"])
    _save(args.out, report)
    print(f"{'stage':14s}{'mode':10s}{'samples/s':>10s}{'tokens/s':>10s}{'peak GiB':>9s}{'speed-up':>9s}{'MFU':>7s}")
    for r in report["rows"]:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['stage']:14s}{r['mode']:10s}{r['samples_per_s']:10.2f}{r['tokens_per_s']:10.0f}"
              f"{r['peak_memory_mib'] / 1024:9.1f}{r.get('speedup_vs_baseline', 1.0):8.2f}x{mfu:>7s}")
    stamp(f"done; errors: {len(report['errors'])}")
    ds.barrier()
    return 1 if report["errors"] else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("kernels", "tune", "training"))
    ap.add_argument("--out", type=Path, required=True, help="the JSON report (written after every case)")
    ap.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny shapes, no do_bench")
    ap.add_argument("--no-timing", action="store_true", help="kernels: correctness only")
    ap.add_argument("--ds", default=str(ROOT / "ds_configs" / "zero3.json"), help="training: DeepSpeed template")
    ap.add_argument("--steps", type=int, default=20, help="training: timed steps per mode")
    ap.add_argument("--warmup", type=int, default=6, help="training: batches in the timed cycle, run once untimed")
    ap.add_argument("--modes", default="baseline,kernel,cache,ptscale", help="training: comma-separated")
    ap.add_argument("overrides", nargs="*", help="training: recipe overrides (key=value)")
    return ap.parse_intermixed_args(argv)  # recipe overrides may follow the options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        # Must precede the first import of triton (Triton picks interpreter or compiler at @jit time).
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("gpu_check --smoke: triton was imported before TRITON_INTERPRET=1 could be set", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: needs a CUDA GPU (or --smoke on CPU)", file=sys.stderr)
            return 2
    return {"kernels": step_kernels, "tune": step_tune, "training": step_training}[args.step](args)


if __name__ == "__main__":
    sys.exit(main())

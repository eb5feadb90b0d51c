"""Reference values for neva's FP8 numerics (core/include/neva/nn/fp8.h), from torch's float8 dtypes
and Transformer Engine's delayed-scaling rules written out here independently of neva's C++:

- quantisation: q = clamp(x * scale, -fp8_max, fp8_max) cast to float8_e4m3fn / float8_e5m2 (round to
  nearest even; saturating, as TE's casts; NaN stays NaN), fp8_max 448 / 57344;
- the scale update (TE's amax_and_scale_update): amax from the history ("max": over the whole
  history, the current entry included; "most_recent": the current entry), scale = (fp8_max / amax) /
  2^margin, the previous scale kept when amax is 0 or not finite, an infinite scale replaced by the
  largest float; then the history rolled (entry i takes entry i + 1, the current amax goes to the
  last slot, entry 0 is cleared for the next step). With an interval of N the history rolls every
  step and the scale is recomputed on every N-th update;
- the FP8 GEMM: y = (a * scale_inv_a) @ (b * scale_inv_b)^T in float32 (torch._scaled_mm's result,
  checked equal here), and rounded to bfloat16;
- an FP8 linear layer trained for three steps (TE's Linear under fp8_autocast, written out): the
  forward GEMM of the E4M3 input and weight, the input gradient dq(grad) @ dq(weight) and the weight
  gradient dq(grad)^T @ dq(input) with the output gradient in E5M2 (hybrid) or E4M3, the bias gradient
  in float32, each role's amax recorded and the three scales updated after each step (history 2,
  margin 1, "max"); and one step with current scaling (each scale from the tensor's own amax).

Usage: fp8_oracle.py OUTPUT_DIR
"""
import json
import math
import pathlib
import sys

import torch
from safetensors.torch import save_file

FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
DTYPE = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def quantize(x, scale, fmt):
    return (x * scale).clamp(-FP8_MAX[fmt], FP8_MAX[fmt]).to(DTYPE[fmt])


def scale_updates(amaxes, length, margin, algo, interval, fmt):
    """Per step: the amax recorded, then the update; returns the scales and histories after each."""
    history = [0.0] * length
    scale = 1.0
    out = []
    for k, amax in enumerate(amaxes, start=1):
        history[0] = max(history[0], amax) if not math.isnan(amax) else float("nan")
        if algo == "max":
            chosen = max(history) if not any(math.isnan(h) for h in history) else float("nan")
        else:
            chosen = history[0]
        if k % interval == 0 and chosen > 0 and math.isfinite(chosen):
            scale = (FP8_MAX[fmt] / chosen) / 2.0 ** margin
            scale = float(torch.tensor(scale, dtype=torch.float32))
            if math.isinf(scale):
                scale = float(torch.finfo(torch.float32).max)
        history = history[1:] + [history[0]]
        history[0] = 0.0
        out.append({"scale": scale, "history": [repr(h) for h in history]})  # inf, nan as text
    return out


def dequantize(q, scale):
    return q.float() * torch.tensor(scale, dtype=torch.float32).reciprocal()


def linear_steps(tensors):
    """Three steps of an FP8 linear layer (delayed scaling) per gradient format, and one with current scaling."""
    m, k, n = 12, 32, 20
    steps = [(torch.randn(m, k) * (1 + i), torch.randn(n, k) * 0.2 * (1 + i), torch.randn(n) * 0.1,
              torch.randn(m, n) * 1e-3 * (i + 1)) for i in range(3)]
    for i, (x, w, b, g) in enumerate(steps):
        tensors[f"lin_x_{i}"], tensors[f"lin_w_{i}"], tensors[f"lin_b_{i}"], tensors[f"lin_g_{i}"] = x, w, b, g
    length, margin = 2, 1
    for grad_fmt in ("e5m2", "e4m3"):
        roles = {"input": "e4m3", "weight": "e4m3", "grad": grad_fmt}
        history = {r: [0.0] * length for r in roles}
        scale = {r: 1.0 for r in roles}
        for i, (x, w, b, g) in enumerate(steps):
            xq = quantize(x, scale["input"], "e4m3")
            wq = quantize(w, scale["weight"], "e4m3")
            gq = quantize(g, scale["grad"], grad_fmt)
            for role, t in (("input", x), ("weight", w), ("grad", g)):
                history[role][0] = max(history[role][0], t.abs().max().item())
            y = dequantize(xq, scale["input"]) @ dequantize(wq, scale["weight"]).t() + b
            dx = dequantize(gq, scale["grad"]) @ dequantize(wq, scale["weight"])
            dw = dequantize(gq, scale["grad"]).t() @ dequantize(xq, scale["input"])
            name = f"{grad_fmt}_{i}"
            tensors[f"lin_y_{name}"], tensors[f"lin_dx_{name}"], tensors[f"lin_dw_{name}"] = y, dx, dw
            tensors[f"lin_db_{name}"] = g.sum(0)
            for role, fmt in roles.items():  # "max" over the history, then the roll
                amax = max(history[role])
                if amax > 0 and math.isfinite(amax):
                    scale[role] = float(torch.tensor((FP8_MAX[fmt] / amax) / 2.0 ** margin, dtype=torch.float32))
                history[role] = history[role][1:] + [history[role][0]]
                history[role][0] = 0.0
            tensors[f"lin_scales_{name}"] = torch.tensor([scale["input"], scale["weight"], scale["grad"]])
    # Current scaling, E4M3 gradients, margin 1: each tensor's scale from its own amax.
    x, w, b, g = steps[0]
    cur = {r: float(torch.tensor((448.0 / t.abs().max().item()) / 2.0, dtype=torch.float32)) for r, t in
           (("input", x), ("weight", w), ("grad", g))}
    xq, wq, gq = quantize(x, cur["input"], "e4m3"), quantize(w, cur["weight"], "e4m3"), quantize(g, cur["grad"], "e4m3")
    tensors["lin_y_current"] = dequantize(xq, cur["input"]) @ dequantize(wq, cur["weight"]).t() + b
    tensors["lin_dx_current"] = dequantize(gq, cur["grad"]) @ dequantize(wq, cur["weight"])
    tensors["lin_dw_current"] = dequantize(gq, cur["grad"]).t() @ dequantize(xq, cur["input"])


def main():
    out_dir = pathlib.Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tensors = {}
    # Quantisation: ordinary values, values beyond the range (saturate), tiny ones (subnormals, zero),
    # infinities and NaN.
    x = torch.cat([torch.randn(200) * 3, torch.tensor([500.0, -1e6, 70000.0, 61000.0, 1e-7, -3e-3, 0.0,
                                                      float("inf"), float("-inf"), float("nan")])])
    tensors["x"] = x
    for fmt in ("e4m3", "e5m2"):
        for scale in (1.0, 0.37, 12.5):
            tensors[f"q_{fmt}_{scale}"] = quantize(x, scale, fmt)
    # The GEMM: a [16, 48] quantised with one scale, b [24, 48] with another.
    a = torch.randn(16, 48) * 2
    b = torch.randn(24, 48) * 0.1
    for fa, fb in (("e4m3", "e4m3"), ("e4m3", "e5m2"), ("e5m2", "e4m3")):
        sa, sb = FP8_MAX[fa] / a.abs().max().item(), FP8_MAX[fb] / b.abs().max().item()
        qa, qb = quantize(a, sa, fa), quantize(b, sb, fb)
        inv_a, inv_b = torch.tensor(1.0 / sa), torch.tensor(1.0 / sb)
        reference = (qa.float() * inv_a) @ (qb.float() * inv_b).t()
        torch_mm = torch._scaled_mm(qa, qb.t(), scale_a=inv_a, scale_b=inv_b, out_dtype=torch.float32)
        assert torch.equal(reference, torch_mm), "torch._scaled_mm differs from dequantise-then-matmul"
        name = f"{fa}_{fb}"
        tensors[f"mm_a_{name}"], tensors[f"mm_b_{name}"] = qa, qb
        tensors[f"mm_inv_a_{name}"], tensors[f"mm_inv_b_{name}"] = inv_a.reshape(1), inv_b.reshape(1)
        tensors[f"mm_f32_{name}"] = reference
        tensors[f"mm_bf16_{name}"] = reference.to(torch.bfloat16)
    linear_steps(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "fp8.safetensors"))

    amaxes = [3.0, 0.5, 0.0, 7.0, float("inf"), 2.0, 1e-40, 0.25, float("nan"), 5.0, 1.0, 0.125]
    updates = {}
    for algo in ("max", "most_recent"):
        for length in (1, 4):
            for margin in (0, 2):
                for interval in (1, 3):
                    for fmt in ("e4m3", "e5m2"):
                        key = f"{algo}_{length}_{margin}_{interval}_{fmt}"
                        updates[key] = scale_updates(amaxes, length, margin, algo, interval, fmt)
    (out_dir / "scale_updates.json").write_text(json.dumps({"amaxes": [repr(a) for a in amaxes], "updates": updates}))
    print(f"fp8 reference: {len(tensors)} tensors, {len(updates)} scale-update sequences")


if __name__ == "__main__":
    main()

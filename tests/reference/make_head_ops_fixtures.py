#!/usr/bin/env python3
"""Reference fixtures for clhclip's CAT-Seg head layers (clhclip/head_ops.h), made with torch.

Offline tool: CI never runs it (CI has no torch). For each case it draws float32 inputs and an
upstream gradient dy, runs the torch op in float64 (after checking that float32 agrees), takes
the gradients with autograd as sum(dy * y), and stores inputs, outputs and gradients as F32 in
one safetensors file, tensor names "<case>.<name>":

  conv7      conv2d 7x7 pad 3 stride 1, x [2,3,9,11], w [4,3,7,7], b [4]
  conv3s2    conv2d 3x3 pad 1 stride 2, x [2,5,7,9], w [3,5,3,3], b [3]
  conv1      conv2d 1x1, x [2,5,3,4], w [6,5,1,1], b [6]
  convt2     conv_transpose2d k2 s2, x [2,5,3,4], w [5,3,2,2], b [3]
  convt4     conv_transpose2d k4 s4, x [1,3,2,3], w [3,2,4,4], b [2]
  gn         group_norm G=2 eps 1e-5, x [2,6,3,4], gamma/beta [6]
  up_ac, up, down_ac, down  bilinear 5x7 -> 12x10 and 12x10 -> 5x7, align_corners true/false
  pool2      avg_pool2d 2x2 on x [2,3,7,9] (floor mode)

Each case holds x (and w, b, gamma, beta where used), dy, y, dx (and dw, db, dgamma, dbeta).

    python3 tests/reference/make_head_ops_fixtures.py --out tests/fixtures/head_ops/head_ops.safetensors
"""

import argparse
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def run_case(out, name, fn, inputs, seed):
    gen = torch.Generator().manual_seed(seed)
    x32 = {k: (torch.rand(v, generator=gen) * 2 - 1).float() for k, v in inputs.items()}
    y32 = fn(**x32)
    dy = (torch.rand(y32.shape, generator=gen) * 2 - 1).float()
    x64 = {k: v.double().requires_grad_(True) for k, v in x32.items()}
    y64 = fn(**x64)
    err = (y64.float() - y32).abs().max().item() / max(y64.abs().max().item(), 1e-30)
    assert err < 1e-5, f"{name}: float32 and float64 torch differ by {err}"
    (y64 * dy.double()).sum().backward()
    for k, v in x32.items():
        out[f"{name}.{k}"] = v.contiguous()
        grad = "d" + k
        out[f"{name}.{grad}"] = x64[k].grad.float().contiguous()
    out[f"{name}.dy"] = dy.contiguous()
    out[f"{name}.y"] = y64.detach().float().contiguous()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = {}
    run_case(out, "conv7", lambda x, w, b: F.conv2d(x, w, b, stride=1, padding=3),
             {"x": (2, 3, 9, 11), "w": (4, 3, 7, 7), "b": (4,)}, 1)
    run_case(out, "conv3s2", lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1),
             {"x": (2, 5, 7, 9), "w": (3, 5, 3, 3), "b": (3,)}, 2)
    run_case(out, "conv1", lambda x, w, b: F.conv2d(x, w, b),
             {"x": (2, 5, 3, 4), "w": (6, 5, 1, 1), "b": (6,)}, 3)
    run_case(out, "convt2", lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2),
             {"x": (2, 5, 3, 4), "w": (5, 3, 2, 2), "b": (3,)}, 4)
    run_case(out, "convt4", lambda x, w, b: F.conv_transpose2d(x, w, b, stride=4),
             {"x": (1, 3, 2, 3), "w": (3, 2, 4, 4), "b": (2,)}, 5)
    run_case(out, "gn", lambda x, gamma, beta: F.group_norm(x, 2, gamma, beta, eps=1e-5),
             {"x": (2, 6, 3, 4), "gamma": (6,), "beta": (6,)}, 6)
    for name, size, shape, align, seed in [("up_ac", (12, 10), (2, 3, 5, 7), True, 7),
                                           ("up", (12, 10), (2, 3, 5, 7), False, 8),
                                           ("down_ac", (5, 7), (2, 3, 12, 10), True, 9),
                                           ("down", (5, 7), (2, 3, 12, 10), False, 10)]:
        run_case(out, name,
                 lambda x, size=size, align=align: F.interpolate(x, size=size, mode="bilinear",
                                                                 align_corners=align),
                 {"x": shape}, seed)
    run_case(out, "pool2", lambda x: F.avg_pool2d(x, 2), {"x": (2, 3, 7, 9)}, 11)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(out, args.out, metadata={"generator": "make_head_ops_fixtures.py",
                                       "torch": torch.__version__})
    print(f"wrote {args.out}: {len(out)} tensors, {os.path.getsize(args.out)} bytes")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Write tests/fixtures/optim/adamw.safetensors: an AdamW trajectory computed by real torch.

Three fixed fp32 parameters in two parameter groups (different lr, betas, eps and weight
decay) get fixed per-step gradients for STEPS steps. Each step runs, as a training loop does,
    torch.nn.utils.clip_grad_norm_  ->  torch.optim.AdamW.step  ->  scheduler.step
with transformers' get_cosine_schedule_with_warmup (a LambdaLR). Two scenarios are stored:
"noclip" (the norm is measured with max_norm = inf, so nothing is scaled) and "clip" (a
max_norm that some steps exceed and others do not). tests/test_optim.c replays both with
clhclip and compares the parameters, the moments m and v, the norms and the learning rates.

Hyper-parameters are rounded to float32 before torch sees them, because clhclip's config
holds floats: both sides then run with the same numbers (torch's 0.999 is not 0.999f).

The file also holds schedule curves for the warm-up/cosine formula: transformers'
multiplier for a few warm-up lengths, and torch.optim.lr_scheduler.CosineAnnealingLR
(the warm-up 0 case) divided by its base lr.

Run from the repository root (offline):  python3 tests/reference/make_optim_fixtures.py
"""
import os

import numpy as np
import safetensors
import torch
import transformers
from safetensors.torch import save_file
from transformers import get_cosine_schedule_with_warmup

OUT = os.path.join("tests", "fixtures", "optim", "adamw.safetensors")

STEPS = 6
TOTAL = 8
WARMUP = 2
SHAPES = [(3, 5), (7,), (2, 141)]  # odd sizes; the last spans two 256-item work-groups
GROUP_OF = [0, 0, 1]
# per group: lr, beta1, beta2, eps, weight_decay
GROUPS = [
    (0.05, 0.9, 0.999, 1e-8, 0.1),
    (0.02, 0.8, 0.99, 1e-6, 0.0),
]
GRAD_SCALES = [1.0, 0.3, 2.5, 0.05, 1.2, 0.7]  # per step: the clip scenario clips some
MAX_NORM = 40.0
SCHEDULE_WARMUPS = [0, 2, 3]


def f32(x):
    return float(np.float32(x))


def make_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float32) for s in SHAPES]
    grads = []
    for k in range(STEPS):
        # each tensor gets its own magnitude so the global norm mixes them unevenly
        grads.append([torch.randn(s, generator=gen, dtype=torch.float32) * GRAD_SCALES[k] * (i + 1)
                      for i, s in enumerate(SHAPES)])
    return params, grads


def run(params_init, grads, max_norm):
    params = [p.clone().requires_grad_(True) for p in params_init]
    groups = []
    for g, (lr, b1, b2, eps, wd) in enumerate(GROUPS):
        groups.append({
            "params": [p for p, go in zip(params, GROUP_OF) if go == g],
            "lr": f32(lr), "betas": (f32(b1), f32(b2)), "eps": f32(eps), "weight_decay": f32(wd),
        })
    opt = torch.optim.AdamW(groups, foreach=False)
    sched = get_cosine_schedule_with_warmup(opt, WARMUP, TOTAL)
    out = {"norm": [], "lr": [], "params": [], "m": [], "v": []}
    for k in range(STEPS):
        for p, g in zip(params, grads[k]):
            p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
        out["norm"].append(float(norm))
        out["lr"].append([grp["lr"] for grp in opt.param_groups])
        opt.step()
        sched.step()
        out["params"].append([p.detach().clone() for p in params])
        out["m"].append([opt.state[p]["exp_avg"].clone() for p in params])
        out["v"].append([opt.state[p]["exp_avg_sq"].clone() for p in params])
        assert int(opt.state[params[0]]["step"]) == k + 1
    return out


def schedule_curves():
    curves = {}
    dummy = torch.zeros(1, requires_grad=True)
    for w in SCHEDULE_WARMUPS:
        opt = torch.optim.SGD([dummy], lr=1.0)
        sched = get_cosine_schedule_with_warmup(opt, w, TOTAL)
        values = []
        for _ in range(TOTAL + 1):
            values.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        curves[f"schedule_w{w}"] = torch.tensor(values, dtype=torch.float64)
    base = 0.5
    opt = torch.optim.SGD([dummy], lr=base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL, eta_min=0.0)
    values = []
    for _ in range(TOTAL + 1):
        values.append(opt.param_groups[0]["lr"] / base)
        opt.step()
        sched.step()
    curves["cosine_annealing"] = torch.tensor(values, dtype=torch.float64)
    return curves


def main():
    params, grads = make_inputs()
    tensors = {
        "config": torch.tensor([[f32(x) for x in g] for g in GROUPS], dtype=torch.float32),
        "group_of": torch.tensor(GROUP_OF, dtype=torch.int64),
        "schedule": torch.tensor([STEPS, TOTAL, WARMUP], dtype=torch.int64),
        "max_norm": torch.tensor([MAX_NORM], dtype=torch.float32),
        "schedule_warmups": torch.tensor(SCHEDULE_WARMUPS, dtype=torch.int64),
    }
    for i, p in enumerate(params):
        tensors[f"param{i}.init"] = p
    for k in range(STEPS):
        for i, g in enumerate(grads[k]):
            tensors[f"grad{i}.step{k}"] = g
    clipped_steps = 0
    for name, max_norm in (("noclip", float("inf")), ("clip", MAX_NORM)):
        out = run(params, grads, max_norm)
        tensors[f"{name}.norm"] = torch.tensor(out["norm"], dtype=torch.float64)
        tensors[f"{name}.lr"] = torch.tensor(out["lr"], dtype=torch.float64)
        for k in range(STEPS):
            for i in range(len(SHAPES)):
                for key in ("params", "m", "v"):
                    tensors[f"{name}.{key}{i}.step{k}"] = out[key][k][i].contiguous()
        if name == "clip":
            clipped_steps = sum(n > MAX_NORM for n in out["norm"])
    assert 0 < clipped_steps < STEPS, "the clip scenario must clip some steps and not others"
    tensors.update(schedule_curves())
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    meta = {"generator": f"make_optim_fixtures.py torch {torch.__version__} "
                         f"transformers {transformers.__version__} "
                         f"safetensors {safetensors.__version__}"}
    save_file(tensors, OUT, metadata=meta)
    print(f"wrote {OUT}: {len(tensors)} tensors, {os.path.getsize(OUT)} bytes, "
          f"clip scenario clipped {clipped_steps}/{STEPS} steps")


if __name__ == "__main__":
    main()

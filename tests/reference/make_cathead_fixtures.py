#!/usr/bin/env python3
"""Reference fixtures for clhclip's CAT-Seg head (hclip-spec section 5), made with torch.

Offline tool: CI never runs it (CI has no torch). An independent functional PyTorch version of
the CAT-Seg head, written from hclip-spec 5.2-5.5 (and checked against the semantics of the
released CAT-Seg code), with configurable sizes. For one config it draws random parameters and
inputs, computes logits, the loss and the gradients of every parameter and input, checks
float32 against float64 and autograd against finite differences, and writes
params.safetensors, inputs.safetensors and expected.safetensors into --out.
tests/reference/README.md ("CAT-Seg head fixtures") documents names, shapes and layouts.

    python3 tests/reference/make_cathead_fixtures.py --config tiny \
        --out tests/fixtures/cathead_tiny     # also tiny_topk, tiny_pool1

Layouts: feature maps NCHW; nn.Linear weights [out, in]; Conv2d [out, in, k, k];
ConvTranspose2d [in, out, k, k]. All tensors are F32 except `labels` (U8, 255 = ignore).
"""

import argparse
import json
import math
import os
import struct
import sys
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

GENERATOR = "make_cathead_fixtures.py"
F64_AGREEMENT = 1e-5  # max |f32 - f64| / max |f64|, per forward output
F64_GRAD_AGREEMENT = 1e-4  # the same, per gradient (some are sums with heavy cancellation)
FD_AGREEMENT = 1e-6  # |fd - autograd| / |autograd| along a random direction (float64)
FD_EPS = float(os.environ.get("CATHEAD_FD_EPS", "1e-7"))
FD_ABS_FLOOR = 1e-8  # roundoff of the central difference (|loss| ~ 1, eps 1e-7)
LIN_ATTN_EPS = 1e-6  # "Transformers are RNNs" denominator guard
LN_EPS = 1e-5
GN_EPS = 1e-5
MASK_VALUE = -100.0  # shifted-window attention mask, and logits of classes dropped by top-k


@dataclass(frozen=True)
class HeadConfig:
    batch: int = 2  # B
    grid: int = 6  # g: CLIP token grid (g x g), logits are 4g x 4g
    patch: int = 8  # crop = g * patch; labels are crop x crop
    d_img: int = 16  # Dimg: dense CLIP feature width (ViT-B: 512)
    d_vis: int = 16  # Dv: width of the hooked vision blocks (ViT-B: 768)
    n_classes: int = 5  # T
    n_prompts: int = 2  # P
    hidden: int = 12  # ViT-B: 128
    heads: int = 2  # ViT-B: 4
    n_layers: int = 2
    window: int = 3  # Swin window (ViT-B: 12); shift = window // 2
    pad_len: int = 8  # class-attention length (ViT-B: 256)
    pool: int = 1  # class-attention AvgPool size (1 test, 2 train)
    appearance_proj: int = 8  # ViT-B: 128
    text_proj: int = 6  # ViT-B: 128
    guidance_up: tuple = (8, 6)  # ConvTranspose k2 / k4 output widths (ViT-B: 256, 128)
    decoder_guidance_proj: tuple = (4, 8)  # ViT-B: 32, 16
    decoder: tuple = (16, 8)  # DoubleConv output widths (ViT-B: 64, 32)
    gn_group_size: int = 8  # GroupNorm(mid // gn_group_size, mid); CAT-Seg: 16
    mlp_ratio: int = 4


VITB16 = HeadConfig(batch=1, grid=24, patch=16, d_img=512, d_vis=768, n_classes=171,
                    n_prompts=1, hidden=128, heads=4, n_layers=2, window=12, pad_len=256,
                    pool=2, appearance_proj=128, text_proj=128, guidance_up=(256, 128),
                    decoder_guidance_proj=(32, 16), decoder=(64, 32), gn_group_size=16)

CONFIGS = {
    # training path: T < pad_len (pad tokens), pooling 2x2, logits 24 -> labels 48
    "tiny": HeadConfig(pool=2),
    # large-vocabulary test path: T > pad_len (top-k, -100 fill), pooling 1x1, 24 -> 96
    "tiny_topk": HeadConfig(n_classes=11, patch=16, pool=1),
    # small-vocabulary test path: T < pad_len, pooling 1x1
    "tiny_pool1": HeadConfig(pool=1, batch=1),
}


# ----------------------------------------------------------------------------- parameters


def param_shapes(c):
    """Ordered {name: (shape, kind)}; kind picks the random init."""
    h, a, tp = c.hidden, c.appearance_proj, c.text_proj
    s = {}

    def lin(name, out, inp):
        s[name + ".weight"] = ((out, inp), "matrix")
        s[name + ".bias"] = ((out,), "bias")

    def norm(name, width):
        s[name + ".weight"] = ((width,), "norm_weight")
        s[name + ".bias"] = ((width,), "bias")

    def conv(name, out, inp, k, bias=True):
        s[name + ".weight"] = ((out, inp, k, k), "matrix")
        if bias:
            s[name + ".bias"] = ((out,), "bias")

    for i, k in enumerate((2, 4)):
        s[f"head.guidance_up.{i}.weight"] = ((c.d_vis, c.guidance_up[i], k, k), "convt")
        s[f"head.guidance_up.{i}.bias"] = ((c.guidance_up[i],), "bias")
    conv("head.cost_embed", h, c.n_prompts, 7)
    conv("head.appearance_proj", a, c.d_img, 3)
    lin("head.text_proj", tp, c.d_img)
    for i in range(2):
        conv(f"head.decoder_guidance_proj.{i}", c.decoder_guidance_proj[i], c.guidance_up[i], 3)
    for li in range(c.n_layers):
        p = f"head.layers.{li}"
        norm(p + ".guidance_norm", a)
        for j in range(2):
            q = f"{p}.spatial.{j}"
            norm(q + ".norm1", h)
            lin(q + ".attn.q", h, h + a)
            lin(q + ".attn.k", h, h + a)
            lin(q + ".attn.v", h, h)
            lin(q + ".attn.proj", h, h)
            norm(q + ".norm2", h)
            lin(q + ".mlp.fc1", c.mlp_ratio * h, h)
            lin(q + ".mlp.fc2", h, c.mlp_ratio * h)
        q = p + ".cls"
        norm(q + ".norm1", h)
        lin(q + ".attn.q", h, h + tp)
        lin(q + ".attn.k", h, h + tp)
        lin(q + ".attn.v", h, h)
        norm(q + ".norm2", h)
        lin(q + ".mlp.fc1", c.mlp_ratio * h, h)
        lin(q + ".mlp.fc2", h, c.mlp_ratio * h)
        s[q + ".pad_token"] = ((h,), "token")
        s[q + ".pad_guidance"] = ((tp,), "token")
    width_in = h
    for i in range(2):
        q = f"head.decoder.{i}"
        up_out = width_in - c.decoder_guidance_proj[i]
        s[q + ".up.weight"] = ((width_in, up_out, 2, 2), "convt")
        s[q + ".up.bias"] = ((up_out,), "bias")
        conv(q + ".conv1", c.decoder[i], width_in, 3, bias=False)
        norm(q + ".gn1", c.decoder[i])
        conv(q + ".conv2", c.decoder[i], c.decoder[i], 3, bias=False)
        norm(q + ".gn2", c.decoder[i])
        width_in = c.decoder[i]
    conv("head.out_conv", 1, c.decoder[1], 3)
    return s


def random_params(c, gen):
    out = {}
    for name, (shape, kind) in param_shapes(c).items():
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        if kind == "matrix":  # fan_in = all dims but the first
            out[name] = z / math.sqrt(max(1, math.prod(shape[1:])))
        elif kind == "convt":  # [in, out, k, k], stride = k: each output sums over `in` terms
            out[name] = z / math.sqrt(shape[0])
        elif kind == "norm_weight":
            out[name] = 1 + 0.3 * z
        elif kind == "bias":
            out[name] = 0.2 * z
        elif kind == "token":  # zero-init in CAT-Seg; random here so that it matters
            out[name] = 0.5 * z
        else:
            raise ValueError(kind)
    return {k: v.float() for k, v in out.items()}


# ----------------------------------------------------------------------------- inputs


def random_inputs(c, gen):
    g, n_tok = c.grid, 1 + c.grid * c.grid
    crop = g * c.patch
    inputs = {
        "image_dense": torch.randn(c.batch, n_tok, c.d_img, generator=gen),
        "hook_0": torch.randn(c.batch, n_tok, c.d_vis, generator=gen),
        "hook_1": torch.randn(c.batch, n_tok, c.d_vis, generator=gen),
        # deliberately not unit length: the head normalises
        "text": torch.randn(c.n_classes, c.n_prompts, c.d_img, generator=gen)
        * (0.5 + torch.rand(c.n_classes, c.n_prompts, 1, generator=gen)),
    }
    # labels: blocky random classes (8x8 blocks, upsampled by nearest) plus ~10% ignore pixels
    blocks = torch.randint(0, c.n_classes, (c.batch, crop // 8 + 1, crop // 8 + 1),
                           generator=gen)
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :crop, :crop].clone()
    ignore = torch.rand(c.batch, crop, crop, generator=gen) < 0.1
    labels[ignore] = 255
    inputs["labels"] = labels.to(torch.uint8)
    return inputs


# ----------------------------------------------------------------------------- the head


def layer_norm(x, p, name):
    return F.layer_norm(x, (x.shape[-1],), p[name + ".weight"], p[name + ".bias"], LN_EPS)


def linear(x, p, name):
    return F.linear(x, p[name + ".weight"], p[name + ".bias"])


def tokens_to_map(tokens, g):
    """[B, 1+g*g, C] -> [B, C, g, g]: drop CLS, tokens are row-major (h, w)."""
    b, _, ch = tokens.shape
    return tokens[:, 1:, :].transpose(1, 2).reshape(b, ch, g, g)


def region_ids(size, window, shift):
    """Region index (0, 1, 2) of each coordinate of the rolled grid, for the shift mask."""
    r = torch.arange(size)
    return (r >= size - window).long() + (r >= size - shift).long()


def shift_mask(size, window, shift, dtype):
    """[n_windows, window^2, window^2]: 0 inside a region, -100 across regions."""
    rid = region_ids(size, window, shift)
    ids = rid[:, None] * 3 + rid[None, :]  # [H, W]
    nw = size // window
    ids = ids.reshape(nw, window, nw, window).permute(0, 2, 1, 3).reshape(nw * nw, -1)
    diff = ids[:, :, None] != ids[:, None, :]
    return torch.where(diff, MASK_VALUE, 0.0).to(dtype)


def to_windows(x, window):
    """[N, H, W, C] -> [N * nwh * nww, window^2, C], windows row-major."""
    n, hh, ww, ch = x.shape
    x = x.reshape(n, hh // window, window, ww // window, window, ch)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, ch)


def from_windows(xw, n, hh, ww, window):
    ch = xw.shape[-1]
    x = xw.reshape(n, hh // window, ww // window, window, window, ch)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, hh, ww, ch)


def swin_block(x, guid, p, name, c, shifted):
    """x [N, g, g, hidden], guid [N, g, g, A] (already guidance_norm'ed)."""
    n, g, _, h = x.shape
    window = min(c.window, g)
    shift = c.window // 2 if shifted and g > c.window else 0
    y = torch.cat([layer_norm(x, p, name + ".norm1"), guid], dim=-1)
    if shift:
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
    yw = to_windows(y, window)  # [N*nw, L, h+A]
    heads, hd = c.heads, h // c.heads
    nwl = yw.shape[0]
    q = linear(yw, p, name + ".attn.q").reshape(nwl, -1, heads, hd).transpose(1, 2)
    k = linear(yw, p, name + ".attn.k").reshape(nwl, -1, heads, hd).transpose(1, 2)
    v = linear(yw[..., :h], p, name + ".attn.v").reshape(nwl, -1, heads, hd).transpose(1, 2)
    scores = (q * hd ** -0.5) @ k.transpose(-1, -2)  # [N*nw, heads, L, L]
    if shift:
        mask = shift_mask(g, window, shift, scores.dtype)  # [nw, L, L]
        scores = (scores.reshape(n, mask.shape[0], heads, *scores.shape[-2:])
                  + mask[None, :, None]).reshape(scores.shape)
    att = torch.softmax(scores, dim=-1) @ v  # [N*nw, heads, L, hd]
    att = linear(att.transpose(1, 2).reshape(nwl, -1, h), p, name + ".attn.proj")
    att = from_windows(att, n, g, g, window)
    if shift:
        att = torch.roll(att, shifts=(shift, shift), dims=(1, 2))
    x = x + att
    m = F.gelu(linear(layer_norm(x, p, name + ".norm2"), p, name + ".mlp.fc1"))
    return x + linear(m, p, name + ".mlp.fc2")


def spatial_aggregation(x, app, p, name, c):
    """x [B, hidden, T, g, g]; app [B, A, g, g] (projected appearance guidance)."""
    b, h, t, g, _ = x.shape
    xs = x.permute(0, 2, 3, 4, 1).reshape(b * t, g, g, h)
    guid = layer_norm(app.permute(0, 2, 3, 1), p, name + ".guidance_norm")  # [B, g, g, A]
    guid = guid[:, None].expand(b, t, g, g, -1).reshape(b * t, g, g, -1)
    xs = swin_block(xs, guid, p, name + ".spatial.0", c, shifted=False)
    xs = swin_block(xs, guid, p, name + ".spatial.1", c, shifted=True)
    return xs.reshape(b, t, g, g, h).permute(0, 4, 1, 2, 3)


def elu1(x):
    return F.elu(x) + 1


def linear_attention(q, k, v):
    """q, k, v [N, S, heads, d]. out = phi(Q)(phi(K)^T V) / (phi(Q).sum_s phi(K) + eps).
    (CAT-Seg divides V by S and multiplies the result by S; in exact arithmetic that cancels.)"""
    qf, kf = elu1(q), elu1(k)
    s = v.shape[1]
    kv = torch.einsum("nshd,nshe->nhde", kf, v / s)
    z = 1.0 / (torch.einsum("nlhd,nhd->nlh", qf, kf.sum(dim=1)) + LIN_ATTN_EPS)
    return torch.einsum("nlhd,nhde,nlh->nlhe", qf, kv, z) * s


def class_aggregation(x, text_guid, p, name, c):
    """x [B, hidden, T, g, g]; text_guid [B, T, Tp]. Returns x + up(xp) (double residual)."""
    b, h, t, g, _ = x.shape
    xp = F.avg_pool2d(x.reshape(b, h * t, g, g), c.pool) if c.pool > 1 else x.reshape(
        b, h * t, g, g)
    gp = xp.shape[-1]
    xp = xp.reshape(b, h, t, gp, gp)
    n_pad = max(0, c.pad_len - t)
    guid = text_guid
    if n_pad:
        tok = p[name + ".pad_token"].reshape(1, h, 1, 1, 1).expand(b, h, n_pad, gp, gp)
        xp = torch.cat([xp, tok], dim=2)
        pg = p[name + ".pad_guidance"].reshape(1, 1, -1).expand(b, n_pad, -1)
        guid = torch.cat([guid, pg], dim=1)
    s = t + n_pad
    seq = xp.permute(0, 3, 4, 2, 1).reshape(b * gp * gp, s, h)  # one sequence per location
    gseq = guid[:, None].expand(b, gp * gp, s, -1).reshape(b * gp * gp, s, -1)
    y = layer_norm(seq, p, name + ".norm1")
    yg = torch.cat([y, gseq], dim=-1)
    heads, hd = c.heads, h // c.heads
    q = linear(yg, p, name + ".attn.q").reshape(b * gp * gp, s, heads, hd)
    k = linear(yg, p, name + ".attn.k").reshape(b * gp * gp, s, heads, hd)
    v = linear(y, p, name + ".attn.v").reshape(b * gp * gp, s, heads, hd)
    seq = seq + linear_attention(q, k, v).reshape(b * gp * gp, s, h)
    m = F.relu(linear(layer_norm(seq, p, name + ".norm2"), p, name + ".mlp.fc1"))
    seq = seq + linear(m, p, name + ".mlp.fc2")
    xp = seq.reshape(b, gp, gp, s, h).permute(0, 3, 4, 1, 2).reshape(b * s, h, gp, gp)
    xp = F.interpolate(xp, size=(g, g), mode="bilinear", align_corners=True)
    xp = xp.reshape(b, s, h, g, g)[:, :t].permute(0, 2, 1, 3, 4)
    return x + xp


def group_norm(x, p, name, c):
    return F.group_norm(x, x.shape[1] // c.gn_group_size, p[name + ".weight"],
                        p[name + ".bias"], GN_EPS)


def decoder_stage(x, guid, p, name, t, c):
    """x [B*T, Cin, s, s] -> ConvT k2 s2 -> concat guidance (repeated per class) -> DoubleConv."""
    x = F.conv_transpose2d(x, p[name + ".up.weight"], p[name + ".up.bias"], stride=2)
    x = torch.cat([x, guid.repeat_interleave(t, dim=0)], dim=1)
    x = F.relu(group_norm(F.conv2d(x, p[name + ".conv1.weight"], padding=1), p, name + ".gn1", c))
    return F.relu(group_norm(F.conv2d(x, p[name + ".conv2.weight"], padding=1), p, name + ".gn2",
                             c))


def head_forward(p, inp, c, trace=None):
    """Returns logits [B, T, 4g, 4g]; trace (a dict) receives intermediates."""
    trace = {} if trace is None else trace
    g, b = c.grid, inp["image_dense"].shape[0]
    img = tokens_to_map(inp["image_dense"], g)  # [B, Dimg, g, g] = res3
    text = inp["text"]
    text = text[None].expand(b, *text.shape) if text.dim() == 3 else text  # [B, T, P, D]
    t_all = text.shape[1]
    img_n = F.normalize(img, dim=1)
    text_n = F.normalize(text, dim=-1)
    corr = torch.einsum("bchw,btpc->bpthw", img_n, text_n)  # [B, P, T, g, g]
    trace["corr"] = corr
    classes = None
    if t_all > c.pad_len:
        score = corr.permute(0, 2, 1, 3, 4).flatten(2).max(dim=-1).values  # [B, T]
        classes = score.topk(c.pad_len, dim=-1).indices.sort(dim=-1).values  # [B, pad_len]
        text_n = torch.gather(text_n, 1, classes[:, :, None, None].expand(
            -1, -1, *text_n.shape[2:]))
        corr = torch.einsum("bchw,btpc->bpthw", img_n, text_n)
        # the released code takes the text guidance from the normalised, selected prompts
        text_for_guidance = text_n
        trace["classes"] = classes
    else:
        text_for_guidance = text  # ... and here from the raw prompts
    t = corr.shape[2]
    pp = c.n_prompts
    emb = F.conv2d(corr.permute(0, 2, 1, 3, 4).reshape(b * t, pp, g, g),
                   p["head.cost_embed.weight"], p["head.cost_embed.bias"], padding=3)
    x = emb.reshape(b, t, c.hidden, g, g).permute(0, 2, 1, 3, 4)  # [B, hidden, T, g, g]

    app = F.relu(F.conv2d(img, p["head.appearance_proj.weight"], p["head.appearance_proj.bias"],
                          padding=1))
    tg = text_for_guidance.mean(dim=2)
    tg = tg / tg.norm(dim=-1, keepdim=True)
    tg = F.relu(linear(tg, p, "head.text_proj"))  # [B, T, Tp]
    dec_guid = []
    for i, stride in enumerate((2, 4)):
        hook = tokens_to_map(inp[f"hook_{i}"], g)
        up = F.conv_transpose2d(hook, p[f"head.guidance_up.{i}.weight"],
                                p[f"head.guidance_up.{i}.bias"], stride=stride)
        dec_guid.append(F.relu(F.conv2d(up, p[f"head.decoder_guidance_proj.{i}.weight"],
                                        p[f"head.decoder_guidance_proj.{i}.bias"], padding=1)))
    for li in range(c.n_layers):
        name = f"head.layers.{li}"
        x = spatial_aggregation(x, app, p, name, c)
        if li == 0:
            trace["layer0_spatial"] = x
        x = class_aggregation(x, tg, p, name + ".cls", c)
    trace["aggregated"] = x
    y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c.hidden, g, g)
    for i in range(2):
        y = decoder_stage(y, dec_guid[i], p, f"head.decoder.{i}", t, c)
    y = F.conv2d(y, p["head.out_conv.weight"], p["head.out_conv.bias"], padding=1)
    logits = y.reshape(b, t, 4 * g, 4 * g)
    if classes is not None:
        full = torch.full((b, t_all, 4 * g, 4 * g), MASK_VALUE, dtype=logits.dtype)
        logits = full.scatter(1, classes[:, :, None, None].expand(-1, -1, 4 * g, 4 * g), logits)
    return logits


def segmentation_loss(logits, labels):
    """Per-class sigmoid BCE at the label size; ignored pixels (255) get all-zero targets."""
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    lab = labels.long()
    target = torch.zeros_like(up)
    keep = lab != 255
    target.scatter_(1, torch.where(keep, lab, 0)[:, None], keep[:, None].to(up.dtype))
    return F.binary_cross_entropy_with_logits(up, target), up


# ----------------------------------------------------------------------------- checks


def run(params, inputs, c, dtype):
    p = {k: v.to(dtype).detach().requires_grad_(True) for k, v in params.items()}
    inp = {k: (v.to(dtype).detach().requires_grad_(True) if v.is_floating_point() else v)
           for k, v in inputs.items()}
    trace = {}
    logits = head_forward(p, inp, c, trace)
    loss, up = segmentation_loss(logits, inp["labels"])
    names = list(p) + [k for k in inp if inp[k].is_floating_point()]
    leaves = [p[k] if k in p else inp[k] for k in names]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    out = {"logits": logits.detach(), "loss": loss.detach().reshape(1)}
    for k, gr in zip(names, grads):
        out["grad." + k] = gr
    for k, v in trace.items():
        out["trace." + k] = v.detach()
    return out


def softmax_key_bias(name):
    """The Swin key bias adds q.b_k to a whole row of scores; softmax ignores that, so its
    gradient is exactly zero (float64 gives ~1e-17, float32 ~1e-9: stored as exact 0)."""
    return ".spatial." in name and name.endswith(".attn.k.bias")


def rel_err(a, b):
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check_float64(out32, out64):
    ok = True
    for kind, limit in (("forward", F64_AGREEMENT), ("gradient", F64_GRAD_AGREEMENT)):
        errs = sorted((rel_err(out32[k], out64[k]), k) for k in out64
                      if k.startswith("grad.") == (kind == "gradient") and not softmax_key_bias(k))
        worst, name = errs[-1]
        median = errs[len(errs) // 2][0]
        print(f"float32 vs float64 {kind}s: worst max|d|/max|f64| {worst:.2e} ({name}), "
              f"median {median:.1e}, limit {limit:g}")
        ok = ok and worst <= limit
    print(f"  loss f32 {out32['loss'].item():.9f} f64 {out64['loss'].item():.12f}")
    return ok


def check_finite_difference(params, inputs, c, out64, gen):
    """Central difference of the loss along one random direction over all parameters and all
    float inputs, in float64, against <autograd gradient, direction>."""
    p64 = {k: v.double() for k, v in params.items()}
    i64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    dirs = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64)
            for k, v in list(p64.items()) + [(k, v) for k, v in i64.items()
                                             if v.is_floating_point()]}
    predicted = sum((out64["grad." + k] * d).sum() for k, d in dirs.items()).item()

    def loss_at(sign):
        pp = {k: v + sign * FD_EPS * dirs[k] for k, v in p64.items()}
        ii = {k: (v + sign * FD_EPS * dirs[k] if k in dirs else v) for k, v in i64.items()}
        tr = {}
        with torch.no_grad():
            loss, _ = segmentation_loss(head_forward(pp, ii, c, tr), ii["labels"])
        return loss.item(), tr.get("classes")

    lp, cls_p = loss_at(+1)
    lm, cls_m = loss_at(-1)
    fd = (lp - lm) / (2 * FD_EPS)
    err = abs(fd - predicted) / max(abs(predicted), 1e-30)
    print(f"finite difference (float64, eps {FD_EPS:g}, all params + inputs): fd {fd:.10e} "
          f"autograd {predicted:.10e} rel err {err:.2e}")
    ok = err <= FD_AGREEMENT
    if "trace.classes" in out64:
        same = torch.equal(cls_p, out64["trace.classes"]) and torch.equal(
            cls_m, out64["trace.classes"])
        print(f"top-k selection unchanged at +-eps: {same}")
        ok = ok and same
    # per-group directional checks, so that one group's error is not hidden by the others;
    # the absolute floor covers the roundoff of small directional derivatives
    groups = {}
    for k in dirs:
        groups.setdefault(k if not k.startswith("head.") else k.split(".")[1], []).append(k)
    for gname, keys in sorted(groups.items()):
        pred = sum((out64["grad." + k] * dirs[k]).sum() for k in keys).item()

        def lg(sign, keys=keys):
            pp = {k: v + (sign * FD_EPS * dirs[k] if k in keys else 0) for k, v in p64.items()}
            ii = {k: (v + sign * FD_EPS * dirs[k] if k in keys else v) for k, v in i64.items()}
            with torch.no_grad():
                return segmentation_loss(head_forward(pp, ii, c), ii["labels"])[0].item()

        fdg = (lg(1) - lg(-1)) / (2 * FD_EPS)
        e = abs(fdg - pred) / max(abs(pred), 1e-12)
        bad = abs(fdg - pred) > 1e-5 * abs(pred) + FD_ABS_FLOOR
        print(f"  {gname:24s} fd {fdg: .8e} autograd {pred: .8e} rel {e:.1e}"
              f"{'  FAIL' if bad else ''}")
        ok = ok and not bad
    return ok


def check_nontrivial(out, params, c):
    ok = True
    zero = [k for k in params if out["grad." + k].abs().max().item() <= 1e-12]
    expected_zero = {k for k in params if softmax_key_bias(k)}
    if c.n_classes >= c.pad_len:  # no padding: the pad parameters are unused
        expected_zero |= {k for k in params if k.endswith(".pad_token") or
                          k.endswith(".pad_guidance")}
    if set(zero) != expected_zero:
        print(f"FAIL: zero gradients {sorted(zero)}, expected {sorted(expected_zero)}")
        ok = False
    else:
        print(f"every parameter gradient is nonzero except {len(expected_zero)} expected zeros "
              f"(Swin key biases; pad tokens when T >= pad_len)")
    return ok


def naive_window_attention(y, x_dim, p, name, c, shifted):
    """Independent form of the (shifted) window attention on the original grid, one query at a
    time. y [N, g, g, hidden + A] is the concatenated q/k input. Query (r, s) sees key (r2, s2)
    iff both lie in the same window of the grid rolled by -shift, and in each axis both or
    neither wrapped around (coordinate < shift): that is what the -100 mask encodes (up to
    exp(-100))."""
    n, g, _, _ = y.shape
    window = min(c.window, g)
    shift = c.window // 2 if shifted and g > c.window else 0
    heads, hd = c.heads, x_dim // c.heads
    yf = y.reshape(n, g * g, -1)
    q = linear(yf, p, name + ".attn.q").reshape(n, g * g, heads, hd)
    k = linear(yf, p, name + ".attn.k").reshape(n, g * g, heads, hd)
    v = linear(yf[..., :x_dim], p, name + ".attn.v").reshape(n, g * g, heads, hd)
    rr, ss = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    rr, ss = rr.flatten(), ss.flatten()
    win = ((rr - shift) % g // window) * g + (ss - shift) % g // window
    wrap = (rr < shift).long() * 2 + (ss < shift).long()
    out = torch.zeros(n, g * g, heads, hd, dtype=y.dtype)
    for i in range(g * g):
        allowed = (win == win[i]) & (wrap == wrap[i])
        sc = torch.einsum("nhd,nshd->nhs", q[:, i], k[:, allowed]) * hd ** -0.5
        out[:, i] = torch.einsum("nhs,nshd->nhd", torch.softmax(sc, dim=-1), v[:, allowed])
    out = linear(out.reshape(n, g * g, x_dim), p, name + ".attn.proj")
    return out.reshape(n, g, g, x_dim)


def naive_linear_attention(q, k, v):
    """Quadratic form of the same linear attention: weights phi(q_l).phi(k_s)."""
    w = torch.einsum("nlhd,nshd->nlsh", elu1(q), elu1(k))
    return torch.einsum("nlsh,nshe->nlhe", w, v) / (w.sum(dim=2)[..., None] + LIN_ATTN_EPS)


def naive_loss(logits, labels):
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    t = (labels.long()[:, None] == torch.arange(logits.shape[1])[None, :, None, None]).to(up)
    return (up.clamp_min(0) - up * t + torch.log1p(torch.exp(-up.abs()))).mean()


def check_independent_forms(params, inputs, c, gen):
    """Compare the vectorised pieces against slow, separately written forms (float64)."""
    p = {k: v.double() for k, v in params.items()}
    n, g, h, a = 3, c.grid, c.hidden, c.appearance_proj
    worst = 0.0
    for j, shifted in ((0, False), (1, True)):
        name = f"head.layers.0.spatial.{j}"
        x = torch.randn(n, g, g, h, generator=gen, dtype=torch.float64)
        guid = torch.randn(n, g, g, a, generator=gen, dtype=torch.float64)
        fast = swin_block(x, guid, p, name, c, shifted)
        y = torch.cat([layer_norm(x, p, name + ".norm1"), guid], dim=-1)
        slow = x + naive_window_attention(y, h, p, name, c, shifted)
        slow = slow + linear(F.gelu(linear(layer_norm(slow, p, name + ".norm2"), p,
                                           name + ".mlp.fc1")), p, name + ".mlp.fc2")
        worst = max(worst, rel_err(fast, slow))
    q, k, v = (torch.randn(4, 9, c.heads, 5, generator=gen, dtype=torch.float64)
               for _ in range(3))
    worst = max(worst, rel_err(linear_attention(q, k, v), naive_linear_attention(q, k, v)))
    labels = inputs["labels"]
    logits = 3 * torch.randn(labels.shape[0], c.n_classes, 4 * g, 4 * g, generator=gen,
                             dtype=torch.float64)
    worst = max(worst, rel_err(segmentation_loss(logits, labels)[0], naive_loss(logits, labels)))
    print(f"vectorised vs naive forms (shifted/unshifted window attention, linear attention, "
          f"loss): max rel diff {worst:.1e}")
    return worst <= 1e-12


# ----------------------------------------------------------------------------- writing


def save_sorted(tensors, path, metadata):
    """save_file, then rewrite the JSON header with the metadata keys sorted (safetensors writes
    them in hash order); the header keeps its length, so the data offsets stay valid."""
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= n
        f.seek(8)
        f.write(text + b" " * (n - len(text)))
    os.chmod(path, 0o644)  # save_file creates 0600 files


def metadata_for(c, name):
    d = asdict(c)
    meta = {k: (",".join(map(str, v)) if isinstance(v, tuple) else str(v)) for k, v in d.items()}
    meta.update({"config": name, "generator": GENERATOR, "torch": torch.__version__,
                 "shift": str(c.window // 2 if c.grid > c.window else 0),
                 "crop": str(c.grid * c.patch)})
    return meta


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, help="override the class-attention pooling (1 or 2)")
    args = ap.parse_args()
    c = CONFIGS[args.config]
    if args.pool:
        c = replace(c, pool=args.pool)
    assert c.grid % min(c.window, c.grid) == 0 and c.grid % c.pool == 0
    assert c.hidden % c.heads == 0
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    params = random_params(c, gen)
    inputs = random_inputs(c, gen)

    out32 = run(params, inputs, c, torch.float32)
    out64 = run(params, inputs, c, torch.float64)
    ok = check_float64(out32, out64)
    ok = check_independent_forms(params, inputs, c, torch.Generator().manual_seed(1)) and ok
    ok = check_finite_difference(params, inputs, c, out64, gen) and ok
    ok = check_nontrivial(out64, params, c) and ok
    if "trace.classes" in out64:
        cls = out64["trace.classes"]
        print(f"top-k classes per image: {cls.tolist()}")
        if torch.equal(cls[0], cls[-1]) and c.batch > 1:
            print("FAIL: every image selected the same classes")
            ok = False
    for k in ("logits", "loss", "trace.corr", "trace.layer0_spatial", "trace.aggregated"):
        v = out64[k]
        print(f"  {k:18s} {tuple(v.shape)} max|v| {v.abs().max().item():.4g}")
    n_par = sum(v.numel() for v in params.values())
    print(f"{len(params)} parameter tensors, {n_par} values")

    # the reference values are the float64 run, stored as F32
    expected = {k: (torch.zeros_like(v) if softmax_key_bias(k) else v).float()
                for k, v in out64.items() if k != "trace.classes"}
    if "trace.classes" in out64:
        expected["trace.classes"] = out64["trace.classes"].long()
    meta = metadata_for(c, args.config)
    os.makedirs(args.out, exist_ok=True)
    files = {"params.safetensors": params, "inputs.safetensors": inputs,
             "expected.safetensors": expected}
    total = 0
    for fname, tensors in files.items():
        path = os.path.join(args.out, fname)
        save_sorted(tensors, path, meta)
        with safe_open(path, "pt") as f:
            assert f.metadata() == meta
            for k in tensors:
                assert torch.equal(f.get_tensor(k), tensors[k].contiguous()), k
        total += os.path.getsize(path)
    print(f"wrote {args.out}: {total / 1e6:.3f} MB")
    if not ok:
        print("CHECKS FAILED")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Reference fixtures for clhclip's H-CLIP adapted CLIP forward and the adapter gradients.

Offline tool: CI never runs it (CI has no torch). It builds a random-weight HF CLIPModel with
make_clip_fixtures.py, adds H-CLIP adapters (spec 3.2 as the released code behaves, with the
layout of clhclip/hclip.h "adapter math"), perturbs them, and writes config.json,
model.safetensors, inputs.safetensors, adapters.safetensors and expected.safetensors into
--out. See tests/reference/README.md for what each file holds.

    python3 tests/reference/make_hclip_fixtures.py --config tiny_text_ortho \
        --out tests/fixtures/hclip_tiny_text_ortho

The adapter math here is written from the spec only (it is an independent reference for the C
code). Every attention weight of both encoders is replaced by its folded form
(W'_q = W_q BD_q, W'_k = W_k BD_k, W'_v = W_v BD_v, W'_o = BD_o W_o, biases unchanged) and HF's
own forward runs with those weights (torch.func.functional_call), so autograd gives the
gradients of P, A and B.
"""

import argparse
import copy
import json
import os
import struct
import sys
import time
from dataclasses import dataclass

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_clip_fixtures as mcf  # noqa: E402  (model building, inputs, CAT-Seg dense path)

# (text orthogonal, vision orthogonal) for each orthogonality placement
ORTHOGONAL = {"text": (True, False), "both": (True, True), "none": (False, False),
              "vision": (False, True)}
MATRICES = ("q", "k", "v", "out")  # slot 4l + t, t = index in this tuple
TOWERS = {"text": "text_model", "vision": "vision_model"}

# Size of the random perturbation added to the init adapters (std of N(0, 1) noise).
NOISE_P, NOISE_A, NOISE_B = 0.15, 0.1, 0.05
# float32 and float64 runs must agree to this (max abs diff / max abs), outputs and gradients.
F64_AGREEMENT = 1e-5


@dataclass
class HclipSpec:
    clip: mcf.FixtureSpec  # model, inputs, vision hooks (text_hooks unused)
    q: int
    orthogonal: str
    use_a: bool
    use_b: bool
    n_texts: int = 3


def tiny_clip(vision_layers, text_layers, n_images, image_hw, vision_hooks, vision_width=24,
              text_width=16):
    """2 heads per tower, MLP 2x width, native image 16, patch 8, vocab 100, context 8."""
    return mcf.FixtureSpec(
        config={
            "projection_dim": 12,
            "text_config": {
                "vocab_size": 100,
                "hidden_size": text_width,
                "intermediate_size": 2 * text_width,
                "num_hidden_layers": text_layers,
                "num_attention_heads": 2,
                "max_position_embeddings": 8,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "bos_token_id": 98,
                "eos_token_id": 99,
                "pad_token_id": 1,
                "projection_dim": 12,
            },
            "vision_config": {
                "hidden_size": vision_width,
                "intermediate_size": 2 * vision_width,
                "num_hidden_layers": vision_layers,
                "num_attention_heads": 2,
                "image_size": 16,
                "patch_size": 8,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "projection_dim": 12,
            },
        },
        sparse_config=False,
        n_images=n_images,
        image_hw=image_hw,
        text_rows="sot_eot",  # SOT 98, ids, EOT 99 (eos_token_id, non-legacy), zeros
        vision_hooks=vision_hooks,
        text_hooks=[],
    )


SPECS = {
    # The released code's setting: text blocks orthogonal (Cayley), vision free, A and B on.
    # Vision 24 wide (bv = 3 blocks of 8), text 16 wide (bt = 2).
    "tiny_text_ortho": HclipSpec(clip=tiny_clip(2, 2, 1, 16, [0]), q=8, orthogonal="text",
                                 use_a=True, use_b=True),
    # Different depths: L = 3 layer slots; text uses A_0, A_1 and slots 0..7, vision all 12.
    # Both encoders orthogonal; 24x24 inputs on a 16x16 model (position-embedding resize).
    "tiny_both_depths": HclipSpec(clip=tiny_clip(3, 2, 2, 24, [0, 1]), q=8, orthogonal="both",
                                  use_a=True, use_b=True),
    # Relation maps switched off: A and B are identity and not parameters. Text wider than
    # vision here (bt = 3, bv = 2), so the vision blocks start at m = 3.
    "tiny_no_maps": HclipSpec(clip=tiny_clip(2, 2, 1, 16, [0], vision_width=16, text_width=24),
                              q=8, orthogonal="text", use_a=False, use_b=False),
}


# ----------------------------------------------------------------------------- adapter layout


@dataclass
class Layout:
    q: int
    text_layers: int
    vision_layers: int
    bt: int  # text blocks = text width / q
    bv: int  # vision blocks = vision width / q

    @property
    def M(self):
        return self.bt + self.bv

    @property
    def L(self):
        return max(self.text_layers, self.vision_layers)

    @property
    def S(self):
        return 4 * self.L

    def layers(self, enc):
        return self.text_layers if enc == "text" else self.vision_layers

    def blocks(self, enc):
        """Indices m_e(j) on the block axis M of this encoder's blocks j = 0..b_e-1."""
        return list(range(self.bt)) if enc == "text" else list(range(self.bt, self.M))


def layout_for(model, q):
    tc, vc = model.config.text_config, model.config.vision_config
    for name, width in (("text", tc.hidden_size), ("vision", vc.hidden_size)):
        if width % q:
            raise RuntimeError(f"{name} width {width} is not a multiple of q = {q}")
    return Layout(q=q, text_layers=tc.num_hidden_layers, vision_layers=vc.num_hidden_layers,
                  bt=tc.hidden_size // q, bv=vc.hidden_size // q)


def init_adapters(lay, orthogonal, use_a, use_b, dtype=torch.float32):
    """Init so that every BD is the identity: blocks of orthogonal encoders are 0 (Cayley(0) =
    I), blocks of unconstrained encoders are I, for every slot; A_l = I, B = I. With text-only
    orthogonality this is the released code's P[:, :, :, :bt] = 0, P[:, :, :, bt:] = I."""
    ortho = dict(zip(("text", "vision"), ORTHOGONAL[orthogonal]))
    P = torch.zeros(lay.q, lay.q, lay.S, lay.M, dtype=dtype)
    eye = torch.eye(lay.q, dtype=dtype)
    for enc in ("text", "vision"):
        if not ortho[enc]:
            for m in lay.blocks(enc):
                P[:, :, :, m] = eye[:, :, None]
    adapters = {"P": P}
    if use_a:
        adapters["A"] = torch.eye(lay.M, dtype=dtype).repeat(lay.L, 1, 1)
    if use_b:
        adapters["B"] = torch.eye(lay.S, dtype=dtype)
    return adapters


def perturb_adapters(adapters):
    noise = {"P": NOISE_P, "A": NOISE_A, "B": NOISE_B}
    return {k: v + noise[k] * torch.randn_like(v) for k, v in adapters.items()}


# ----------------------------------------------------------------------------- adapter math


def dcrc_raw(adapters, lay, enc, l):
    """Spec 3.2 steps 1-4 for layer l of encoder enc: Rraw [4 (q,k,v,o), b_e, q, q].

    1) U = nn.Linear(M, M, bias=False) with weight A_l on the last axis of P: U = P A_l^T;
    2) keep this encoder's blocks m_e(j);
    3) V = nn.Linear(S, S, bias=False) with weight B on the slot axis:
       V[.., s, .] = sum_s' B[s, s'] U[.., s', .];
    4) Rraw_{t, j} = V[:, :, 4l + t, m_e(j)].
    A switched-off map is the identity (the product is skipped)."""
    P, A, B = adapters["P"], adapters.get("A"), adapters.get("B")
    U = P if A is None else torch.matmul(P, A[l].transpose(0, 1))  # [q, q, S, M]
    Ue = U[:, :, :, lay.blocks(enc)]  # [q, q, S, b]
    Ue = Ue.permute(0, 1, 3, 2)  # [q, q, b, S]: slot axis last for the linear map
    V = Ue if B is None else torch.matmul(Ue, B.transpose(0, 1))
    slots = V[:, :, :, 4 * l : 4 * l + 4]  # [q(a), q(b), b, 4]
    return slots.permute(3, 2, 0, 1)  # [4, b, q, q]: Rraw[t, j][a, b] = V[a, b, j, 4l + t]


def cayley(raw):
    """S = (raw - raw^T) / 2, R = (I - S)(I + S)^-1 (released code's sign convention)."""
    S = 0.5 * (raw - raw.transpose(-1, -2))
    eye = torch.eye(raw.shape[-1], dtype=raw.dtype).expand_as(raw)
    return torch.matmul(eye - S, torch.linalg.inv(eye + S))


def block_transforms(adapters, lay, orthogonal):
    """({(enc, l, t): R [b_e, q, q]}, the same for Rraw) for every attention matrix of both
    encoders. The keys run text first, then l, then t: clhclip/hclip.h's raw block order."""
    ortho = dict(zip(("text", "vision"), ORTHOGONAL[orthogonal]))
    rs, raws = {}, {}
    for enc in ("text", "vision"):
        for l in range(lay.layers(enc)):
            raw = dcrc_raw(adapters, lay, enc, l)
            R = cayley(raw) if ortho[enc] else raw
            for t, name in enumerate(MATRICES):
                rs[(enc, l, name)] = R[t]
                raws[(enc, l, name)] = raw[t]
    return rs, raws


def stacked(blocks):
    """[n_blocks, q, q] in the order of hclip.h: all text blocks first, index (4l + t) bt + j,
    then the vision blocks, index (4l + t) bv + j (the key order of block_transforms)."""
    return torch.cat(list(blocks.values())).contiguous()


def adapted_weights(model, blocks):
    """Folded attention weights (nn.Linear layout W[out, in]): input side for q/k/v
    (W' = W BD), output side for out_proj (W' = BD W). Biases are left as they are."""
    params = dict(model.named_parameters())
    out = {}
    for (enc, l, t), R in blocks.items():
        name = f"{TOWERS[enc]}.encoder.layers.{l}.self_attn.{t}_proj.weight"
        W = params[name]
        BD = torch.block_diag(*R.unbind(0))
        out[name] = BD @ W if t == "out" else W @ BD
    return out


# ----------------------------------------------------------------------------- forward


class ClipOutputs(torch.nn.Module):
    """The fixture outputs of a CLIPModel; run through functional_call with folded weights."""

    def __init__(self, clip, vision_hooks, interpolate):
        super().__init__()
        self.clip = clip
        self.vision_hooks = vision_hooks
        self.interpolate = interpolate

    def forward(self, pixels, ids):
        m = self.clip
        vis = m.vision_model(pixel_values=pixels, interpolate_pos_encoding=self.interpolate,
                             output_hidden_states=True)
        out = {}
        # spec 2.3: last block without attention, CLS residual, ln_post + proj on every token
        dense, normal_last = mcf.catseg_dense(m, pixels, self.interpolate)
        out["image_dense_catseg"] = dense
        out["image_pooled"] = m.visual_projection(vis.pooler_output)
        for i in self.vision_hooks:
            out[f"hidden_vision_{i}"] = vis.hidden_states[i + 1]
        out["text_features"] = m.text_projection(m.text_model(input_ids=ids).pooler_output)
        checks = {"catseg loop's normal last block == HF last_hidden_state":
                  (normal_last, vis.last_hidden_state)}
        return out, checks


def interpolate_for(model, pixels):
    size = model.config.vision_config.image_size
    return pixels.shape[-2] != size or pixels.shape[-1] != size


def adapted_forward(model, adapters, lay, spec, pixels, ids):
    blocks, raws = block_transforms(adapters, lay, spec.orthogonal)
    weights = adapted_weights(model, blocks)
    wrapper = ClipOutputs(model, spec.clip.vision_hooks, interpolate_for(model, pixels))
    out, checks = torch.func.functional_call(
        wrapper, {"clip." + k: v for k, v in weights.items()}, (pixels, ids))
    return out, checks, blocks, raws


def loss_of(out, cot, hooks):
    loss = (out["image_dense_catseg"] * cot["grad_out_dense"]).sum()
    for i in hooks:
        loss = loss + (out[f"hidden_vision_{i}"] * cot[f"grad_out_hidden_{i}"]).sum()
    return loss + (out["text_features"] * cot["grad_out_text"]).sum()


def make_cotangents(out, hooks):
    cot = {"grad_out_dense": torch.randn_like(out["image_dense_catseg"])}
    for i in hooks:
        cot[f"grad_out_hidden_{i}"] = torch.randn_like(out[f"hidden_vision_{i}"])
    cot["grad_out_text"] = torch.randn_like(out["text_features"])
    return cot


def forward_and_grads(model, adapters, lay, spec, pixels, ids, cot):
    """Outputs, loss and d loss / d adapters (a fresh leaf per adapter tensor)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in adapters.items()}
    out, checks, blocks, raws = adapted_forward(model, leaves, lay, spec, pixels, ids)
    loss = loss_of(out, cot, spec.clip.vision_hooks)
    names = sorted(leaves)
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    result = {k: v.detach() for k, v in out.items()}
    result["loss"] = loss.detach().reshape(1)
    for k, g in zip(names, grads):
        result[f"grad_{k}"] = g
    result["dcrc_raw"] = stacked(raws).detach()
    result["dcrc_blocks"] = stacked(blocks).detach()
    return result, checks, {k: v.detach() for k, v in blocks.items()}


# ----------------------------------------------------------------------------- checks

FULL_PRECISION = "hclip_reference_full_precision"


def full_precision_attention(module, query, key, value, attention_mask, scaling, dropout=0.0,
                             **_kwargs):
    """HF's eager attention with the softmax in the input dtype: HF always takes it in float32,
    which would cap a float64 run at float32 accuracy (and break finite differences)."""
    w = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.nn.functional.softmax(w, dim=-1)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


AttentionInterface.register(FULL_PRECISION, full_precision_attention)
AttentionMaskInterface.register(FULL_PRECISION, eager_mask)  # the same additive causal mask


def float64_model(model):
    model64 = copy.deepcopy(model).to(torch.float64)
    model64.config._attn_implementation = FULL_PRECISION  # recurses into both sub-configs
    for tower in (model64.text_model, model64.vision_model):
        if tower.config._attn_implementation != FULL_PRECISION:
            raise RuntimeError("float64 model: attention implementation not switched")
    return model64



def max_abs_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_identity_init(model, lay, spec, pixels, ids):
    """With unperturbed init adapters every BD is I and every output equals plain HF CLIP."""
    init = init_adapters(lay, spec.orthogonal, spec.use_a, spec.use_b)
    with torch.no_grad():
        out, _, blocks, _ = adapted_forward(model, init, lay, spec, pixels, ids)
        plain, _ = mcf.run_reference(model, spec.clip, pixels, ids)
    eye = torch.eye(lay.q)
    bd_dev = max(max_abs_diff(R, eye.expand_as(R)) for R in blocks.values())
    print(f"  identity init: max |R - I| over all {len(blocks)} block sets: {bd_dev:.3g}")
    worst = 0.0
    for k, v in out.items():
        d = max_abs_diff(v, plain[k])
        worst = max(worst, d)
        print(f"  identity init: {k:24s} max |adapted - plain HF| = {d:.3g}")
    return bd_dev == 0.0 and worst == 0.0


def orthogonality_report(blocks, spec):
    ortho = dict(zip(("text", "vision"), ORTHOGONAL[spec.orthogonal]))
    ok = True
    for enc in ("text", "vision"):
        dev = 0.0
        for (e, _l, _t), R in blocks.items():
            if e != enc:
                continue
            BD = torch.block_diag(*R.unbind(0)).double()
            dev = max(dev, (BD.T @ BD - torch.eye(BD.shape[0], dtype=BD.dtype)).abs().max().item())
        kind = "orthogonal" if ortho[enc] else "unconstrained"
        print(f"  {enc:6s} BDs ({kind:13s}): max over layers/matrices of max|BD^T BD - I| = "
              f"{dev:.2e}")
        if ortho[enc] and dev > 1e-5:
            ok = False
        if not ortho[enc] and dev < 1e-2:
            ok = False  # the perturbation should make unconstrained blocks non-orthogonal
    return ok


def check_stacked_order(stacked, blocks, lay):
    """dcrc_blocks follows the hclip.h index formula (and equals the blocks used in the fold)."""
    base = {"text": 0, "vision": 4 * lay.text_layers * lay.bt}
    width = {"text": lay.bt, "vision": lay.bv}
    worst = 0.0
    for (enc, l, t), R in blocks.items():
        for j in range(R.shape[0]):
            i = base[enc] + (4 * l + MATRICES.index(t)) * width[enc] + j
            worst = max(worst, max_abs_diff(stacked[i], R[j]))
    n = 4 * (lay.text_layers * lay.bt + lay.vision_layers * lay.bv)
    print(f"  dcrc_blocks: {stacked.shape[0]} blocks (expected {n}), max diff to the folded "
          f"blocks {worst:.2e}")
    return stacked.shape[0] == n and worst == 0.0


def check_dcrc_raw(stacked_raw, adapters, lay):
    """dcrc_raw against hclip.h's closed form, computed independently per block index."""
    eyeM, eyeS = torch.eye(lay.M), torch.eye(lay.S)
    P = adapters["P"]
    B = adapters.get("B", eyeS)
    worst, i = 0.0, 0
    for enc in ("text", "vision"):
        ms = lay.blocks(enc)
        for l in range(lay.layers(enc)):
            A = adapters["A"][l] if "A" in adapters else eyeM
            for t in range(4):
                for j in range(len(ms)):
                    ref = torch.einsum("s,m,absm->ab", B[4 * l + t], A[ms[j]], P)
                    worst = max(worst, max_abs_diff(stacked_raw[i], ref))
                    i += 1
    print(f"  dcrc_raw vs sum_(s,m) B[4l+t,s] A_l[m_e(j),m] P[:,:,s,m] per block: "
          f"max abs diff {worst:.2e}")
    return i == stacked_raw.shape[0] and worst < 1e-5


def check_checks(checks):
    ok = True
    for name, (a, b) in checks.items():
        d = mcf.max_rel_diff(a, b)
        print(f"  check {name}: rel diff {d:.2e}")
        ok = ok and d <= 1e-6
    return ok


def check_float64(model, adapters, lay, spec, pixels, ids, cot, expected):
    model64 = float64_model(model)
    a64 = {k: v.double() for k, v in adapters.items()}
    c64 = {k: v.double() for k, v in cot.items()}
    ref64, _, _ = forward_and_grads(model64, a64, lay, spec, pixels.double(), ids, c64)
    ok = True
    print(f"  {'output':22s} {'shape':14s} {'max|value|':>11s} {'f32-vs-f64 rel':>15s}")
    for name, t in expected.items():
        if name not in ref64:
            continue
        d = mcf.max_rel_diff(t, ref64[name])
        flag = "" if d <= F64_AGREEMENT else "   <-- too large"
        shape = "x".join(str(s) for s in t.shape)
        print(f"  {name:22s} {shape:14s} {t.abs().max().item():11.4g} {d:15.2e}{flag}")
        ok = ok and d <= F64_AGREEMENT
    return ok, model64, a64, c64


def check_directional(model64, a64, lay, spec, pixels, ids, c64):
    """float64 central difference of the loss along one random direction per adapter tensor
    against the autograd gradient (guards against gradients lost in the forward)."""
    base, _, _ = forward_and_grads(model64, a64, lay, spec, pixels.double(), ids, c64)
    ok = True
    eps = 1e-6
    for k in sorted(a64):
        d = torch.randn_like(a64[k])
        losses = []
        for sign in (1.0, -1.0):
            moved = dict(a64)
            moved[k] = a64[k] + sign * eps * d
            with torch.no_grad():
                out, _, _, _ = adapted_forward(model64, moved, lay, spec, pixels.double(), ids)
                losses.append(loss_of(out, c64, spec.clip.vision_hooks).item())
        fd = (losses[0] - losses[1]) / (2 * eps)
        ad = (base[f"grad_{k}"] * d).sum().item()
        rel = abs(fd - ad) / max(abs(ad), 1e-30)
        print(f"  float64 directional derivative d loss/d {k}: autograd {ad:.8g}, "
              f"finite difference {fd:.8g}, rel {rel:.1e}")
        ok = ok and rel < 1e-6
    return ok


def check_adapters_matter(expected, plain):
    """The perturbed adapters must change every output noticeably."""
    ok = True
    for k, v in plain.items():
        change = mcf.max_rel_diff(expected[k], v)
        print(f"  adapted vs plain CLIP {k:22s}: max rel change {change:.3f}")
        ok = ok and change > 1e-2
    return ok


# ----------------------------------------------------------------------------- writing


def save_sorted(tensors, path, metadata):
    """save_file, then rewrite the JSON header with the metadata keys sorted: safetensors
    writes several metadata keys in random order, and the files should be byte-identical
    from run to run. The header keeps its length (same content), so offsets are unchanged."""
    mcf.save_tensors(tensors, path, metadata=metadata)
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > n:
            raise RuntimeError(f"{path}: header grew while sorting the metadata")
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--config", required=True, choices=sorted(SPECS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--orthogonal", choices=sorted(ORTHOGONAL),
                    help="override the config's orthogonality placement")
    ap.add_argument("--use-a", type=int, choices=(0, 1), help="override: modality maps A_l")
    ap.add_argument("--use-b", type=int, choices=(0, 1), help="override: layer map B")
    args = ap.parse_args()

    t0 = time.time()
    torch.manual_seed(args.seed)
    spec = copy.deepcopy(SPECS[args.config])
    if args.orthogonal is not None:
        spec.orthogonal = args.orthogonal
    if args.use_a is not None:
        spec.use_a = bool(args.use_a)
    if args.use_b is not None:
        spec.use_b = bool(args.use_b)
    out_dir = args.out.rstrip("/")
    print(f"{args.config}: transformers {transformers.__version__}, torch {torch.__version__}, "
          f"seed {args.seed}, q {spec.q}, orthogonal {spec.orthogonal}, "
          f"use_a {int(spec.use_a)}, use_b {int(spec.use_b)}")

    mcf.write_config(spec.clip, out_dir)
    model = mcf.build_model(out_dir)
    mcf.randomize_weights(model)
    model.requires_grad_(False)  # CLIP is frozen; only the adapters get gradients
    pixels = mcf.make_pixels(spec.clip.n_images, spec.clip.image_hw)
    ids = mcf.make_input_ids(spec.clip.text_rows, model.config.text_config, spec.n_texts)
    lay = layout_for(model, spec.q)
    print(f"  layout: q {lay.q}, bt {lay.bt}, bv {lay.bv}, M {lay.M}, L {lay.L}, S {lay.S}; "
          f"text layers {lay.text_layers}, vision layers {lay.vision_layers}")

    ok = check_identity_init(model, lay, spec, pixels, ids)
    adapters = perturb_adapters(init_adapters(lay, spec.orthogonal, spec.use_a, spec.use_b))

    with torch.no_grad():
        first, _, _, _ = adapted_forward(model, adapters, lay, spec, pixels, ids)
    cot = make_cotangents(first, spec.clip.vision_hooks)
    result, checks, blocks = forward_and_grads(model, adapters, lay, spec, pixels, ids, cot)
    ok = check_checks(checks) and ok
    ok = orthogonality_report(blocks, spec) and ok

    ok = check_stacked_order(result["dcrc_blocks"], blocks, lay) and ok
    ok = check_dcrc_raw(result["dcrc_raw"], adapters, lay) and ok
    # outputs, loss, gradients and blocks, plus the cotangents (the file sorts them by name)
    expected = {k: v.contiguous() for k, v in {**result, **cot}.items()}

    with torch.no_grad():
        plain, _ = mcf.run_reference(model, spec.clip, pixels, ids)
    ok = check_adapters_matter(expected, {k: plain[k] for k in first}) and ok
    f64_ok, model64, a64, c64 = check_float64(model, adapters, lay, spec, pixels, ids, cot,
                                              expected)
    ok = f64_ok and ok
    ok = check_directional(model64, a64, lay, spec, pixels, ids, c64) and ok
    for k, g in expected.items():
        if k.startswith("grad_") and k[5:] in adapters and g.abs().max().item() == 0.0:
            print(f"  ERROR: {k} is all zero", file=sys.stderr)
            ok = False

    meta = {
        "generator": f"make_hclip_fixtures.py config={args.config} seed={args.seed} "
        f"transformers={transformers.__version__} torch={torch.__version__}",
        "q": str(spec.q),
        "orthogonal": spec.orthogonal,
        "use_a": str(int(spec.use_a)),
        "use_b": str(int(spec.use_b)),
        "hooks_vision": ",".join(map(str, spec.clip.vision_hooks)),
    }
    mcf.save_tensors(mcf.weights_state_dict(model), os.path.join(out_dir, "model.safetensors"),
                     metadata={"format": "pt"})
    save_sorted({"pixel_values": pixels, "input_ids": ids},
                os.path.join(out_dir, "inputs.safetensors"), meta)
    save_sorted({f"hclip.{k}": v for k, v in adapters.items()},
                os.path.join(out_dir, "adapters.safetensors"), meta)
    save_sorted(expected, os.path.join(out_dir, "expected.safetensors"), meta)

    # the files read back equal what was computed, with the metadata intact
    back = load_file(os.path.join(out_dir, "expected.safetensors"))
    ok = set(back) == set(expected) and all(torch.equal(back[k], expected[k]) for k in back) and ok
    back = load_file(os.path.join(out_dir, "adapters.safetensors"))
    ok = all(torch.equal(back[f"hclip.{k}"], v) for k, v in adapters.items()) and ok
    with safe_open(os.path.join(out_dir, "adapters.safetensors"), "pt") as f:
        ok = f.metadata() == meta and ok

    print(f"  {out_dir}: {mcf.dir_size(out_dir) / 1e6:.3f} MB, total {time.time() - t0:.1f} s")
    if not ok:
        print("FAILED: see messages above", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

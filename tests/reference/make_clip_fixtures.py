#!/usr/bin/env python3
"""Reference fixtures for clhclip's CLIP forward, generated with HF transformers.

Offline tool: CI never runs it (CI has no torch). It builds a random-weight HF CLIPModel for one
of the configurations below, perturbs every tensor so that each one influences the outputs,
and writes config.json, model.safetensors, inputs.safetensors and expected.safetensors into
--out. See tests/reference/README.md for what each file holds.

    python3 tests/reference/make_clip_fixtures.py --config tiny_p8 --out tests/fixtures/clip_tiny_p8
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# float32 and float64 runs of the same model must agree to about this (max abs diff / max abs).
F64_AGREEMENT = 1e-4


@dataclass
class FixtureSpec:
    config: dict  # text_config / vision_config / top-level keys as config.json holds them
    sparse_config: bool  # True: write `config` verbatim (hub-style sparse file); False: HF save
    n_images: int
    image_hw: int
    text_rows: str  # which input_ids generator to use (see make_input_ids)
    vision_hooks: list
    text_hooks: list
    weight_dtype: torch.dtype = torch.float32
    openai_layout: bool = False  # write OpenAI/open_clip names and no config.json
    extra: dict = field(default_factory=dict)


SPECS = {
    # Non-native input size (48 = 6x6 grid from a native 4x4) so the position grid is resized;
    # non-legacy eos_token_id -> pooling at the first EOS position.
    "tiny_p8": FixtureSpec(
        config={
            "projection_dim": 40,
            "logit_scale_init_value": 2.6592,
            "text_config": {
                "vocab_size": 1000,
                "hidden_size": 48,
                "intermediate_size": 96,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 16,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "bos_token_id": 998,
                "eos_token_id": 999,
                "pad_token_id": 1,
                "projection_dim": 40,
            },
            "vision_config": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "image_size": 32,
                "patch_size": 8,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "projection_dim": 40,
            },
        },
        sparse_config=False,
        n_images=2,
        image_hw=48,
        text_rows="first_eos",
        vision_hooks=[0, 1],
        text_hooks=[0],
    ),
    # Like hub files saved from openai/clip-vit-base-patch16: legacy eos_token_id 2 (argmax
    # pooling), no patch_size (default 32), no hidden_act/layer_norm_eps/projection_dim.
    # Weights stored as F16.
    "legacy_sparse": FixtureSpec(
        config={
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "text_config": {
                "bos_token_id": 0,
                "eos_token_id": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "vocab_size": 600,
                "max_position_embeddings": 12,
            },
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 64,
            },
        },
        sparse_config=True,
        n_images=1,
        image_hw=64,
        text_rows="legacy_argmax",
        vision_hooks=[0],
        text_hooks=[0],
        weight_dtype=torch.float16,
    ),
    # OpenAI/open_clip names, no config.json: the loader infers everything from shapes, with
    # heads = width / 64 (so widths are multiples of 64). Different layer counts per tower catch
    # loaders that count one tower's blocks into the other. Weights are stored as F16 (as in
    # OpenAI's checkpoints), in both the OpenAI file and the HF sibling (<out>_hf), to keep the
    # committed fixtures small.
    "tiny_openai": FixtureSpec(
        config={
            "projection_dim": 32,
            "text_config": {
                "vocab_size": 500,
                "hidden_size": 64,
                "intermediate_size": 256,
                "num_hidden_layers": 2,
                "num_attention_heads": 1,
                "max_position_embeddings": 8,
                "bos_token_id": 498,
                "eos_token_id": 499,
                "projection_dim": 32,
            },
            "vision_config": {
                "hidden_size": 128,
                "intermediate_size": 512,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 16,
                "patch_size": 4,
                "projection_dim": 32,
            },
        },
        sparse_config=False,
        n_images=2,
        image_hw=16,
        text_rows="sot_eot",
        vision_hooks=[0],
        text_hooks=[1],
        weight_dtype=torch.float16,
        openai_layout=True,
    ),
    # ViT-B/16 sizes at the CAT-Seg resolution (24x24 grid from 14x14). Not committed.
    "vitb16_384": FixtureSpec(
        config={
            "projection_dim": 512,
            "text_config": {},
            "vision_config": {"patch_size": 16},
        },
        sparse_config=False,
        n_images=1,
        image_hw=384,
        text_rows="sot_eot",
        vision_hooks=[3, 7],
        text_hooks=[5],
        extra={"n_texts": 4},
    ),
}


# ----------------------------------------------------------------------------- model


def build_model(config_dir):
    """CLIPModel built from the config.json in config_dir (so the file is what built it)."""
    config = CLIPConfig.from_pretrained(config_dir)
    # Eager attention: explicit fp32 softmax, the formulation the spec describes.
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = CLIPModel(config)
    return model.eval()


def layer_norm_param(name):
    return any(s in name for s in ("layer_norm", "layrnorm", "layernorm"))


@torch.no_grad()
def randomize_weights(model):
    """Overwrite every parameter with non-trivial random values (fails on unknown tensors)."""
    for name, p in model.named_parameters():
        if name == "logit_scale":
            p.fill_(2.0 + 2.6 * torch.rand(()).item())
        elif layer_norm_param(name):
            if name.endswith(".weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
        elif name.endswith(".bias"):
            p.copy_(0.2 * torch.randn_like(p))
        elif name.endswith("class_embedding"):
            p.copy_(torch.randn_like(p))
        elif "position_embedding" in name:
            p.copy_(0.5 * torch.randn_like(p))
        elif "token_embedding" in name:
            p.copy_(torch.randn_like(p))
        elif p.dim() >= 2:
            # fan-in scaling keeps activations O(1) through the blocks
            fan_in = math.prod(p.shape[1:])
            p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
        else:
            raise RuntimeError(f"randomize_weights: no rule for parameter {name}")


@torch.no_grad()
def round_weights_to_fp16(model):
    for p in model.parameters():
        p.copy_(p.half().float())


# ----------------------------------------------------------------------------- inputs


def make_pixels(n, hw):
    """Random 0..255 pixels normalised with the OpenAI CLIP mean/std, as clh_image_preprocess."""
    raw = torch.rand(n, 3, hw, hw) * 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0
    return ((raw - mean) / std).float()


def random_ids(count, low, high):
    return torch.randint(low, high, (count,), dtype=torch.int64)


def make_input_ids(kind, text_cfg, n_texts):
    vocab = text_cfg.vocab_size
    ctx = text_cfg.max_position_embeddings
    rows = []
    if kind == "first_eos":
        # HF non-legacy pooling: FIRST position holding eos_token_id.
        bos, eos = text_cfg.bos_token_id, text_cfg.eos_token_id
        low, high = 2, min(bos, eos)
        # row 0: EOS at 5, zero padding
        r = torch.zeros(ctx, dtype=torch.int64)
        r[0] = bos
        r[1:5] = random_ids(4, low, high)
        r[5] = eos
        rows.append(r)
        # row 1: EOS at 10, padded with EOS (HF pads openai tokenizers with EOT)
        r = torch.full((ctx,), eos, dtype=torch.int64)
        r[0] = bos
        r[1:10] = random_ids(9, low, high)
        rows.append(r)
        # row 2: EOS at 3, more ids, a second EOS at 12, then zeros
        r = torch.zeros(ctx, dtype=torch.int64)
        r[0] = bos
        r[1:3] = random_ids(2, low, high)
        r[3] = eos
        r[4:12] = random_ids(8, low, high)
        r[12] = eos
        rows.append(r)
    elif kind == "legacy_argmax":
        # Legacy config (eos_token_id 2): HF pools at argmax(ids). As with the real OpenAI
        # vocab, EOT is the largest id; id 2 appears before it so "first eos_token_id"
        # pooling would pick a different position.
        sot, eot = vocab - 2, vocab - 1
        lengths = [4, 7, ctx - 2]  # ids between SOT and EOT; the last row fills the context
        for i, n in enumerate(lengths):
            r = torch.zeros(ctx, dtype=torch.int64)
            r[0] = sot
            r[1 : 1 + n] = random_ids(n, 3, sot)
            r[1 + (i % n)] = 2
            r[1 + n] = eot
            rows.append(r)
    elif kind == "sot_eot":
        # OpenAI tokenizer layout: SOT ids EOT, zero padding; EOT = vocab-1 is the largest id
        # and eos_token_id, so argmax and first-EOS pooling agree.
        sot, eot = vocab - 2, vocab - 1
        assert text_cfg.eos_token_id == eot, "sot_eot inputs need eos_token_id == vocab - 1"
        low = 256 if vocab > 1000 else 1  # skip the byte tokens for the real vocab
        lengths = [2, ctx - 2, ctx // 2 + 1, 7][:n_texts]
        if n_texts > len(lengths):
            raise RuntimeError("sot_eot: at most 4 rows")
        for n in lengths:
            r = torch.zeros(ctx, dtype=torch.int64)
            r[0] = sot
            r[1 : 1 + n] = random_ids(n, low, sot)
            r[1 + n] = eot
            rows.append(r)
    else:
        raise RuntimeError(f"unknown text_rows kind {kind}")
    return torch.stack(rows)


# ----------------------------------------------------------------------------- forward


def layer_output(out):
    return out[0] if isinstance(out, tuple) else out


def capture_layers(layers, indices, store, prefix):
    """Forward hooks that record the output of the given encoder blocks."""
    handles = []
    for i in indices:

        def hook(_module, _inputs, output, i=i):
            store[f"{prefix}{i}"] = layer_output(output).detach().clone()

        handles.append(layers[i].register_forward_hook(hook))
    return handles


def pooled_from(result):
    # transformers 5.x returns BaseModelOutputWithPooling (projected pooler_output), 4.x a tensor
    return result if torch.is_tensor(result) else result.pooler_output


def catseg_dense(model, pixels, interpolate):
    """Spec 2.3: the last vision block without attention (v-stream through out_proj, CLS
    residual), then post_layernorm + visual_projection on every token."""
    vm = model.vision_model
    x = vm.pre_layrnorm(vm.embeddings(pixels, interpolate_pos_encoding=interpolate))
    layers = vm.encoder.layers
    for layer in layers[:-1]:
        x = layer_output(layer(x, None))
    last = layers[-1]
    attn = last.self_attn
    y = last.layer_norm1(x)
    q = attn.out_proj(attn.q_proj(y))  # computed as the reference code does, unused
    k = attn.out_proj(attn.k_proj(y))
    v = attn.out_proj(attn.v_proj(y))
    del q, k
    v = v + x[:, :1]
    v = v + last.mlp(last.layer_norm2(v))
    # also return the normal last block on the same x, to check this loop against HF
    normal = layer_output(last(x, None))
    return model.visual_projection(vm.post_layernorm(v)), normal


@torch.no_grad()
def run_reference(model, spec, pixels, ids):
    vcfg = model.config.vision_config
    h, w = pixels.shape[-2:]
    interpolate = h != vcfg.image_size or w != vcfg.image_size
    out = {}

    hooks = capture_layers(model.vision_model.encoder.layers, spec.vision_hooks, out,
                           "hidden_vision_")
    hooks += capture_layers(model.text_model.encoder.layers, spec.text_hooks, out, "hidden_text_")
    try:
        image_res = model.get_image_features(pixel_values=pixels,
                                             interpolate_pos_encoding=interpolate)
        out["image_pooled"] = pooled_from(image_res)
        out["text_features"] = pooled_from(model.get_text_features(input_ids=ids))
    finally:
        for hnd in hooks:
            hnd.remove()

    vision = model.vision_model(pixel_values=pixels, interpolate_pos_encoding=interpolate,
                                output_hidden_states=True)
    last = vision.last_hidden_state
    out["image_dense"] = model.visual_projection(model.vision_model.post_layernorm(last))
    dense, normal_last = catseg_dense(model, pixels, interpolate)
    out["image_dense_catseg"] = dense
    out["logit_scale"] = model.logit_scale.detach().reshape(1).clone()

    if interpolate:
        emb = model.vision_model.embeddings
        n_tokens = 1 + (h // vcfg.patch_size) * (w // vcfg.patch_size)
        dummy = torch.zeros(1, n_tokens, vcfg.hidden_size, dtype=pixels.dtype)
        out["position_embedding_resized"] = emb.interpolate_pos_encoding(dummy, h, w)[0, 1:]

    checks = {
        "dense CLS == pooled": (out["image_dense"][:, 0], out["image_pooled"]),
        "manual block loop == HF last_hidden_state": (normal_last, last),
    }
    if vision.hidden_states is not None:
        for i in spec.vision_hooks:
            checks[f"hook {i} == hidden_states[{i + 1}]"] = (out[f"hidden_vision_{i}"],
                                                            vision.hidden_states[i + 1])
    return {k: v.contiguous() for k, v in out.items()}, checks


def max_rel_diff(a, b):
    scale = b.abs().max().item()
    return (a.double() - b.double()).abs().max().item() / max(scale, 1e-30)


def verify_and_report(model, spec, pixels, ids, expected, checks):
    ok = True
    for name, (a, b) in checks.items():
        d = max_rel_diff(a, b)
        print(f"  check {name}: rel diff {d:.2e}")
        if d > 1e-6:
            print("  ERROR: internal consistency check failed", file=sys.stderr)
            ok = False

    model64 = model.to(torch.float64)
    ref64, _ = run_reference(model64, spec, pixels.double(), ids)
    model.to(torch.float32)
    print(f"  {'output':28s} {'shape':18s} {'max|value|':>11s} {'f32-vs-f64 rel':>15s}")
    for name, t in expected.items():
        d = max_rel_diff(t, ref64[name])
        flag = "" if d <= F64_AGREEMENT else "   <-- WARNING"
        shape = "x".join(str(s) for s in t.shape)
        print(f"  {name:28s} {shape:18s} {t.abs().max().item():11.4g} {d:15.2e}{flag}")
        if d > F64_AGREEMENT:
            ok = False
    return ok


# ----------------------------------------------------------------------------- names


def hf_to_openai(state_dict):
    """Map HF CLIPModel tensor names to OpenAI/open_clip names (spec 8.1/8.2)."""
    block_renames = {
        "self_attn.out_proj.": "attn.out_proj.",
        "layer_norm1.": "ln_1.",
        "layer_norm2.": "ln_2.",
        "mlp.fc1.": "mlp.c_fc.",
        "mlp.fc2.": "mlp.c_proj.",
    }
    plain = {
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "logit_scale": "logit_scale",
    }
    transposed = {"visual_projection.weight": "visual.proj",
                  "text_projection.weight": "text_projection"}
    towers = {"vision_model.encoder.layers.": "visual.transformer.resblocks.",
              "text_model.encoder.layers.": "transformer.resblocks."}
    out, qkv = {}, {}
    for name, t in state_dict.items():
        if name in plain:
            out[plain[name]] = t
        elif name in transposed:
            out[transposed[name]] = t.t().contiguous()
        elif name.endswith("position_ids"):
            continue  # legacy buffer, not a weight
        else:
            tower = next((p for p in towers if name.startswith(p)), None)
            if tower is None:
                raise RuntimeError(f"hf_to_openai: unmapped tensor {name}")
            idx, rest = name[len(tower):].split(".", 1)
            prefix = f"{towers[tower]}{idx}."
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                which, kind = rest[len("self_attn."):].split(".")
                qkv.setdefault((prefix, kind), {})[which[0]] = t
                continue
            for old, new in block_renames.items():
                if rest.startswith(old):
                    out[prefix + new + rest[len(old):]] = t
                    break
            else:
                raise RuntimeError(f"hf_to_openai: unmapped block tensor {name}")
    for (prefix, kind), parts in qkv.items():
        stacked = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # [q;k;v] rows
        out[f"{prefix}attn.in_proj_{kind}"] = stacked.contiguous()
    return out


@torch.no_grad()
def check_with_open_clip(openai_sd, pixels, ids, expected):
    """Independent check of the OpenAI names: open_clip builds its own model from them."""
    try:
        import open_clip
    except ImportError:
        print("  open_clip not installed: skipping the open_clip cross-check")
        return True
    sd = {k: v.clone() for k, v in openai_sd.items()}
    oc = open_clip.model.build_model_from_openai_state_dict(sd, quick_gelu=True).float().eval()
    ok = True
    for name, got in (("image_pooled", oc.encode_image(pixels)),
                      ("text_features", oc.encode_text(ids))):
        d = max_rel_diff(got, expected[name])
        print(f"  open_clip {name}: rel diff to HF {d:.2e}")
        ok = ok and d < 1e-5
    d = abs(oc.logit_scale.item() - expected["logit_scale"].item())
    print(f"  open_clip logit_scale: abs diff {d:.2e}")
    return ok and d == 0.0


# ----------------------------------------------------------------------------- writing


def write_config(spec, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    if spec.sparse_config:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(spec.config, f, indent=2)
            f.write("\n")
    else:
        CLIPConfig(**spec.config).save_pretrained(out_dir)


def save_tensors(tensors, path, dtype=None, metadata=None):
    data = {}
    for k, v in tensors.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        data[k] = v.contiguous()
    save_file(data, path, metadata=metadata)


def weights_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


@torch.no_grad()
def check_hf_reload(hf_dir, spec, pixels, ids, expected):
    """The written HF files load with from_pretrained and reproduce the expected outputs."""
    model = CLIPModel.from_pretrained(hf_dir, dtype=torch.float32,
                                      attn_implementation="eager").eval()
    got, _ = run_reference(model, spec, pixels, ids)
    d = max(max_rel_diff(got[k], expected[k]) for k in expected)
    print(f"  reload {os.path.basename(hf_dir)} with from_pretrained: max rel diff {d:.2e}")
    # same weights; only BLAS blocking can differ (bit-equal for the tiny configs)
    return d <= 1e-6


def dir_size(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--config", required=True, choices=sorted(SPECS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.set_grad_enabled(False)
    spec = SPECS[args.config]
    out_dir = args.out.rstrip("/")
    hf_dir = out_dir + "_hf" if spec.openai_layout else out_dir
    print(f"{args.config}: transformers {transformers.__version__}, torch {torch.__version__}, "
          f"seed {args.seed}")

    write_config(spec, hf_dir)
    model = build_model(hf_dir)
    randomize_weights(model)
    if spec.weight_dtype == torch.float16:
        round_weights_to_fp16(model)  # the reference uses exactly the stored values

    pixels = make_pixels(spec.n_images, spec.image_hw)
    ids = make_input_ids(spec.text_rows, model.config.text_config,
                         spec.extra.get("n_texts", 3))
    expected, checks = run_reference(model, spec, pixels, ids)
    t_ref = time.time() - t0

    save_tensors(weights_state_dict(model), os.path.join(hf_dir, "model.safetensors"),
                 dtype=spec.weight_dtype, metadata={"format": "pt"})
    ok = True
    if spec.openai_layout:
        openai_sd = hf_to_openai(weights_state_dict(model))
        os.makedirs(out_dir, exist_ok=True)
        save_tensors(openai_sd, os.path.join(out_dir, "model.safetensors"),
                     dtype=spec.weight_dtype, metadata={"format": "pt"})
        ok = check_with_open_clip(openai_sd, pixels, ids, expected) and ok
    # One metadata key: safetensors writes several in random order, and the files should be
    # byte-identical from run to run.
    meta = {"generator": f"make_clip_fixtures.py config={args.config} seed={args.seed} "
            f"transformers={transformers.__version__} torch={torch.__version__} "
            f"hooks_vision={','.join(map(str, spec.vision_hooks))} "
            f"hooks_text={','.join(map(str, spec.text_hooks))} "
            f"interpolate_pos_encoding={'position_embedding_resized' in expected}"}
    save_tensors({"pixel_values": pixels, "input_ids": ids},
                 os.path.join(out_dir, "inputs.safetensors"), metadata=meta)
    save_tensors(expected, os.path.join(out_dir, "expected.safetensors"), metadata=meta)

    ok = verify_and_report(model, spec, pixels, ids, expected, checks) and ok
    ok = check_hf_reload(hf_dir, spec, pixels, ids, expected) and ok
    # the files read back equal what was computed
    back = load_file(os.path.join(out_dir, "expected.safetensors"))
    ok = all(torch.equal(back[k], expected[k]) for k in expected) and ok

    for d in sorted({out_dir, hf_dir}):
        print(f"  {d}: {dir_size(d) / 1e6:.3f} MB")
    print(f"  reference forward {t_ref:.1f} s, total {time.time() - t0:.1f} s")
    if not ok:
        print("FAILED: see messages above", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Convert an OpenAI CLIP .pt or an open_clip checkpoint to a safetensors file for clhclip.

Offline tool (needs torch + safetensors; CI never runs it). Tensor names stay OpenAI/open_clip
style (visual.conv1.weight, transformer.resblocks.0.attn.in_proj_weight, ...), which
clh_clip_load accepts directly.

    python3 models/convert_to_safetensors.py ViT-B-16.pt ViT-B-16.safetensors
    python3 models/convert_to_safetensors.py open_clip_pytorch_model.bin out.safetensors --dtype f16
    python3 models/convert_to_safetensors.py --self-test

Inputs:
  * OpenAI .pt: a TorchScript archive (torch.jit.load(...).state_dict()); a plain pickled
    state dict is also accepted, as OpenAI's clip.load does.
  * open_clip .bin/.pt: a state dict, possibly nested under "state_dict" (training
    checkpoints), possibly with a "module." prefix (DataParallel/DDP); .safetensors input is
    re-encoded (dtype change).
Floating-point tensors become F32 (default) or F16; the int scalars input_resolution,
context_length and vocab_size and any non-tensor entries are dropped.
"""

import argparse
import os
import sys
import tempfile
import warnings

import torch
from safetensors.torch import load_file, save_file

DROPPED_KEYS = ("input_resolution", "context_length", "vocab_size")
DTYPES = {"f32": torch.float32, "f16": torch.float16}


def load_checkpoint(path, allow_pickle=False):
    """Raw key -> value mapping from an OpenAI/open_clip checkpoint file."""
    if not os.path.isfile(path):
        raise RuntimeError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        return load_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
        try:
            return torch.jit.load(path, map_location="cpu").state_dict()
        except RuntimeError:
            pass  # not a TorchScript archive: a pickled state dict
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # noqa: BLE001 -- report any unpickling failure with the file name
        hint = "" if allow_pickle else " (retry with --allow-pickle if you trust the file)"
        raise RuntimeError(f"{path}: cannot read checkpoint: {e}{hint}") from e


def unwrap_state_dict(obj, path):
    """The state dict inside a checkpoint (training checkpoints nest it under "state_dict")."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise RuntimeError(f"{path}: expected a state dict, found {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def convert_state_dict(sd, dtype):
    """Tensors to write: floats cast to dtype, integer tensors kept, the rest dropped."""
    out, dropped = {}, []
    for name, value in sd.items():
        if name in DROPPED_KEYS or not torch.is_tensor(value):
            dropped.append(name)
            continue
        t = value.detach().cpu()
        if t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous()
    return out, dropped


def check_looks_like_clip(tensors, path):
    required = ("visual.conv1.weight", "token_embedding.weight", "ln_final.weight")
    missing = [k for k in required if k not in tensors]
    if missing:
        raise RuntimeError(f"{path}: not an OpenAI/open_clip ViT CLIP state dict "
                           f"(missing {', '.join(missing)})")


def convert(src, dst, dtype_name="f32", allow_pickle=False, quiet=False, act="quick_gelu"):
    sd = unwrap_state_dict(load_checkpoint(src, allow_pickle), src)
    tensors, dropped = convert_state_dict(sd, DTYPES[dtype_name])
    check_looks_like_clip(tensors, src)
    # Shapes cannot tell QuickGELU from exact GELU; clh_clip_load reads this entry.
    save_file(tensors, dst, metadata={"format": "pt", "hidden_act": act})
    if not quiet:
        n_params = sum(t.numel() for t in tensors.values())
        print(f"{src} -> {dst}: {len(tensors)} tensors, {n_params} values, {dtype_name}"
              + (f"; dropped {', '.join(dropped)}" if dropped else ""))
    return tensors


# ----------------------------------------------------------------------------- self-test


def tiny_openai_state_dict():
    """OpenAI-named fp16 state dict of the tiny_openai reference model."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "tests", "reference"))
    import make_clip_fixtures as fx  # noqa: E402 -- offline tool, imported on demand

    torch.manual_seed(0)
    spec = fx.SPECS["tiny_openai"]
    with tempfile.TemporaryDirectory() as d:
        fx.write_config(spec, d)
        model = fx.build_model(d)
    fx.randomize_weights(model)
    fx.round_weights_to_fp16(model)
    sd = fx.hf_to_openai(fx.weights_state_dict(model))
    return {k: v.half() for k, v in sd.items()}


class _Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(sd, path):
    """A TorchScript archive whose state_dict() has these dotted names, like OpenAI's .pt."""
    root = _Holder()
    for name, t in sd.items():
        *parents, leaf = name.split(".")
        module = root
        for p in parents:
            if p not in module._modules:
                module.add_module(p, torch.nn.Module())
            module = module._modules[p]
        if t.is_floating_point():
            module.register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=False))
        else:
            module.register_buffer(leaf, t.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(root), path)


def self_test():
    sd16 = tiny_openai_state_dict()
    scalars = {"input_resolution": torch.tensor(16), "context_length": torch.tensor(8),
               "vocab_size": torch.tensor(500)}
    failures = []

    def expect(cond, what):
        print(f"  {'ok  ' if cond else 'FAIL'} {what}")
        if not cond:
            failures.append(what)

    def same_values(got, dtype):
        return (set(got) == set(sd16)
                and all(got[k].dtype == dtype and torch.equal(got[k], sd16[k].to(dtype))
                        for k in sd16))

    with tempfile.TemporaryDirectory() as d:
        cases = {
            "torchscript.pt": lambda p: save_torchscript({**sd16, **scalars}, p),
            "plain.pt": lambda p: torch.save({**sd16, **scalars}, p),
            "nested_module.bin": lambda p: torch.save(
                {"epoch": 3, "name": "x",
                 "state_dict": {"module." + k: v for k, v in sd16.items()}}, p),
        }
        for fname, writer in cases.items():
            src = os.path.join(d, fname)
            writer(src)
            for dtype_name, dtype in DTYPES.items():
                dst = os.path.join(d, f"{fname}.{dtype_name}.safetensors")
                convert(src, dst, dtype_name, quiet=True)
                got = load_file(dst)
                expect(same_values(got, dtype), f"{fname} -> {dtype_name}: names and values kept")
                expect(not any(k in got for k in scalars), f"{fname} -> {dtype_name}: "
                       "input_resolution/context_length/vocab_size dropped")
        # a state dict without the CLIP tensors is refused, naming what is missing
        bad = os.path.join(d, "not_clip.pt")
        torch.save({"weight": torch.zeros(2)}, bad)
        try:
            convert(bad, os.path.join(d, "bad.safetensors"), quiet=True)
            expect(False, "non-CLIP state dict is rejected")
        except RuntimeError as e:
            expect("missing" in str(e), f"non-CLIP state dict is rejected ({e})")
    print("self-test " + ("FAILED" if failures else "passed"))
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", nargs="?", help="OpenAI .pt, open_clip .bin/.pt or .safetensors")
    ap.add_argument("dst", nargs="?", help="output .safetensors")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--act", choices=["quick_gelu", "gelu"], default="quick_gelu",
                    help="MLP activation: quick_gelu for OpenAI models and open_clip "
                         "'-quickgelu' models, gelu for other LAION open_clip models")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="allow arbitrary pickled objects (only for files you trust)")
    ap.add_argument("--self-test", action="store_true",
                    help="convert checkpoints built from a tiny random model and check them")
    args = ap.parse_args()
    if args.self_test:
        return self_test()
    if not args.src or not args.dst:
        ap.error("src and dst are required (or --self-test)")
    try:
        convert(args.src, args.dst, args.dtype, args.allow_pickle, act=args.act)
    except (RuntimeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

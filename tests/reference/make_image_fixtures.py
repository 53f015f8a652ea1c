#!/usr/bin/env python3
"""Reference data for tests/test_image.c, computed with PIL and HF transformers.

Writes into tests/fixtures/image/:
  synth_37x23.png, synth_50x61.png   deterministic synthetic RGB images (noise, gradients,
                                     saturated blocks and hard edges, so the bicubic
                                     overshoot is clamped)
  gray_9x7.png, rgba_9x7.png, palette_9x7.png   other PNG modes (conversion to RGB)
  expected.safetensors:
    load/<file>                U8 [h, w, 3]  PIL Image.open(...).convert("RGB")
    resize/<file>/<W>x<H>      U8 [H, W, 3]  PIL Image.resize((W, H), Image.BICUBIC)
    crop/<file>/<S>            F32 [3, S, S] HF CLIPImageProcessorPil: shortest edge S,
                                             centre crop S x S, rescale, OpenAI normalise
    resize_only/<file>/<S>     F32 [3, S, S] the same with a plain S x S resize, no crop
    real/<path>                F32 [8, 8, 3] PIL-decoded RGB of a ../shared/data image,
                                             averaged over an 8 x 8 grid of blocks
    real_size/<path>           I64 [2]       (width, height) from PIL
    real_clip224/<path>        F32 [8, 8, 3] HF CLIPImageProcessorPil output at 224 (HWC),
                                             averaged over the same 8 x 8 blocks

Run from the repository root:  python3 tests/reference/make_image_fixtures.py
"""
import os

import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

OUT_DIR = os.path.join("tests", "fixtures", "image")
SHARED = os.path.join("..", "shared", "data")
REAL_IMAGES = [
    "segmentation/ade20k_sceneparsing/images/ADE_val_00000001.jpg",
    "segmentation/ade20k_sceneparsing/images/ADE_val_00000002.jpg",
    "segmentation/ade20k_sceneparsing/images/ADE_val_00000003.jpg",
    "segmentation/ade20k_sceneparsing/annotations/ADE_val_00000001.png",
    "segmentation/voc2012_vainf/1_image.png",
    "segmentation/voc2012_vainf/23_image.png",
]
GRID = 8
REAL_PREPROCESS = [REAL_IMAGES[0], REAL_IMAGES[4]]  # one JPEG, one PNG

# Target sizes per synthetic image: shrink, enlarge, mixed, one axis only, extreme ratios.
# Pillow >= 13 runs the vertical pass first when the height loses more than twice as many
# pixels as the width: 50x17, 150x13 and 45x50 do, 45x51 is the tie (horizontal first).
RESIZES = {
    "synth_37x23.png": [(20, 11), (64, 40), (50, 17), (37, 10), (12, 23), (1, 1), (3, 90)],
    "synth_50x61.png": [(7, 5), (31, 44), (77, 61), (50, 30), (150, 13), (49, 60),
                        (45, 51), (45, 50)],
}
# Preprocess sizes. 37x23 at 13 and 50x61 at 32 put the crop where HF (floor) and
# torchvision (round half to even) disagree; 37x23 at 24 enlarges slightly.
PREPROCESS = {"synth_37x23.png": [13, 16, 24], "synth_50x61.png": [24, 32, 40]}


def synthetic(width, height, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.empty((height, width, 3), np.float64)
    img[..., 0] = 255 * x / max(width - 1, 1)
    img[..., 1] = 127.5 + 127.5 * np.sin(0.7 * x + 0.3 * y)
    img[..., 2] = rng.uniform(0, 255, (height, width))
    img[(x // 4 + y // 5) % 3 == 0] = [255, 255, 255]  # hard edges against the gradients
    img[height // 3: height // 3 + 3, :, :] = 0
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def other_modes():
    base = synthetic(9, 7, seed=3)
    rgba = np.dstack([base, np.arange(63, dtype=np.uint8).reshape(7, 9) * 4])
    return {
        "gray_9x7.png": Image.fromarray(base[..., 1], "L"),
        "rgba_9x7.png": Image.fromarray(rgba, "RGBA"),
        "palette_9x7.png": Image.fromarray(base, "RGB").quantize(colors=16),
    }


def hf_preprocess(image, size, crop):
    if crop:
        proc = CLIPImageProcessorPil(size={"shortest_edge": size},
                                     crop_size={"height": size, "width": size})
    else:
        proc = CLIPImageProcessorPil(size={"height": size, "width": size}, do_center_crop=False)
    out = proc(images=image, return_tensors="np")["pixel_values"][0]
    assert out.shape == (3, size, size), out.shape
    return out.astype(np.float32)


def block_means(rgb):
    h, w, _ = rgb.shape
    out = np.empty((GRID, GRID, 3), np.float32)
    for by in range(GRID):
        for bx in range(GRID):
            block = rgb[by * h // GRID:(by + 1) * h // GRID, bx * w // GRID:(bx + 1) * w // GRID]
            out[by, bx] = block.reshape(-1, 3).astype(np.float64).mean(axis=0)  # uint8 or f32
    return out


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    tensors = {}
    images = {
        "synth_37x23.png": Image.fromarray(synthetic(37, 23, seed=1), "RGB"),
        "synth_50x61.png": Image.fromarray(synthetic(50, 61, seed=2), "RGB"),
    }
    for name, img in {**images, **other_modes()}.items():
        img.save(os.path.join(OUT_DIR, name), optimize=True)
        loaded = Image.open(os.path.join(OUT_DIR, name)).convert("RGB")
        tensors[f"load/{name}"] = np.asarray(loaded, np.uint8)
    for name, sizes in RESIZES.items():
        for w, h in sizes:
            tensors[f"resize/{name}/{w}x{h}"] = np.asarray(
                images[name].resize((w, h), Image.BICUBIC), np.uint8)
    for name, sizes in PREPROCESS.items():
        for s in sizes:
            tensors[f"crop/{name}/{s}"] = hf_preprocess(images[name], s, crop=True)
            tensors[f"resize_only/{name}/{s}"] = hf_preprocess(images[name], s, crop=False)
    for rel in REAL_IMAGES:
        path = os.path.join(SHARED, rel)
        if not os.path.exists(path):
            print(f"skipping {path}: absent")
            continue
        rgb = np.asarray(Image.open(path).convert("RGB"), np.uint8)
        tensors[f"real/{rel}"] = block_means(rgb)
        tensors[f"real_size/{rel}"] = np.array([rgb.shape[1], rgb.shape[0]], np.int64)
        if rel in REAL_PREPROCESS:
            chw = hf_preprocess(Image.fromarray(rgb, "RGB"), 224, crop=True)
            tensors[f"real_clip224/{rel}"] = block_means(chw.transpose(1, 2, 0))
    out = os.path.join(OUT_DIR, "expected.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out)
    os.chmod(out, 0o644)
    total = sum(os.path.getsize(os.path.join(OUT_DIR, f)) for f in os.listdir(OUT_DIR))
    print(f"wrote {len(tensors)} tensors to {out}; {OUT_DIR} holds {total} bytes")


if __name__ == "__main__":
    main()

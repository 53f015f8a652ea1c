#!/usr/bin/env python3
"""Time one ViT-B/16 image-encoder forward in PyTorch (HF transformers) on the CPU, as the
side-by-side baseline for clhclip's forward on PoCL. Offline tool: never run in CI.

    python3 tests/reference/time_torch_vitb16.py --threads 2 --size 384 --runs 5

Random weights (timing does not depend on them); pooled + dense output like clhclip's
encode_image with want_pooled and want_dense."""
import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32, TF32 off)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=16,
                           projection_dim=512, hidden_act="quick_gelu")
    model = CLIPVisionModelWithProjection(cfg).eval().to(args.device)
    px = torch.randn(1, 3, args.size, args.size, device=args.device)
    interp = args.size != cfg.image_size

    def forward():
        with torch.no_grad():
            out = model.vision_model(pixel_values=px, interpolate_pos_encoding=interp)
            dense = model.visual_projection(model.vision_model.post_layernorm(out.last_hidden_state))
            pooled = model.visual_projection(out.pooler_output)
        if args.device != "cpu":
            torch.cuda.synchronize()
        return dense, pooled

    for _ in range(args.warmup):
        forward()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t0)
    print(f"torch {torch.__version__} {args.device} threads={args.threads} ViT-B/16 {args.size}x{args.size}: "
          f"median {statistics.median(times)*1e3:.1f} ms (min {min(times)*1e3:.1f}, "
          f"max {max(times)*1e3:.1f}) over {args.runs} runs")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch side of scripts/bench.lua: the same figures (ids gemm_MxKxN, attention384, vit224,
vit384, text) with the same thread count, plus OpenBLAS SGEMM GFLOP/s at the GEMM shapes, and
the side-by-side table against bench.lua's JSON output. Offline tool: never run in CI.

    CLHCLIP_GEMM=host    lua5.4 scripts/bench.lua --what all --model /tmp/vitb16 --json /tmp/host.json
    CLHCLIP_GEMM=clblast lua5.4 scripts/bench.lua --what all --model /tmp/vitb16 --json /tmp/clb.json
    python3 tests/reference/bench_torch.py --what all --threads 2 --json /tmp/torch.json \\
        --compare /tmp/host.json /tmp/clb.json

Random weights (timing does not depend on them). OpenBLAS is measured in child processes, one
per setting, so its spinning worker threads never share a process with PyTorch or PoCL:
  * Debian's libopenblas (the library clhclip's host GEMM path calls) as auto-detected, and
    with OPENBLAS_CORETYPE=SkylakeX (0.3.21 misdetects Zen 5 as Haswell, toolchain.md 9.6);
  * numpy's own bundled OpenBLAS (numpy.show_config() names it) with OPENBLAS_CORETYPE=SkylakeX.
OPENBLAS_CORETYPE is set only in those children."""
import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

FIGURES = ["gemm", "attention", "vit224", "vit384", "text", "seg384"]
GEMMS = [(577, 768, 768), (577, 768, 3072), (13167, 512, 512)]  # M x K x N, C = A W^T
DEBIAN_OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def timed(fn, runs, warmup):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "runs": runs}


def text_ids(prompts):
    """The prompts of bench.lua's text figure (same LCG), each padded with 0 to 77."""
    ids, seed = [], 12345
    for _ in range(prompts):
        row = [49406]
        seed = (seed * 1103515245 + 12345) % 2147483648
        for _ in range(6 + seed % 15):
            seed = (seed * 1103515245 + 12345) % 2147483648
            row.append(1000 + seed % 40000)
        row.append(49407)
        ids.append(row + [0] * (77 - len(row)))
    return ids


def torch_figures(args, want):
    import torch
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = []
    with torch.no_grad():
        if "gemm" in want:
            for m, k, n in GEMMS:
                a, w = torch.randn(m, k), torch.randn(n, k) * 0.02
                r = timed(lambda: torch.nn.functional.linear(a, w), args.runs, args.warmup)
                r.update(id=f"gemm_{m}x{k}x{n}", gflops=2 * m * n * k / r["median_s"] / 1e9)
                out.append(r)
        if "attention" in want:
            heads, length, hd = 12, 577, 64
            q, k, v = (torch.randn(heads, length, hd) for _ in range(3))

            def attention():  # the same per-head composition as bench.lua
                for h in range(heads):
                    p = torch.softmax((q[h] @ k[h].T) * hd ** -0.5, dim=-1)
                    p @ v[h]

            r = timed(attention, args.runs, args.warmup)
            r.update(id="attention384")
            out.append(r)
        for size in (224, 384):
            if f"vit{size}" not in want:
                continue
            cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, image_size=224, patch_size=16,
                                   projection_dim=512, hidden_act="quick_gelu")
            model = CLIPVisionModelWithProjection(cfg).eval()
            px = torch.randn(1, 3, size, size)

            def vit():
                o = model.vision_model(pixel_values=px, interpolate_pos_encoding=size != 224)
                model.visual_projection(model.vision_model.post_layernorm(o.last_hidden_state))
                model.visual_projection(o.pooler_output)

            r = timed(vit, args.runs, args.warmup)
            r.update(id=f"vit{size}")
            out.append(r)
        if "text" in want:
            cfg = CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                 num_attention_heads=8, max_position_embeddings=77,
                                 projection_dim=512, hidden_act="quick_gelu")
            model = CLIPTextModelWithProjection(cfg).eval()
            ids = torch.tensor(text_ids(args.prompts))
            r = timed(lambda: model(input_ids=ids), args.runs, args.warmup)
            r.update(id="text")
            out.append(r)
    if "seg384" in want:
        out.append(seg_figure(args))
    for r in out:
        print(f"torch {r['id']:24s} median {r['median_s'] * 1e3:9.3f} ms "
              f"(min {r['min_s'] * 1e3:.3f}, max {r['max_s'] * 1e3:.3f})")
    return {"torch": torch.__version__, "threads": args.threads, "results": out}


def seg_figure(args):
    """bench.lua's seg384: ViT-B/16 at 384 (dense + hooks 3 and 7), the CAT-Seg head of
    make_cathead_fixtures.py in its ViT-B configuration with --classes classes and pooling 1,
    then sigmoid(bilinear to 384) and argmax, as one inference view."""
    import dataclasses

    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import make_cathead_fixtures as cat

    c = dataclasses.replace(cat.VITB16, n_classes=args.classes, pool=1)
    gen = torch.Generator().manual_seed(0)
    params = cat.random_params(c, gen)
    text = cat.random_inputs(c, gen)["text"]
    cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=16,
                           projection_dim=512, hidden_act="quick_gelu")
    model = CLIPVisionModelWithProjection(cfg).eval()
    px = torch.randn(1, 3, 384, 384)

    def seg():
        with torch.no_grad():
            o = model.vision_model(pixel_values=px, interpolate_pos_encoding=True,
                                   output_hidden_states=True)
            dense = model.visual_projection(
                model.vision_model.post_layernorm(o.last_hidden_state))
            inp = {"image_dense": dense, "hook_0": o.hidden_states[4],
                   "hook_1": o.hidden_states[8], "text": text}
            logits = cat.head_forward(params, inp, c)
            up = torch.nn.functional.interpolate(logits, size=(384, 384), mode="bilinear",
                                                 align_corners=False)
            up.sigmoid().argmax(1)

    r = timed(seg, args.runs, args.warmup)
    r.update(id="seg384")
    return r


def openblas_worker(which, runs):
    """Child process: SGEMM GFLOP/s at the GEMM shapes. which: debian or numpy."""
    import numpy as np

    rng = np.random.default_rng(0)
    res = {}
    if which == "debian":
        lib = ctypes.CDLL(DEBIAN_OPENBLAS)
        lib.openblas_get_corename.restype = ctypes.c_char_p
        lib.openblas_get_config.restype = ctypes.c_char_p
        name = f"{lib.openblas_get_config().decode()} core {lib.openblas_get_corename().decode()}"
        fp = ctypes.POINTER(ctypes.c_float)
        for m, k, n in GEMMS:
            a = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((n, k), dtype=np.float32)
            c = np.zeros((m, n), dtype=np.float32)
            # cblas_sgemm(RowMajor=101, NoTrans=111, Trans=112, ...)
            call = lambda: lib.cblas_sgemm(101, 111, 112, m, n, k, ctypes.c_float(1.0),
                                           a.ctypes.data_as(fp), k, w.ctypes.data_as(fp), k,
                                           ctypes.c_float(0.0), c.ctypes.data_as(fp), n)
            call()
            assert np.allclose(c, a @ w.T, rtol=1e-3, atol=1e-2), "cblas_sgemm result is wrong"
            res[f"gemm_{m}x{k}x{n}"] = 2 * m * n * k / timed(call, runs, 1)["median_s"] / 1e9
    else:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        name = f"numpy {np.__version__} {cfg.get('name')} {cfg.get('version')}"
        for m, k, n in GEMMS:
            a = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((n, k), dtype=np.float32)
            res[f"gemm_{m}x{k}x{n}"] = 2 * m * n * k / timed(lambda: a @ w.T, runs, 1)[
                "median_s"] / 1e9
    print(json.dumps({"name": name, "gflops": res}))


def openblas_figures(args):
    settings = [("debian", None), ("debian", "SkylakeX"), ("numpy", "SkylakeX")]
    out = []
    for which, core in settings:
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(args.threads),
                   OMP_NUM_THREADS=str(args.threads))
        env.pop("OPENBLAS_CORETYPE", None)
        if core:
            env["OPENBLAS_CORETYPE"] = core
        p = subprocess.run([sys.executable, __file__, "--openblas-worker", which, "--runs",
                            str(max(args.runs, 5))], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            print(f"OpenBLAS ({which}) failed: {p.stderr.strip()[-400:]}")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r.update(which=which, coretype=core or "auto")
        print(f"OpenBLAS {which} OPENBLAS_CORETYPE={r['coretype']} ({r['name']}): " +
              ", ".join(f"{k} {v:.1f} GF/s" for k, v in r["gflops"].items()))
        out.append(r)
    return out


def compare(torch_doc, clh_paths):
    clh_docs = []
    for path in clh_paths:
        with open(path) as f:
            clh_docs.append(json.load(f))
    tor = {r["id"]: r for r in torch_doc["results"]}
    blas = torch_doc.get("openblas", [])
    head = ["figure"]
    for d in clh_docs:
        head += [f"clhclip ({d['gemm_path']}) ms", "ratio to torch"]
    head += [f"torch ({torch_doc['threads']} thr) ms"]
    if blas:
        head += ["OpenBLAS GF/s (" + ", ".join(f"{o['which']} {o['coretype']}" for o in blas) + ")"]
        head += [f"clhclip {d['gemm_path']} GF/s (share of best OpenBLAS)" for d in clh_docs]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    ids = []
    for d in clh_docs:
        ids += [r["id"] for r in d["results"] if r["id"] not in ids]
    for fid in ids:
        row = [fid]
        t = tor.get(fid)
        rs = [next((r for r in d["results"] if r["id"] == fid), None) for d in clh_docs]
        for r in rs:
            row += [f"{r['median_s'] * 1e3:.1f}" if r else "-",
                    f"{r['median_s'] / t['median_s']:.2f}x" if r and t else "-"]
        row += [f"{t['median_s'] * 1e3:.1f}" if t else "-"]
        if blas:
            refs = [o["gflops"].get(fid) for o in blas]
            best = max((x for x in refs if x), default=None)
            row += [" / ".join(f"{x:.0f}" if x else "-" for x in refs) if best else "-"]
            for r in rs:
                g = r.get("gflops") if r else None
                row += [f"{g:.0f} ({100 * g / best:.0f}%)" if g and best else "-"]
        print("| " + " | ".join(row) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--what", default="gemm,attention",
                    help="comma list of " + ",".join(FIGURES) + " or all")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=171)
    ap.add_argument("--classes", type=int, default=150, help="classes of the seg384 figure")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-openblas", action="store_true", help="skip the OpenBLAS children")
    ap.add_argument("--compare", nargs="*", default=[], metavar="CLH_JSON",
                    help="bench.lua --json outputs to put side by side (one per GEMM path)")
    ap.add_argument("--from-json", help="reuse an earlier --json output instead of measuring")
    ap.add_argument("--openblas-worker", choices=["debian", "numpy"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.openblas_worker:
        return openblas_worker(args.openblas_worker, args.runs)
    if args.from_json:
        with open(args.from_json) as f:
            doc = json.load(f)
    else:
        want = set(FIGURES if args.what == "all" else args.what.split(","))
        unknown = want - set(FIGURES)
        if unknown:
            ap.error(f"--what: unknown {sorted(unknown)}")
        doc = torch_figures(args, want)
        if "gemm" in want and not args.no_openblas:
            doc["openblas"] = openblas_figures(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
    if args.compare:
        compare(doc, args.compare)


if __name__ == "__main__":
    main()

-- Train H-CLIP adapters + the CAT-Seg head on a segmentation dataset (hclip-spec 5.4-5.6):
-- detectron2-style augmentation in a threaded prefetching loader, per-class sigmoid BCE,
-- AdamW with the CLIP tensors at clip-lr-mult x lr, cosine schedule, full-model gradient
-- clipping, periodic checkpoints and validation, --resume.
local paths = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib_path.lua")
local argparse = require "clhclip.argparse"
local seg_model = require "clhclip.seg_model"

local p = argparse.new("scripts/train.lua",
                       "Train H-CLIP adapters and a CAT-Seg head on images + label PNGs " ..
                           "(255 = ignore; generic images/+labels/ or COCO-Stuff/ADE layouts).")
p:option("--clip", {metavar = "DIR", help = "CLIP weights (HF folder or safetensors file); " ..
                        "not needed with --resume of a checkpoint that records it"})
p:option("--data", {metavar = "DIR", required = true, help = "training dataset folder"})
p:option("--split", {metavar = "S", help = "split folder, e.g. train2017 (COCO-Stuff layout)"})
p:option("--labels", {default = "raw", choices = {"raw", "ade150", "voc20", "voc20b"},
                      help = "label encoding of the training data"})
p:option("--classes", {metavar = "FILE|LIST",
                       help = "class names: a file with one per line or a comma list " ..
                           "(default: DATA/classes.txt)"})
p:option("--out", {metavar = "DIR", default = "runs/train",
                   help = "checkpoints, metrics.jsonl and the class list go here"})
p:option("--steps", {type = "integer", default = 80000, help = "total optimiser steps"})
p:option("--batch", {type = "integer", default = 4, help = "images per step"})
p:option("--crop", {type = "integer", default = 384, help = "training crop = model input size"})
p:option("--max-size", {type = "integer", default = 1333, help = "long-edge cap of the resize"})
p:option("--lr", {type = "number", default = 2e-4, help = "head learning rate"})
p:option("--clip-lr-mult", {type = "number", default = 0.01,
                            help = "learning rate of the CLIP adapters as a multiple of --lr"})
p:option("--weight-decay", {type = "number", default = 1e-4,
                            help = "AdamW weight decay (0 for norms and pad tokens)"})
p:option("--warmup", {type = "integer", default = 0, help = "linear warm-up steps"})
p:option("--max-grad-norm", {type = "number", default = 0.01,
                             help = "full-model gradient-norm clipping (0: off)"})
p:option("--pool", {type = "integer", default = 2, help = "class-attention pooling in training"})
p:flag("--exclude-ignored", {help = "leave ignored pixels out of the loss (released code: " ..
                                 "they count as negatives for every class)"})
p:flag("--no-augment", {help = "centre crops without photometric jitter or flips"})
p:option("--template", {metavar = "T", help = "prompt template(s), ';'-separated " ..
                            "(default \"" .. seg_model.DEFAULT_TEMPLATE .. "\")"})
p:option("--vocab", {metavar = "FILE", help = "BPE vocabulary (default: the CLIP vocabulary)"})
p:option("--head", {metavar = "K=V,...", help = "head configuration overrides, e.g. " ..
                        "hidden=64,window=6,decoder=32:16 (default: the ViT-B head)"})
p:option("--block-size", {type = "integer", help = "adapter block size (default: 128 or the " ..
                              "largest power of two dividing both tower widths)"})
p:option("--ortho", {default = "text", choices = {"text", "both", "none", "vision"},
                     help = "towers with orthogonal (Cayley) adapters"})
p:flag("--recompute", {help = "recompute CLIP blocks in the backward (less memory)"})
p:option("--seed", {type = "integer", default = 0, help = "seed of data order, augmentation, head"})
p:option("--threads", {type = "integer", default = 0, help = "loader threads (0: auto)"})
p:option("--prefetch", {type = "integer", default = 2, help = "batches prepared ahead"})
p:option("--ckpt-every", {type = "integer", default = 1000, help = "checkpoint period (steps)"})
p:option("--resume", {metavar = "CKPT|auto",
                      help = "continue from a checkpoint (auto: OUT/last.safetensors if present)"})
p:option("--val-data", {metavar = "DIR", help = "validation dataset (mIoU during training)"})
p:option("--val-split", {metavar = "S", help = "validation split folder"})
p:option("--val-labels", {default = "raw", choices = {"raw", "ade150", "voc20", "voc20b"},
                          help = "label encoding of the validation data"})
p:option("--val-every", {type = "integer", default = 2000, help = "validation period (steps)"})
p:option("--val-limit", {type = "integer", default = 100, help = "validation images"})
p:flag("--val-sliding", {help = "sliding-window inference for validation (slower)"})
p:option("--log-every", {type = "integer", default = 1, help = "progress line period"})
p:option("--platform", {metavar = "P", help = "OpenCL platform index or name substring"})
p:option("--device", {metavar = "D", help = "OpenCL device index or name substring"})

local function json_extra(t)
    local json_string = require("clhclip.segtrain").json_string
    local names = {}
    for i, n in ipairs(t.classes) do names[i] = json_string(n) end
    return string.format('{"clip": %s, "data": %s, "steps": %d, "classes": [%s]}',
                         json_string(t.clip), json_string(t.data), t.steps,
                         table.concat(names, ", "))
end

local function abspath(path)
    if path:sub(1, 1) == "/" then return path end
    local pwd = os.getenv("PWD") or "."
    return pwd .. "/" .. path
end

-- "hidden=64,window=6,decoder=32:16" -> head table
local function parse_head(spec)
    local head = {}
    if not spec then return head end
    for item in (spec .. ","):gmatch("([^,]*),") do
        if item ~= "" then
            local k, v = item:match("^%s*([%w_]+)%s*=%s*([%d:]+)%s*$")
            if not k then error("--head: bad item '" .. item .. "' (want key=N or key=N:M)", 0) end
            local a, b = v:match("^(%d+):(%d+)$")
            head[k] = a and {tonumber(a), tonumber(b)} or tonumber(v)
        end
    end
    return head
end

local function resolve_resume(o)
    if o.resume ~= "auto" then return o.resume end
    local last = o.out .. "/last.safetensors"
    return seg_model.is_file(last) and last or nil
end

local function build_model(clh, o, resume)
    if resume then
        local r = seg_model.load(clh, {model = resume, clip = o.clip, vocab = o.vocab,
                                       template = o.template})
        return r.model, r.clip, r.tokenizer, r.clip_path, r.extra
    end
    if not o.clip then error("--clip DIR is required (the CLIP weights to adapt)", 0) end
    local clip = clh.load_clip(o.clip)
    local options = seg_model.fresh_options(clip, o.crop)
    options.seed = o.seed
    options.head = parse_head(o.head)
    options.adapter.ortho = o.ortho
    options.adapter.recompute = o.recompute
    if o.block_size then options.adapter.block_size = o.block_size end
    local model = clh.segmodel(clip, options)
    seg_model.apply_templates(model, {head = model:options().head}, nil, o.template)
    local tok = o.vocab and clh.tokenizer(o.vocab) or clh.default_tokenizer()
    return model, clip, tok, o.clip, nil
end

local function main()
    local o = p:parse(seg_model.join_repeated(arg, "--template", ";"))
    local clh = paths.clhclip()
    local segtrain = require "clhclip.segtrain"
    clh.init {platform = o.platform, device = o.device}
    os.execute("mkdir -p '" .. o.out .. "'")
    local resume = o.resume and resolve_resume(o)
    if o.resume and o.resume ~= "auto" and not resume then error("--resume: no checkpoint", 0) end
    local model, _, tok, clip_path, extra = build_model(clh, o, resume)
    local classes
    if o.classes then
        classes = seg_model.read_classes(o.classes)
    elseif extra and extra.classes then
        classes = extra.classes
    else
        local f = o.data .. "/classes.txt"
        if not seg_model.is_file(f) then
            error("--classes is required (no " .. f .. ")", 0)
        end
        classes = seg_model.read_classes(f)
    end
    model:set_classes(classes, tok)
    local ds = clh.dataset(o.data, {split = o.split, labels = o.labels})
    local opt = segtrain.optimizer(clh, model, {lr = o.lr, clip_lr_mult = o.clip_lr_mult,
                                                weight_decay = o.weight_decay})
    local start = 0
    if resume then
        start = model:load(resume, {optimizer = opt}).step
        print(string.format("resumed from %s at step %d", resume, start))
    end
    local mopt = model:options()
    if o.crop ~= mopt.image_size then
        error(string.format("--crop %d differs from the model's input size %d", o.crop,
                            mopt.image_size), 0)
    end
    local loader = ds:loader {batch = o.batch, crop = o.crop, max_size = o.max_size,
                              seed = o.seed, threads = o.threads, prefetch = o.prefetch,
                              augment = not o.no_augment}
    loader:seek(start)
    local extra_json = json_extra {clip = abspath(clip_path), data = abspath(o.data),
                                   steps = o.steps, classes = classes}
    print(string.format("%d images, %d classes, %s; steps %d..%d, batch %d, crop %d",
                        ds:count(), #classes, tostring(model), start + 1, o.steps, o.batch,
                        o.crop))
    local val
    if o.val_data then
        val = clh.dataset(o.val_data, {split = o.val_split, labels = o.val_labels})
    end
    local metrics = o.out .. "/metrics.jsonl"
    segtrain.run {
        clh = clh, model = model, optimizer = opt, loader = loader, steps = o.steps,
        start = start, batch = o.batch, pool = o.pool, max_grad_norm = o.max_grad_norm,
        exclude_ignored = o.exclude_ignored, warmup = o.warmup, log_every = o.log_every,
        metrics = metrics, ckpt_every = o.ckpt_every, val_every = val and o.val_every,
        checkpoint = function(step)
            local path = string.format("%s/ckpt_%07d.safetensors", o.out, step)
            model:save(path, {optimizer = opt, step = step, extra = extra_json})
            model:save(o.out .. "/last.safetensors", {optimizer = opt, step = step,
                                                      extra = extra_json})
            print("checkpoint " .. path)
        end,
        validate = val and function(step)
            local r, n = segtrain.evaluate(clh, model, val, {limit = o.val_limit,
                                                             sliding = o.val_sliding,
                                                             progress = 10})
            print(string.format("validation at step %d: mIoU %.2f, pixel accuracy %.2f " ..
                                    "(%d images)", step, 100 * r.miou, 100 * r.pacc, n))
            return {val_miou = r.miou, val_pacc = r.pacc, val_images = n}
        end,
    }
    loader:free()
    print("done; metrics in " .. metrics)
end

argparse.main(main)

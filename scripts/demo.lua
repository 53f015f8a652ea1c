-- The default job of `make demo`: open-vocabulary segmentation trained end to end on this
-- machine, with nothing downloaded.
--   1. a procedural dataset: textured backgrounds ("grass", "sand", "water") with coloured
--      shapes ("red circle", "blue square", ...), train and held-out splits;
--   2. a tiny CLIP with random, frozen base weights (lua/clhclip/tinyclip.lua) and the
--      committed tiny BPE vocabulary;
--   3. H-CLIP adapters + a small CAT-Seg head trained on the train split (segtrain.lua);
--   4. held-out mIoU with the sliding-window inference, and overlays under --out.
-- With real CLIP weights use scripts/train.lua, segment.lua and eval.lua (README.md).
local paths = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib_path.lua")
local argparse = require "clhclip.argparse"

local p = argparse.new("scripts/demo.lua",
                       "Train a tiny open-vocabulary segmentation model on procedural data and " ..
                           "report its held-out mIoU.")
p:option("--steps", {type = "integer", default = 400, help = "training steps"})
p:option("--batch", {type = "integer", default = 4, help = "images per step"})
p:option("--size", {type = "integer", default = 96, help = "image and crop size (multiple of 8)"})
p:option("--train-images", {type = "integer", default = 400, help = "training images"})
p:option("--val-images", {type = "integer", default = 40, help = "held-out images"})
p:option("--lr", {type = "number", default = 2e-3, help = "head learning rate"})
p:option("--clip-lr-mult", {type = "number", default = 1.0,
                            help = "adapter learning rate as a multiple of --lr"})
p:option("--ortho", {default = "none", choices = {"text", "both", "none", "vision"},
                     help = "towers with orthogonal adapters (the released code: text; the " ..
                         "random text tower gives nearly parallel class embeddings, which an " ..
                         "orthogonal map cannot separate)"})
p:option("--max-grad-norm", {type = "number", default = 1.0,
                             help = "gradient-norm clipping (0: off; the released config uses " ..
                                 "0.01 with 80k steps)"})
p:option("--template", {default = "A photo of a {} in the scene",
                        help = "prompt template ({} = class name)"})
p:option("--overlays", {type = "integer", default = 4, help = "held-out overlays to write"})
p:option("--out", {metavar = "DIR", default = "out", help = "output folder"})
p:option("--seed", {type = "integer", default = 0, help = "seed of data, model and training"})
p:option("--threads", {type = "integer", default = 0, help = "data loader threads (0: auto)"})
p:flag("--augment", {help = "detectron2-style augmentation (photometric jitter shifts the " ..
                        "colours the shapes are told apart by; off by default here)"})
p:flag("--quick", {help = "short run for tests: 150 steps, 200 train and 16 held-out images"})
p:option("--platform", {metavar = "P", help = "OpenCL platform index or name substring"})
p:option("--device", {metavar = "D", help = "OpenCL device index or name substring"})

-- The head of the demo: the ViT-B layout, narrower (grid 12 at size 96, window 6 so that
-- the shifted-window path runs).
local HEAD = {hidden = 32, heads = 2, appearance_proj = 32, text_proj = 32,
              guidance_up = {32, 16}, decoder_guidance_proj = {8, 4}, decoder = {32, 16},
              gn_group_size = 8, window = 6, pad_len = 16, mlp_ratio = 2, n_layers = 2}

local function mkdir(path)
    assert(os.execute("mkdir -p '" .. path .. "'"), "cannot create " .. path)
end

-- The overlay of a prediction, drawn 3x larger than the 96-pixel image so that the
-- legend fits beside the shapes.
local function write_overlay(clh, overlay, path, img, pred, classes)
    local f = 3
    local w, h = img.width * f, img.height * f
    local src, ids = pred:totable(), {}
    for y = 0, h - 1 do
        for x = 0, w - 1 do
            ids[y * w + x + 1] = src[(y // f) * img.width + x // f + 1]
        end
    end
    local tmp = path .. ".labels.png"
    clh.write_label_png(tmp, ids, w, h)
    local big_label = clh.read_label(tmp, "raw")
    os.remove(tmp)
    local big = img:resize(w, h)
    local rendered = overlay.render(clh, big, big_label, classes)
    rendered:save_png(path)
end

local function section(s)
    print("\n" .. s)
end

local function main()
    local o = p:parse(arg)
    if o.quick then
        o.steps, o.train_images, o.val_images, o.overlays = 150, 200, 16, 2
    end
    if o.size % 8 ~= 0 or o.size < 48 then error("--size must be a multiple of 8, at least 48") end
    local clh = paths.clhclip()
    local segtrain = require "clhclip.segtrain"
    local tinyclip = require "clhclip.tinyclip"
    local ctx = clh.init {platform = o.platform, device = o.device}
    local dev = ctx:device()
    print(string.format("clhclip %s on %s (%s, %s)", clh.version, dev.name, dev.type, dev.version))
    local t_all = clh.now()

    section("1. Procedural data")
    local data = o.out .. "/demo-data"
    mkdir(data)
    local classes = clh.make_procedural_dataset {dir = data .. "/train", n = o.train_images,
                                                 size = o.size, seed = o.seed}
    clh.make_procedural_dataset {dir = data .. "/val", n = o.val_images, size = o.size,
                                 seed = o.seed + 7919}
    print(string.format("  %d train + %d held-out images of %dx%d in %s; %d classes: %s",
                        o.train_images, o.val_images, o.size, o.size, data, #classes,
                        table.concat(classes, ", ")))

    section("2. Tiny CLIP with random frozen weights")
    local clip_dir = o.out .. "/demo-clip"
    mkdir(clip_dir)
    local cfg = tinyclip.write(clh, clip_dir, {image_size = o.size}, o.seed + 1)
    local clip = clh.load_clip(clip_dir)
    print(string.format("  vision %d wide x %d blocks (patch %d), text %d wide x %d blocks",
                        cfg.vision.hidden, cfg.vision.layers, cfg.patch_size, cfg.text.hidden,
                        cfg.text.layers))
    local model = clh.segmodel(clip, {image_size = o.size, seed = o.seed + 2, head = HEAD,
                                      adapter = {block_size = 32, ortho = o.ortho}})
    local tok = clh.tokenizer(paths.repo .. "/tests/fixtures/tokenizer/tiny_merges.txt.gz")
    model:set_templates {o.template}
    model:set_classes(classes, tok)
    print("  " .. tostring(model))

    section(string.format("3. Training %d steps of %d images (AdamW, cosine schedule)", o.steps,
                          o.batch))
    clh.manual_seed(o.seed)
    local train = clh.dataset(data .. "/train")
    local loader = train:loader {batch = o.batch, crop = o.size, seed = o.seed,
                                 threads = o.threads, augment = o.augment}
    local opt = segtrain.optimizer(clh, model, {lr = o.lr, clip_lr_mult = o.clip_lr_mult})
    local every = math.max(1, o.steps // 20)
    local last_loss, secs = segtrain.run {
        clh = clh, model = model, optimizer = opt, loader = loader, steps = o.steps,
        batch = o.batch, max_grad_norm = o.max_grad_norm, log_every = every,
        metrics = o.out .. "/demo-metrics.jsonl",
    }
    loader:free()
    print(string.format("  %.1f s (%.2f s/step), final loss %.4f", secs, secs / o.steps,
                        last_loss))

    section("4. Held-out evaluation (sliding-window inference)")
    local val = clh.dataset(data .. "/val")
    local overlay = require "clhclip.overlay"
    local written = {}
    -- Chance level: the same metric for labels drawn uniformly at random.
    local guess = clh.confusion(#classes)
    local rng = 12345
    local r, n = segtrain.evaluate(clh, model, val, {
        on_image = function(i, img, pred, gt)
            local random = {}
            for j = 1, img.width * img.height do
                rng = (rng * 1103515245 + 12345) % 2147483648
                random[j] = rng % #classes
            end
            guess:add(random, gt)
            if i <= o.overlays then
                local path = string.format("%s/overlay_%02d.png", o.out, i)
                write_overlay(clh, overlay, path, img, pred, classes)
                written[#written + 1] = path
            end
        end,
    })
    local chance = guess:results().miou
    print(string.format("  held-out mIoU %.1f %%  (pixel accuracy %.1f %%, %d images; random " ..
                            "labels score %.1f %%)", 100 * r.miou, 100 * r.pacc, n, 100 * chance))
    for c, name in ipairs(classes) do
        local iou = r.iou[c]
        print(string.format("    %-16s IoU %s", name,
                            iou == iou and string.format("%5.1f %%", 100 * iou) or "  n/a"))
    end
    if #written > 0 then print("  overlays: " .. table.concat(written, ", ")) end
    print(string.format("\ndemo took %.1f s (kernel builds %.1f s). demo mIoU %.4f chance %.4f",
                        clh.now() - t_all, ctx:build_seconds(), r.miou, chance))
    print("Real data: scripts/train.lua, scripts/segment.lua, scripts/eval.lua (see README.md).")
end

argparse.main(main)

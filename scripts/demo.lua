-- The default job of `make demo`: shows the device, checks clhclip's CLIP against the
-- outputs HF transformers computed for the committed random-weight models, and runs the
-- zero-shot pipeline end to end on a real image. No weights are downloaded: with real CLIP
-- weights use scripts/zeroshot.lua (see README.md).
local paths = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib_path.lua")
local argparse = require "clhclip.argparse"

local parser = argparse.new("scripts/demo.lua",
                            "clhclip demo: device report, CLIP parity with HF, zero-shot run.")
parser:option("--platform", {metavar = "P", help = "OpenCL platform index or name substring"})
parser:option("--device", {metavar = "D", help = "OpenCL device index or name substring"})

local clh
local FIXTURES = {"clip_tiny_p8", "clip_legacy_sparse", "clip_tiny_openai"}

local function fixture(name)
    return paths.repo .. "/tests/fixtures/" .. name
end

local function max_rel_error(got, want)
    local err, mag = 0, 0
    for i = 1, #want do
        err = math.max(err, math.abs(got[i] - want[i]))
        mag = math.max(mag, math.abs(want[i]))
    end
    return err / mag
end

local function id_rows(inputs)
    local flat, shape = inputs:read("input_ids")
    local rows = {}
    for r = 1, shape[1] do
        rows[r] = table.move(flat, (r - 1) * shape[2] + 1, r * shape[2], 1, {})
    end
    return rows
end

-- Encode the fixture's inputs and return the worst error relative to HF's outputs.
local function parity(name)
    local dir = fixture(name)
    local model <close> = clh.load_clip(dir)
    local inputs <close> = clh.safetensors(dir .. "/inputs.safetensors")
    local want <close> = clh.safetensors(dir .. "/expected.safetensors")
    local t0 = clh.now()
    local px = inputs:tensor("pixel_values")
    local img = model:encode_image(px, {dense = true})
    local cat = model:encode_image(px, {pooled = false, dense = true, dense_last_layer = true})
    local txt = model:encode_text(id_rows(inputs))
    local worst = 0
    for _, pair in ipairs {{img.pooled, "image_pooled"}, {img.dense, "image_dense"},
                           {cat.dense, "image_dense_catseg"}, {txt, "text_features"}} do
        worst = math.max(worst, max_rel_error(pair[1]:totable(), (want:read(pair[2]))))
    end
    return worst, clh.now() - t0, model:config()
end

local function softmax(logits)
    local m, sum, p = -math.huge, 0, {}
    for _, v in ipairs(logits) do m = math.max(m, v) end
    for i, v in ipairs(logits) do
        p[i] = math.exp(v - m)
        sum = sum + p[i]
    end
    for i = 1, #p do p[i] = p[i] / sum end
    return p
end

-- Zero-shot over the whole pipeline (image file -> preprocess -> encoders -> softmax) with
-- the tiny random model and the tiny committed vocabulary: the numbers are meaningless,
-- the run shows every stage working on a real image.
local function zeroshot_pipeline()
    local image = paths.shared_data .. "/segmentation/ade20k_sceneparsing/images/ADE_val_00000001.jpg"
    local f = io.open(image, "rb")
    if not f then
        print("  (skipped: " .. image .. " is absent)")
        return
    end
    f:close()
    local model <close> = clh.load_clip(fixture("clip_tiny_p8"))
    local tok <close> = clh.tokenizer(fixture("tokenizer/tiny_merges.txt.gz"))
    local cfg = model:config()
    local labels = {"a photo of a house", "a photo of a tree", "a photo of the sky"}
    local px = clh.preprocess(image, cfg.image_size, "crop")
    local img = clh.l2_normalize(model:encode_image(px).pooled):totable()
    -- The tiny model pools at its own end-of-text id (cfg.eos_token_id), which the tiny
    -- vocabulary does not share: map the tokenizer's EOT onto it.
    local ids = tok:tokenize(labels, {context = cfg.max_positions})
    for _, row in ipairs(ids) do
        for j, id in ipairs(row) do
            if id == tok:eot() then row[j] = cfg.eos_token_id end
        end
    end
    local txt = clh.l2_normalize(model:encode_text(ids))
    local rows, p = txt:totable {nested = true}, {}
    for i, row in ipairs(rows) do
        local dot = 0
        for j = 1, #row do dot = dot + row[j] * img[j] end
        p[i] = math.exp(model:logit_scale()) * dot
    end
    p = softmax(p)
    for i, label in ipairs(labels) do print(string.format("  %6.3f  %s", p[i], label)) end
end

local function main()
    local opts = parser:parse(arg)
    clh = paths.clhclip()
    local ctx = clh.init {platform = opts.platform, device = opts.device}
    local dev = ctx:device()
    print(string.format("clhclip %s on %s (%s, %s, %s)", clh.version, dev.name, dev.type,
                        dev.version, dev.platform_name))
    print("\n1. CLIP against HF transformers (random-weight models, tests/fixtures):")
    for _, name in ipairs(FIXTURES) do
        local err, secs, cfg = parity(name)
        print(string.format("  %-20s vision %d/%d patch %d, text %d/%d: max error %.2e of " ..
                                "max |output| (limit 1e-5), %.2f s", name, cfg.vision.hidden,
                            cfg.vision.layers, cfg.patch_size, cfg.text.hidden, cfg.text.layers,
                            err, secs))
        if err > 1e-5 then error(name .. " does not match HF transformers", 0) end
    end
    print("\n2. Zero-shot pipeline on a real image (tiny random model: probabilities are noise):")
    zeroshot_pipeline()
    print(string.format("\nkernel builds took %.2f s; device memory in use %.1f MiB.",
                        ctx:build_seconds(), ctx:device_bytes() / 2 ^ 20))
    print("With real CLIP weights: lua5.4 scripts/zeroshot.lua --model DIR --image FILE " ..
              "--labels \"a cat,a dog\"")
end

local ok, err = pcall(main)
if not ok then
    io.stderr:write("error: " .. tostring(err) .. "\n")
    os.exit(1)
end

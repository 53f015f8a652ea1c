-- Zero-shot image classification with a CLIP model:
--   probs = softmax(exp(logit_scale) * cos(image_features, text_features(template(label))))
local paths = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib_path.lua")
local argparse = require "clhclip.argparse"

local parser = argparse.new("scripts/zeroshot.lua",
                            "Zero-shot classification of one image against text labels.")
parser:option("--model", {metavar = "DIR", required = true,
              help = "CLIP model: a directory (config.json + *.safetensors) or a .safetensors file"})
parser:option("--image", {metavar = "FILE", required = true, help = "image file (JPEG, PNG, ...)"})
parser:option("--labels", {metavar = "LIST", help = "comma-separated labels, e.g. \"a cat,a dog\""})
parser:option("--labels-file", {metavar = "FILE", help = "file with one label per line"})
parser:option("--template", {metavar = "TEXT", default = "a photo of {}",
              help = "prompt template; {} is replaced by the label"})
parser:option("--vocab", {metavar = "FILE",
              help = "tokenizer vocabulary (bpe .txt.gz, vocab.json or a directory); default: " ..
                  "the model directory's vocab.json + merges.txt, else $CLHCLIP_VOCAB or " ..
                  "../shared/data/bpe_simple_vocab_16e6.txt.gz"})
parser:option("--top", {type = "integer", default = 5, metavar = "K", help = "labels to print"})
parser:option("--mode", {default = "crop", choices = {"crop", "resize"},
              help = "preprocessing: centre crop or plain resize to the model's image size"})
parser:option("--platform", {metavar = "P", help = "OpenCL platform index or name substring"})
parser:option("--device", {metavar = "D", help = "OpenCL device index or name substring"})
parser:flag("--truncate", {help = "cut prompts longer than the context instead of failing"})
parser:flag("--profile", {help = "print per-kernel times"})

local function trim(s)
    return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

local function read_labels(opts)
    local labels = {}
    if opts.labels then
        for item in (opts.labels .. ","):gmatch("([^,]*),") do
            item = trim(item)
            if item ~= "" then labels[#labels + 1] = item end
        end
    end
    if opts.labels_file then
        local f, err = io.open(opts.labels_file, "r")
        if not f then error("cannot open --labels-file: " .. err, 0) end
        for line in f:lines() do
            line = trim(line)
            if line ~= "" then labels[#labels + 1] = line end
        end
        f:close()
    end
    if #labels == 0 then error("no labels: give --labels and/or --labels-file (see --help)", 0) end
    return labels
end

local function is_file(path)
    local f = io.open(path, "rb")
    if f then f:close() end
    return f ~= nil
end

local function model_dir(path)
    if path:match("%.safetensors$") then return path:match("^(.*)/[^/]*$") or "." end
    return path
end

-- --vocab if given, else the model's own vocab.json + merges.txt, else the default one.
local function load_tokenizer(clh, opts)
    if opts.vocab then return clh.tokenizer(opts.vocab), opts.vocab end
    local dir = model_dir(opts.model)
    if is_file(dir .. "/vocab.json") and is_file(dir .. "/merges.txt") then
        return clh.tokenizer(dir), dir .. "/vocab.json"
    end
    local path, err = clh.default_vocab()
    if not path then error(err, 0) end
    return clh.tokenizer(path), path
end

local function normalize(v)
    local s = 0
    for _, x in ipairs(v) do s = s + x * x end
    s = math.sqrt(s)
    if s == 0 then error("a feature vector is all zeros", 0) end
    local out = {}
    for i, x in ipairs(v) do out[i] = x / s end
    return out
end

local function row(flat, r, width)
    local out = {}
    for i = 1, width do out[i] = flat[(r - 1) * width + i] end
    return out
end

local function softmax(logits)
    local m = -math.huge
    for _, x in ipairs(logits) do m = math.max(m, x) end
    local sum, out = 0, {}
    for i, x in ipairs(logits) do
        out[i] = math.exp(x - m)
        sum = sum + out[i]
    end
    for i = 1, #out do out[i] = out[i] / sum end
    return out
end

argparse.main(function()
    local opts = parser:parse(arg)
    if opts.top < 1 then error("--top must be >= 1 (see --help)", 0) end
    if not is_file(opts.image) then error("cannot read --image '" .. opts.image .. "'", 0) end
    if not opts.template:find("{}", 1, true) then
        error("--template must contain {} (see --help)", 0)
    end
    local labels = read_labels(opts)
    local clh = paths.clhclip()

    local t0 = clh.now()
    local ctx = clh.init {platform = opts.platform, device = opts.device,
                          profile = opts.profile or nil}
    local model = clh.load_clip(opts.model, ctx)
    local cfg = model:config()
    local tok, vocab_path = load_tokenizer(clh, opts)
    if tok:vocab_size() > cfg.vocab_size then
        error(string.format("the tokenizer (%s) has %d tokens but the model's vocabulary has " ..
                                "%d; pass a matching --vocab", vocab_path, tok:vocab_size(),
                            cfg.vocab_size), 0)
    end
    local t_load = clh.now() - t0

    local t1 = clh.now()
    local pixels = clh.preprocess(opts.image, cfg.image_size, opts.mode, ctx)
    local image = model:encode_image(pixels).pooled
    local image_features = normalize(image:totable())
    local t_image = clh.now() - t1

    local prompts = {}
    for i, label in ipairs(labels) do
        prompts[i] = opts.template:gsub("{}", function() return label end)
    end
    local t2 = clh.now()
    local text = model:encode_text(prompts, {tokenizer = tok, truncate = opts.truncate})
    local flat = text:totable()
    local width = text:size(2)
    local t_text = clh.now() - t2

    local scale = math.exp(model:logit_scale())
    local logits = {}
    for i = 1, #labels do
        local tf = normalize(row(flat, i, width))
        local dot = 0
        for j = 1, width do dot = dot + tf[j] * image_features[j] end
        logits[i] = scale * dot
    end
    local probs = softmax(logits)
    local order = {}
    for i = 1, #labels do order[i] = i end
    table.sort(order, function(a, b) return probs[a] > probs[b] end)

    print(string.format("device: %s", ctx:device().name))
    print("prob    label")
    for k = 1, math.min(opts.top, #labels) do
        local i = order[k]
        print(string.format("%.4f  %s", probs[i], labels[i]))
    end
    print(string.format("time: load %.3f s, image %.1f ms, text %.1f ms (%d prompts), " ..
                            "kernel build %.3f s", t_load, t_image * 1e3, t_text * 1e3,
                        #labels, ctx:build_seconds()))
    if opts.profile then io.write(ctx:profile()) end
end)

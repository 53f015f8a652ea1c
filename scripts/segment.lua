-- Open-vocabulary segmentation of one image: a label PNG (class ids as 8-bit gray) and an
-- optional colour overlay with a legend of the classes present.
local paths = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib_path.lua")
local argparse = require "clhclip.argparse"
local seg_model = require "clhclip.seg_model"

local parser = argparse.new("scripts/segment.lua",
                            "Segment one image into the given classes (open vocabulary).")
seg_model.add_options(parser, {image_size = true})
parser:option("--image", {metavar = "FILE", required = true, help = "image file (JPEG, PNG, ...)"})
parser:option("--classes", {metavar = "LIST|FILE", required = true,
              help = "comma-separated class names (\"cat,grass,sky\"), or a file with one " ..
                  "class per line (a line \"building, edifice\" is one class; its first " ..
                  "synonym is used)"})
parser:option("--out", {metavar = "FILE",
              help = "label PNG to write (8-bit gray, value = 0-based class index; at most " ..
                  "255 classes)"})
parser:option("--overlay", {metavar = "FILE",
              help = "colour overlay PNG with a legend of the classes present"})
parser:option("--alpha", {type = "number", default = 0.5,
              help = "weight of the class colours in the overlay (0..1)"})
parser:option("--top", {type = "integer", default = 20, metavar = "K",
              help = "classes to list on stdout (largest first)"})
parser:flag("--profile", {help = "print per-kernel times (OpenCL events; host GEMM not included)"})
parser:flag("--no-sliding", {help = "one resized view instead of the sliding window " ..
            "(spec 5.7: 4 crops + the global view)"})
parser.epilog = "At least one of --out / --overlay is required. See README.md, " ..
                    "\"Segmentation scripts\", for the model formats."

local function check_args(opts)
    if not opts.out and not opts.overlay then
        error("give --out and/or --overlay (see --help)", 0)
    end
    if not seg_model.is_file(opts.image) then
        error("cannot read --image '" .. opts.image .. "'", 0)
    end
    if opts.alpha < 0 or opts.alpha > 1 then error("--alpha must be in [0, 1]", 0) end
    if opts.top < 0 then error("--top must be >= 0", 0) end
    if opts.image_size and opts.image_size < 16 then error("--image-size must be >= 16", 0) end
    local names = seg_model.read_classes(opts.classes)
    if opts.out and #names > 255 then
        error(string.format("%d classes do not fit an 8-bit label PNG (at most 255, 255 " ..
                                "being 'ignore'); leave out --out and write only --overlay",
                            #names), 0)
    end
    if opts.template then seg_model.parse_templates(opts.template) end
    return names
end

argparse.main(function()
    local opts = parser:parse(seg_model.join_repeated(arg, "--template", ";"))
    local names = check_args(opts)
    local clh = paths.clhclip()

    local t0 = clh.now()
    local ctx = clh.init {platform = opts.platform, device = opts.device,
                          profile = opts.profile or nil}
    local r = seg_model.load(clh, {model = opts.model, clip = opts.clip, vocab = opts.vocab,
                                   template = opts.template, image_size = opts.image_size,
                                   ctx = ctx})
    local model = r.model
    local image = clh.load_image(opts.image)
    local t_load = clh.now() - t0

    local t1 = clh.now()
    model:set_classes(names, r.tokenizer)
    local t_classes = clh.now() - t1

    local t2 = clh.now()
    local label = model:predict(image, {sliding = not opts.no_sliding})
    local t_predict = clh.now() - t2

    local t3 = clh.now()
    if opts.out then label:save_png(opts.out) end
    local overlay = require "clhclip.overlay"
    local present
    if opts.overlay then
        local img
        img, present = overlay.render(clh, image, label, names, {alpha = opts.alpha})
        img:save_png(opts.overlay)
    else
        present = overlay.present(label, #names)
    end
    local t_write = clh.now() - t3

    local o = r.options
    print(string.format("device: %s", ctx:device().name))
    print(string.format("model: %s (%s), input %d, %d classes, %s", opts.model, r.kind,
                        o.image_size, #names,
                        opts.no_sliding and "single view" or "sliding window"))
    print(string.format("image: %s %dx%d", opts.image, image.width, image.height))
    print("share   class")
    for i = 1, math.min(opts.top, #present) do
        local p = present[i]
        print(string.format("%5.1f%%  %d %s", p.share * 100, p.id, names[p.id + 1]))
    end
    if #present > opts.top then print(string.format("(%d more)", #present - opts.top)) end
    print(string.format("time: load %.3f s, classes %.3f s, predict %.3f s (text encoding " ..
                            "of %d classes included), write %.3f s, kernel build %.3f s, " ..
                            "total %.3f s", t_load, t_classes, t_predict, #names, t_write,
                        ctx:build_seconds(), clh.now() - t0))
    if opts.out then print("wrote " .. opts.out) end
    if opts.overlay then print("wrote " .. opts.overlay) end
    if opts.profile then io.write(ctx:profile()) end
end)

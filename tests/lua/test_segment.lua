-- scripts/segment.lua end to end on a tiny random CLIP (lua/clhclip/tinyclip.lua) with the
-- tiny test vocabulary, plus the overlay / font / model-resolution modules it uses.
local h = require "helpers"
local clh = h.clh
local T = h.suite()

local seg_model = require "clhclip.seg_model"
local overlay = require "clhclip.overlay"
local font = require "clhclip.font5x7"

local VOCAB = "tests/fixtures/tokenizer/tiny_merges.txt.gz"
local W, H = 64, 48

local function segment(args)
    return h.run_script(h.repo .. "/scripts/segment.lua", args, {CLHCLIP_BUILD = h.build})
end

local function tmpdir()
    local dir = h.tmpname("_seg")
    os.execute("mkdir -p " .. h.shell_quote(dir))
    return dir
end

-- One tiny CLIP folder and one test image per run (written on first use).
local cache = {}
local function tiny_clip()
    if not cache.clip then
        h.ctx()
        h.fixture("tokenizer/tiny_merges.txt.gz")
        local dir = tmpdir()
        require("clhclip.tinyclip").write(clh, dir, {}, 7)
        cache.clip = dir
    end
    return cache.clip
end

local function test_image()
    if not cache.image then
        local bytes = {}
        for y = 0, H - 1 do
            for x = 0, W - 1 do
                -- left: reddish, right: a blue/green gradient, so the map is not uniform
                if x < W // 2 then
                    bytes[#bytes + 1] = string.char(200, 40 + y, 30)
                else
                    bytes[#bytes + 1] = string.char(20, 4 * y, 100 + 4 * (x - W // 2))
                end
            end
        end
        cache.image = h.tmpname(".png")
        clh.image_from_rgb8(table.concat(bytes), W, H):save_png(cache.image)
    end
    return cache.image
end

-- A checkpoint of a fresh model (input 32) on the tiny CLIP; returns its path and the
-- in-process model for reference predictions.
local function tiny_checkpoint(extra)
    local clip = clh.load_clip(tiny_clip())
    local m = clh.segmodel(clip, {image_size = 32, seed = 3, adapter = {block_size = 32}})
    local path = h.tmpname(".safetensors")
    m:save(path, {extra = extra or string.format('{"clip": "%s", "classes": []}', tiny_clip())})
    return path, m
end

local function check_outputs(mask, over, n_classes)
    local lab = clh.read_label(mask)
    h.eq(lab.width, W, "mask width")
    h.eq(lab.height, H, "mask height")
    for id in pairs(lab:counts()) do
        h.truthy(id >= 0 and id < n_classes, "mask id " .. id .. " < " .. n_classes)
    end
    if over then
        local img = clh.load_image(over)
        h.eq(img.width, W, "overlay width")
        h.eq(img.height, H, "overlay height")
        local r, g, b = img:pixel(W - 1, H - 1)
        h.truthy(r and g and b, "overlay is RGB")
    end
    return lab
end

local function same_labels(a, b, what)
    local x, y = a:totable(), b:totable()
    h.eq(#x, #y, what .. " size")
    local diff = 0
    for i = 1, #x do
        if x[i] ~= y[i] then diff = diff + 1 end
    end
    h.eq(diff, 0, what .. ": pixels differing from the in-process prediction")
end

function T.untrained_head_on_a_plain_clip()
    local dir = tmpdir()
    local mask, over = dir .. "/mask.png", dir .. "/overlay.png"
    local out, rc = segment({"--model", tiny_clip(), "--image", test_image(), "--classes",
                             "cat, grass ,sky", "--vocab", VOCAB, "--image-size", "32", "--out",
                             mask, "--overlay", over})
    h.eq(rc, 0, "exit code; output:\n" .. out)
    h.truthy(out:find("warning: ", 1, true) and out:find("UNTRAINED", 1, true),
             "warns that the head is untrained: " .. out)
    h.truthy(out:find("time: load", 1, true) and out:find("predict", 1, true), "timing line")
    local lab = check_outputs(mask, over, 3)
    -- every class present is listed with its share, and the shares add up to 100 %
    local sum = 0
    for share, id, name in out:gmatch("\n%s*([%d.]+)%%%s+(%d+) (%S+)") do
        sum = sum + tonumber(share)
        h.eq(({cat = 0, grass = 1, sky = 2})[name], tonumber(id), "listed id of " .. name)
        h.truthy((lab:counts()[tonumber(id)] or 0) > 0, name .. " is present in the mask")
    end
    h.near(sum, 100, 0.3, "listed shares")
end

function T.checkpoint_matches_in_process_prediction()
    local ckpt, m = tiny_checkpoint()
    local dir = tmpdir()
    local classes = dir .. "/classes.txt"
    local f = assert(io.open(classes, "w"))
    f:write("cat\n\ngrass, lawn\nsky  \n") -- a synonym line stays one class; blanks skipped
    f:close()
    local mask = dir .. "/mask.png"
    local out, rc = segment({"--model", ckpt, "--image", test_image(), "--classes", classes,
                             "--vocab", VOCAB, "--out", mask, "--no-sliding"})
    h.eq(rc, 0, "exit code; output:\n" .. out)
    h.truthy(not out:find("UNTRAINED", 1, true), "no untrained-head warning for a checkpoint")
    h.truthy(out:find("(checkpoint)", 1, true), "model kind shown: " .. out)
    local lab = check_outputs(mask, nil, 3)
    m:set_classes({"cat", "grass, lawn", "sky"}, clh.tokenizer(VOCAB))
    local ref = m:predict(clh.load_image(test_image()), {sliding = false})
    same_labels(lab, ref, "checkpoint prediction")
end

function T.folded_export_matches_in_process_prediction()
    local _, m = tiny_checkpoint()
    local dir = tmpdir()
    m:export(dir .. "/export")
    local mask, over = dir .. "/mask.png", dir .. "/overlay.png"
    local out, rc = segment({"--model", dir .. "/export", "--image", test_image(), "--classes",
                             "cat,sky", "--vocab", VOCAB, "--out", mask, "--overlay", over})
    h.eq(rc, 0, "exit code; output:\n" .. out)
    h.truthy(out:find("(export)", 1, true), "model kind shown: " .. out)
    local lab = check_outputs(mask, over, 2)
    m:set_classes({"cat", "sky"}, clh.tokenizer(VOCAB))
    same_labels(lab, m:predict(clh.load_image(test_image())), "export prediction")
end

function T.template_override_is_applied_and_checked()
    local ckpt, m = tiny_checkpoint()
    local dir = tmpdir()
    local base = {"--model", ckpt, "--image", test_image(), "--classes", "cat,grass,sky",
                  "--vocab", VOCAB, "--no-sliding"}
    local function with(extra)
        local a = {}
        for _, v in ipairs(base) do a[#a + 1] = v end
        for _, v in ipairs(extra) do a[#a + 1] = v end
        return a
    end
    local out, rc = segment(with {"--out", dir .. "/a.png", "--template", "a {} here"})
    h.eq(rc, 0, "exit code; output:\n" .. out)
    m:set_templates {"a {} here"}
    m:set_classes({"cat", "grass", "sky"}, clh.tokenizer(VOCAB))
    same_labels(clh.read_label(dir .. "/a.png"),
                m:predict(clh.load_image(test_image()), {sliding = false}), "with --template")
    out, rc = segment(with {"--out", dir .. "/b.png", "--template", "x {}", "--template", "y {}"})
    h.eq(rc, 1, "two templates for a one-prompt head")
    h.truthy(out:find("2 template(s) given but the head takes 1", 1, true), "message: " .. out)
    out, rc = segment(with {"--out", dir .. "/c.png", "--template", "no placeholder"})
    h.eq(rc, 1, "template without {}")
    h.truthy(out:find("has no {}", 1, true), "message: " .. out)
end

function T.segment_help_and_bad_arguments()
    local out, rc = segment({"--help"})
    h.eq(rc, 0, "--help exit code")
    local src = assert(io.open(h.repo .. "/scripts/segment.lua")):read("a")
    for flag in src:gmatch('parser:%a+%("(%-%-[%w%-]+)"') do
        h.truthy(out:find(flag, 1, true), "--help lists " .. flag)
    end
    for _, flag in ipairs {"--model", "--clip", "--vocab", "--template", "--image-size",
                           "--platform", "--device"} do
        h.truthy(out:find(flag, 1, true), "--help lists " .. flag)
    end
    local img = test_image()
    local function fails(args, needle)
        local o, code = segment(args)
        h.eq(code, 1, "exit code for " .. table.concat(args, " ") .. "; output:\n" .. o)
        h.truthy(o:find("error: ", 1, true) and o:find(needle, 1, true),
                 "message containing '" .. needle .. "': " .. o)
    end
    fails({"--image", img, "--classes", "a", "--out", "x.png"}, "--model is required")
    fails({"--model", "m", "--classes", "a", "--out", "x.png"}, "--image is required")
    fails({"--model", "m", "--image", img, "--classes", "a"}, "give --out and/or --overlay")
    fails({"--model", "m", "--image", "/no/such.png", "--classes", "a", "--out", "x.png"},
          "cannot read --image")
    fails({"--model", "m", "--image", img, "--classes", " , ", "--out", "x.png"},
          "neither a readable file nor a comma-separated list")
    local many = {}
    for i = 1, 300 do many[i] = "c" .. i end
    fails({"--model", "m", "--image", img, "--classes", table.concat(many, ","), "--out", "x.png"},
          "300 classes do not fit an 8-bit label PNG")
    fails({"--model", "/no/such/model", "--image", img, "--classes", "a", "--out", "x.png"},
          "does not exist")
end

function T.model_resolution_errors()
    local img = test_image()
    local ckpt = tiny_checkpoint('{"classes": []}')
    local out, rc = segment({"--model", ckpt, "--image", img, "--classes", "a,b", "--vocab",
                             VOCAB, "--out", h.tmpname(".png")})
    h.eq(rc, 1, "exit code; output:\n" .. out)
    h.truthy(out:find("does not record its CLIP", 1, true) and out:find("--clip", 1, true),
             "message: " .. out)
    -- --clip supplies it
    out, rc = segment({"--model", ckpt, "--clip", tiny_clip(), "--image", img, "--classes", "a,b",
                       "--vocab", VOCAB, "--out", h.tmpname(".png"), "--no-sliding"})
    h.eq(rc, 0, "exit code with --clip; output:\n" .. out)
    out, rc = segment({"--model", ckpt, "--clip", tiny_clip(), "--image", img, "--classes", "a",
                       "--vocab", VOCAB, "--out", h.tmpname(".png"), "--image-size", "64"})
    h.eq(rc, 1, "--image-size with a checkpoint")
    h.truthy(out:find("--image-size only applies", 1, true), "message: " .. out)
    -- the real vocabulary is larger than the tiny model's
    if clh.safe.default_vocab() then
        out, rc = segment({"--model", tiny_clip(), "--image", img, "--classes", "a", "--out",
                           h.tmpname(".png"), "--image-size", "32"})
        h.eq(rc, 1, "default vocabulary on the tiny model")
        h.truthy(out:find("pass a matching --vocab", 1, true), "message: " .. out)
    end
end

function T.overlay_blends_palette_and_draws_legend()
    local w, hgt = 120, 80
    local bytes = string.rep(string.char(100, 100, 100), w * hgt)
    local image = clh.image_from_rgb8(bytes, w, hgt)
    local ids = {}
    for y = 0, hgt - 1 do
        for x = 0, w - 1 do ids[y * w + x + 1] = x < 40 and 1 or 2 end
    end
    local path = h.tmpname(".png")
    clh.write_label_png(path, ids, w, hgt)
    local label = clh.read_label(path)
    local img, present = overlay.render(clh, image, label, {"unused", "left", "right, other"},
                                        {alpha = 0.5})
    h.eq(img.width, w, "overlay width")
    h.eq(#present, 2, "two classes present")
    h.eq(present[1].id, 2, "the larger class first")
    h.near(present[1].share, 80 / 120, 1e-9, "share of the larger class")
    -- far from the legend, pixels are the 50/50 blend of gray and the class colour
    for _, probe in ipairs {{x = 20, y = 70, id = 1}, {x = 100, y = 70, id = 2}} do
        local c = overlay.color(probe.id)
        local r, g, b = img:pixel(probe.x, probe.y)
        h.near(r, math.floor(50 + c[1] / 2 + 0.5), 1, "red at " .. probe.x)
        h.near(g, math.floor(50 + c[2] / 2 + 0.5), 1, "green at " .. probe.x)
        h.near(b, math.floor(50 + c[3] / 2 + 0.5), 1, "blue at " .. probe.x)
    end
    -- the legend (top left) holds white text pixels and both swatch colours
    local white, seen = 0, {}
    for y = 0, 30 do
        for x = 0, w - 1 do
            local r, g, b = img:pixel(x, y)
            if r == 255 and g == 255 and b == 255 then white = white + 1 end
            for id = 1, 2 do
                local c = overlay.color(id)
                if r == c[1] and g == c[2] and b == c[3] then seen[id] = true end
            end
        end
    end
    h.truthy(white > 20, "legend text drawn (" .. white .. " white pixels)")
    h.truthy(seen[1] and seen[2], "both swatches drawn")
    -- a label map of another size is refused
    h.raises("the label map is", overlay.render, clh, clh.image_from_rgb8(bytes:sub(1, 30), 5, 2),
             label, {"a"})
end

function T.palette_and_font()
    local seen = {}
    for k = 0, 149 do
        local c = overlay.color(k)
        local key = table.concat(c, ",")
        h.truthy(not seen[key], "colour of class " .. k .. " is distinct")
        seen[key] = true
        for i = 1, 3 do h.truthy(c[i] >= 0 and c[i] <= 255, "colour range") end
    end
    local glyphs = 0
    for code = 32, 126 do
        local g = font.glyph(string.char(code))
        h.eq(#g, font.height, "glyph height of " .. string.char(code))
        if code ~= 32 then
            local ink = 0
            for _, row in ipairs(g) do
                for _, on in ipairs(row) do ink = ink + (on and 1 or 0) end
            end
            h.truthy(ink > 0, "glyph of '" .. string.char(code) .. "' has ink")
        end
        glyphs = glyphs + 1
    end
    h.eq(glyphs, 95, "printable ASCII covered")
    h.eq(font.ascii("caf\xc3\xa9 \xe2\x82\xac\t!"), "caf? ??!", "one '?' per non-ASCII code point (and tab)")
    h.eq(font.text_width("ab", 2), 22, "text width")
end

function T.seg_model_helpers()
    h.same(seg_model.parse_templates("a {} x; b {}"), {"a {} x", "b {}"}, "';'-separated templates")
    h.raises("has no {}", seg_model.parse_templates, "plain")
    h.same(seg_model.join_repeated({"--a", "1", "--template", "x {}", "--b", "--template=y {}"},
                                   "--template", ";"),
           {"--a", "1", "--template", "x {};y {}", "--b"}, "repeated --template joined")
    h.same(seg_model.read_classes(" cat ,grass,, sky"), {"cat", "grass", "sky"}, "comma list")
    h.eq(seg_model.display_name("building, edifice"), "building", "first synonym")
    local v = seg_model.json_decode('{"clip": "/a/b", "classes": ["x", "y\\"z"], "n": 2.5, ' ..
                                        '"ok": true, "none": null, "u": "\\u00e9"}')
    h.eq(v.clip, "/a/b", "JSON string")
    h.same(v.classes, {"x", 'y"z'}, "JSON array")
    h.eq(v.n, 2.5, "JSON number")
    h.eq(v.ok, true, "JSON true")
    h.eq(v.u, "\xc3\xa9", "JSON \\u escape")
    h.raises("bad JSON", seg_model.json_decode, '{"a": }')
    h.raises("bad JSON", seg_model.json_decode, '[1, 2] x')
end

return T

-- Images through the binding: loading, pixels, resize/crop, PNG round trip and CLIP
-- preprocessing, against the PIL/HF references in tests/fixtures/image.
local h = require "helpers"
local clh = h.clh
local T = h.suite()

local function expected_file()
    return clh.safetensors(h.fixture("image/expected.safetensors"))
end

-- All pixels of img as a flat array (row-major, RGB).
local function pixels(img)
    local out = {}
    for y = 0, img.height - 1 do
        for x = 0, img.width - 1 do
            local r, g, b = img:pixel(x, y)
            out[#out + 1] = r
            out[#out + 1] = g
            out[#out + 1] = b
        end
    end
    return out
end

function T.load_png_modes_match_pil()
    local exp <close> = expected_file()
    for _, name in ipairs {"synth_37x23.png", "gray_9x7.png", "rgba_9x7.png", "palette_9x7.png"} do
        local img <close> = clh.load_image(h.fixture("image/" .. name))
        local want, shape = exp:read("load/" .. name)
        h.eq(img.height, shape[1], name .. " height")
        h.eq(img.width, shape[2], name .. " width")
        h.same(pixels(img), want, name .. " pixels")
        h.eq(tostring(img), string.format("clhclip.Image %dx%d", shape[2], shape[1]), "tostring")
    end
end

function T.resize_matches_pil_bicubic()
    local exp <close> = expected_file()
    local img <close> = clh.load_image(h.fixture("image/synth_37x23.png"))
    for _, wh in ipairs {{20, 11}, {64, 40}, {12, 23}} do
        local key = string.format("resize/synth_37x23.png/%dx%d", wh[1], wh[2])
        local r <close> = img:resize(wh[1], wh[2])
        h.eq(r.width, wh[1], key .. " width")
        h.eq(r.height, wh[2], key .. " height")
        local err = h.max_abs_err(pixels(r), (exp:read(key)))
        h.truthy(err <= 1, key .. ": max pixel error " .. err .. " > 1")
    end
end

function T.crop_and_pixel_coordinates()
    -- 3x2 image whose red channel encodes x and green encodes y
    local bytes = {}
    for y = 0, 1 do
        for x = 0, 2 do
            bytes[#bytes + 1] = string.char(10 * x, 10 * y, 7)
        end
    end
    local img = clh.image_from_rgb8(table.concat(bytes), 3, 2)
    h.eq(img.width, 3, "width")
    h.eq(img.height, 2, "height")
    local r, g, b = img:pixel(2, 1)
    h.same({r, g, b}, {20, 10, 7}, "pixel(2, 1)")
    local c = img:crop(1, 1, 2, 1)
    h.eq(c.width, 2, "crop width")
    h.eq(c.height, 1, "crop height")
    h.same(pixels(c), {10, 10, 7, 20, 10, 7}, "cropped pixels")
    h.eq(img.nonexistent, nil, "unknown fields are nil")
end

function T.png_round_trip()
    local bytes = {}
    local seed = 12345
    for i = 1, 5 * 4 * 3 do
        seed = (seed * 1103515245 + 12345) % 2147483648
        bytes[i] = string.char(seed % 256)
    end
    local img = clh.image_from_rgb8(table.concat(bytes), 5, 4)
    local path = h.tmpname(".png")
    img:save_png(path)
    local back = clh.load_image(path)
    os.remove(path)
    h.same(pixels(back), pixels(img), "pixels after PNG round trip")
end

function T.preprocess_matches_hf_processor()
    h.ctx()
    local exp <close> = expected_file()
    local path = h.fixture("image/synth_37x23.png")
    local img <close> = clh.load_image(path)
    for _, case in ipairs {{"crop", "crop"}, {"resize", "resize_only"}} do
        local key = string.format("%s/synth_37x23.png/16", case[2])
        local t = clh.preprocess(img, 16, case[1])
        h.same(t:shape(), {1, 3, 16, 16}, key .. " shape")
        local err = h.max_abs_err(t:totable(), (exp:read(key)))
        -- one 8-bit level is 1/(0.26*255) = 0.015 after normalisation
        h.truthy(err <= 0.02, key .. ": max error " .. err)
        h.same(img:preprocess(16, case[1]):totable(), t:totable(), key .. " via method")
    end
    local batch = clh.preprocess({path, img}, 16)
    h.same(batch:shape(), {2, 3, 16, 16}, "batch shape")
    local flat = batch:totable()
    local first, second = {}, {}
    for i = 1, 3 * 16 * 16 do
        first[i] = flat[i]
        second[i] = flat[3 * 16 * 16 + i]
    end
    h.same(first, second, "path and image give the same pixels")
end

function T.preprocess_normalises_with_openai_mean_std()
    h.ctx()
    local img = clh.image_from_rgb8(string.rep("\100\150\200", 6 * 4), 6, 4)
    local v = clh.preprocess(img, 4, "resize"):totable()
    local rgb = {100, 150, 200}
    for c = 1, 3 do
        local want = (rgb[c] - clh.CLIP_MEAN[c]) / clh.CLIP_STD[c]
        h.near(v[(c - 1) * 16 + 1], want, 1e-5, "channel " .. c)
        h.near(v[c * 16], want, 1e-5, "channel " .. c .. " last")
    end
    h.near(clh.CLIP_MEAN[1], 0.48145466 * 255, 1e-3, "mean constant")
end

function T.real_images_from_shared_data()
    local exp <close> = expected_file()
    local rel = "segmentation/ade20k_sceneparsing/images/ADE_val_00000001.jpg"
    local path = h.shared(rel)
    local img <close> = clh.load_image(path)
    local size = exp:read("real_size/" .. rel)
    h.eq(img.width, size[1], "width")
    h.eq(img.height, size[2], "height")
    h.ctx()
    local t = clh.preprocess(path, 32)
    h.same(t:shape(), {1, 3, 32, 32}, "preprocessed shape")
end

return T

-- Colour overlays of label maps: the image blended with a per-class palette, plus a legend
-- (colour swatch, class name, pixel share) of the classes present, largest first, drawn with
-- the embedded 5x7 font (clhclip.font5x7).
--
--   local overlay = require "clhclip.overlay"
--   local img, present = overlay.render(clh, image, label, names, {alpha = 0.5})
--   img:save_png("overlay.png")
local font = require "clhclip.font5x7"

local M = {}

local function hsv(h, s, v)
    local i = math.floor(h * 6) % 6
    local f = h * 6 - math.floor(h * 6)
    local p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    local rgb = ({{v, t, p}, {q, v, p}, {p, v, t}, {p, q, v}, {t, p, v}, {v, p, q}})[i + 1]
    return {math.floor(rgb[1] * 255 + 0.5), math.floor(rgb[2] * 255 + 0.5),
            math.floor(rgb[3] * 255 + 0.5)}
end

-- Colour {r, g, b} of class id k (0-based). Golden-ratio hue steps keep neighbouring ids
-- apart; saturation and value cycle so that ids with close hues still differ.
function M.color(k)
    local h = (k * 0.6180339887498949 + 0.05) % 1
    local s = ({0.85, 0.6, 0.95})[k % 3 + 1]
    local v = ({0.95, 0.75})[(k // 3) % 2 + 1]
    return hsv(h, s, v)
end

-- Classes present in a label map: array of {id=, pixels=, share=} sorted by area (largest
-- first, then by id). Ignored pixels (255 when there are fewer classes) are left out.
function M.present(label, n_classes)
    local total = label.width * label.height
    local out = {}
    for id, pixels in pairs(label:counts()) do
        if id >= 0 and id < n_classes then
            out[#out + 1] = {id = id, pixels = pixels, share = pixels / total}
        end
    end
    table.sort(out, function(a, b)
        if a.pixels ~= b.pixels then return a.pixels > b.pixels end
        return a.id < b.id
    end)
    return out
end

-- Canvas {width, height, data} holding the image blended with the class colours.
local function blended_canvas(image, label, n_classes, alpha)
    local w, h = image.width, image.height
    local ids = label:totable()
    local data = {}
    local colors = {}
    local keep = 1 - alpha
    for y = 0, h - 1 do
        local row = y * w
        for x = 0, w - 1 do
            local r, g, b = image:pixel(x, y)
            local id = ids[row + x + 1]
            local o = (row + x) * 3
            if id >= 0 and id < n_classes then
                local c = colors[id]
                if not c then
                    c = M.color(id)
                    colors[id] = c
                end
                r = r * keep + c[1] * alpha
                g = g * keep + c[2] * alpha
                b = b * keep + c[3] * alpha
            end
            data[o + 1], data[o + 2], data[o + 3] = r, g, b
        end
    end
    return {width = w, height = h, data = data}
end

local function legend_text(name, share)
    return string.format("%s %.1f%%", name, share * 100)
end

-- Cut text to at most n characters (after the font's ASCII mapping), marking the cut.
local function fit(text, n)
    text = font.ascii(text)
    if #text <= n then return text end
    if n <= 2 then return text:sub(1, math.max(n, 0)) end
    return text:sub(1, n - 2) .. ".."
end

-- Draw the legend box in the top-left corner. entries: {color=, text=}.
local function draw_legend(canvas, entries, scale)
    local W, H = canvas.width, canvas.height
    local margin, pad = 2 * scale, 3 * scale
    local swatch, gap = font.cap * scale, 3 * scale
    local row_h = (font.height + 2) * scale
    local max_rows = (H - 2 * margin - 2 * pad + 2 * scale) // row_h
    if max_rows < 1 then return 0 end
    local rows = {}
    if #entries <= max_rows then
        rows = entries
    else
        for i = 1, max_rows - 1 do rows[i] = entries[i] end
        rows[#rows + 1] = {text = string.format("+%d more", #entries - (max_rows - 1))}
    end
    local max_chars = (W - 2 * margin - 2 * pad - swatch - gap + scale) // (font.advance * scale)
    if max_chars < 1 then return 0 end
    local text_w = 0
    for _, e in ipairs(rows) do
        e.shown = fit(e.text, max_chars)
        text_w = math.max(text_w, font.text_width(e.shown, scale))
    end
    local box_w = 2 * pad + swatch + gap + text_w
    local box_h = 2 * pad + #rows * row_h - 2 * scale
    font.fill(canvas, margin, margin, box_w, box_h, {0, 0, 0}, 0.65)
    local y = margin + pad
    for _, e in ipairs(rows) do
        local x = margin + pad
        if e.color then
            font.fill(canvas, x, y, swatch, swatch, {255, 255, 255})
            font.fill(canvas, x + scale, y + scale, swatch - 2 * scale, swatch - 2 * scale, e.color)
        end
        font.draw(canvas, x + swatch + gap, y, e.shown, {255, 255, 255}, scale)
        y = y + row_h
    end
    return #rows
end

-- Pack a canvas into a clhclip Image.
local function to_image(clh, canvas)
    local d, parts, chunk = canvas.data, {}, 3 * 1024
    local floor = math.floor
    for i = 1, #d, chunk do
        local j = math.min(#d, i + chunk - 1)
        local bytes = {}
        for k = i, j do
            local v = floor(d[k] + 0.5)
            bytes[k - i + 1] = v < 0 and 0 or (v > 255 and 255 or v)
        end
        parts[#parts + 1] = string.char(table.unpack(bytes))
    end
    return clh.image_from_rgb8(table.concat(parts), canvas.width, canvas.height)
end

-- The overlay Image (same size as `image`) and the present-class list (M.present).
-- names[k+1] is the name of class k (shown up to its first ", ").
-- opts: alpha (colour weight, default 0.5), legend (default true), scale (font scale;
-- default 1, 2 from 400 px on the shorter side, 3 from 1200 px).
function M.render(clh, image, label, names, opts)
    opts = opts or {}
    if label.width ~= image.width or label.height ~= image.height then
        error(string.format("overlay: the label map is %dx%d but the image is %dx%d",
                            label.width, label.height, image.width, image.height), 0)
    end
    local n = #names
    local canvas = blended_canvas(image, label, n, opts.alpha or 0.5)
    local present = M.present(label, n)
    if opts.legend ~= false then
        local short = math.min(image.width, image.height)
        local scale = opts.scale or (short >= 1200 and 3) or (short >= 400 and 2) or 1
        local entries = {}
        for i, p in ipairs(present) do
            local name = names[p.id + 1]:match("^(.-),%s") or names[p.id + 1]
            entries[i] = {color = M.color(p.id), text = legend_text(name, p.share)}
        end
        draw_legend(canvas, entries, scale)
    end
    return to_image(clh, canvas), present
end

return M

-- Datasets, label maps, the batch loader, metrics and the procedural dataset through the
-- binding (clhclip/data.h). Real annotations from ../shared/data/segmentation.
local h = require "helpers"
local clh = h.clh
local T = h.suite()

local function tmpdir()
    local d = h.tmpname("_data")
    assert(os.execute("mkdir -p " .. h.shell_quote(d)))
    return d
end

local function rmdir(d)
    os.execute("rm -rf " .. h.shell_quote(d))
end

local function index_of(list, v)
    for i, x in ipairs(list) do if x == v then return i end end
end

function T.ade_sample_classes_and_image()
    local root = h.shared("segmentation/ade20k_sceneparsing")
    local ds <close> = clh.dataset(root, {labels = "ade150"})
    h.eq(ds:count(), 3, "count")
    h.eq(ds:name(1), "ADE_val_00000001.jpg", "first name")
    local img, lab = ds:read(1)
    h.eq(tostring(img), "clhclip.Image 683x512", "image")
    h.eq(lab.width, 683, "label width")
    h.eq(lab.height, 512, "label height")
    local names = {}
    for line in io.lines(h.shared("classnames/ade20k_150.txt")) do names[#names + 1] = line end
    local counts = lab:counts()
    local want = {}
    for _, n in ipairs {"sky", "building", "grass", "wall", "plant", "tree", "road"} do
        want[index_of(names, n) - 1] = true
    end
    want[255] = true
    for id in pairs(counts) do h.truthy(want[id], "unexpected class " .. id) end
    for id in pairs(want) do h.truthy(counts[id], "missing class " .. id) end
    h.raises("out of range", ds.read, ds, 4)
end

function T.voc_modes()
    local root = h.shared("segmentation/voc2012_vainf")
    local ds20 <close> = clh.dataset(root, {labels = "voc20"})
    local ds20b <close> = clh.dataset(root, {labels = "voc20b"})
    h.eq(ds20:name(2), "1_image.png", "sorted names")
    local _, a = ds20:read(2)
    local _, b = ds20b:read(2)
    local ca, cb = a:counts(), b:counts()
    h.truthy(ca[0] and ca[255] and not ca[20], "voc20: aeroplane and ignore")
    h.truthy(cb[0] and cb[20] and cb[255], "voc20b: aeroplane, background, ignore")
    h.eq(cb[20] + cb[255], ca[255], "background is ignored in voc20")
    h.raises("unknown label mode", clh.dataset, root, {labels = "voc21"})
end

function T.label_png_round_trip_and_errors()
    local d = tmpdir()
    local ids = {}
    for i = 1, 12 do ids[i] = (i * 19) % 256 end
    clh.write_label_png(d .. "/l.png", ids, 4, 3)
    local lab <close> = clh.read_label(d .. "/l.png", "raw")
    h.same(lab:totable(), ids, "round trip")
    h.eq(lab:get(3, 2), ids[12], "get(x, y)")
    h.eq(#lab:bytes(), 12 * 4, "int32 bytes")
    h.raises("needs 12 ids", clh.write_label_png, d .. "/x.png", {1, 2}, 4, 3)
    h.raises("does not fit 8 bits", clh.write_label_png, d .. "/x.png", {300}, 1, 1)
    h.raises("cannot open label", clh.read_label, d .. "/missing.png")
    h.raises("does not exist", clh.dataset, d .. "/nope")
    rmdir(d)
end

function T.procedural_loader_deterministic_and_seek()
    local d = tmpdir()
    local classes = clh.make_procedural_dataset {dir = d, n = 8, size = 40, seed = 3}
    h.eq(#classes, #clh.procedural_classes(), "class list")
    h.eq(classes[1], "grass", "first class")
    local f = assert(io.open(d .. "/classes.txt"))
    h.eq(f:read("l"), "grass", "classes.txt")
    f:close()
    local ds <close> = clh.dataset(d)
    h.eq(ds:count(), 8, "count")
    local opts = {batch = 3, crop = 32, seed = 5, threads = 1, augment = true}
    local l1 <close> = ds:loader(opts)
    opts.threads = 3
    local l3 <close> = ds:loader(opts)
    h.eq(l1:steps_per_epoch(), 2, "drop_last default")
    local ref = {}
    for s = 0, 4 do
        local a, b = l1:next(), l3:next()
        h.eq(a.step, s, "step")
        h.eq(a.size, 3, "size")
        h.eq(a.crop, 32, "crop")
        h.eq(#a:pixels(), 3 * 3 * 32 * 32 * 4, "pixel bytes")
        h.truthy(a:pixels() == b:pixels() and a:labels() == b:labels(), "threads agree")
        h.same(a:indices(), b:indices(), "indices")
        ref[s] = a:pixels()
        local lab = a:label(1)
        h.eq(lab.width, 32, "batch label")
        h.truthy(lab:get(0, 0) >= 0 and lab:get(0, 0) < #classes, "ids in range")
        h.truthy(math.abs(a:pixel(1, 0, 0, 0)) < 5, "normalised pixel")
        a:free()
        b:free()
    end
    l1:seek(3)
    h.truthy(l1:next():pixels() == ref[3], "seek")
    h.raises("freed", function() local b = l1:next(); b:free(); return b:pixels() end)
    l3:free()
    h.raises("loader was freed", l3.next, l3)
    rmdir(d)
end

function T.confusion_results()
    local c <close> = clh.confusion(3)
    -- columns 0-1 class 0, 2-3 class 1; prediction boundary one column left; one class-2
    local gt, pred = {}, {}
    for y = 0, 3 do
        for x = 0, 3 do
            gt[#gt + 1] = x < 2 and 0 or 1
            pred[#pred + 1] = x < 1 and 0 or 1
        end
    end
    pred[16] = 2
    c:add(pred, gt)
    local r = c:results()
    h.near(r.iou[1], 0.5, 1e-12, "iou 0")
    h.near(r.iou[2], 7 / 12, 1e-12, "iou 1")
    h.truthy(r.iou[3] ~= r.iou[3], "class without GT is NaN")
    h.near(r.miou, (0.5 + 7 / 12) / 2, 1e-12, "miou")
    h.near(r.pacc, 11 / 16, 1e-12, "pacc")
    h.near(r.macc, (0.5 + 7 / 8) / 2, 1e-12, "macc")
    h.eq(r.pixels, 16, "pixels")
    local d <close> = clh.confusion(3)
    d:add(gt, gt)
    c:merge(d)
    h.eq(c:count(0, 0), 8 + 4, "merged count")
    h.raises("ground truth 7", c.add, c, {0}, {7})
    h.raises("2 predictions but 1", c.add, c, {0, 1}, {0})
    local v <close> = clh.confusion(59, {voc20b = true})
    v:add({40, 20}, {20, 20})
    h.near(v:results().miou, 1, 1e-12, "voc20b remap")
end

return T

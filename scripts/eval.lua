-- Semantic-segmentation evaluation (detectron2 SemSegEvaluator conventions): runs a model on
-- every image of a dataset folder, or scores existing prediction PNGs (--pred-dir), and
-- reports mIoU, pixel accuracy, mean accuracy, fwIoU and per-class IoU / accuracy, all in
-- percent. Ground-truth 255 is ignored; --dataset voc20b counts every prediction >= 20 as
-- "background" (PAS-20b).
local paths = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib_path.lua")
local argparse = require "clhclip.argparse"
local seg_model = require "clhclip.seg_model"

-- --dataset -> label mode and expected class count (voc20b: 20 VOC names + background
-- proxies; evaluated as 21 classes).
local DATASETS = {
    raw = {labels = "raw"},
    ade150 = {labels = "ade150", classes = 150},
    ade847 = {labels = "raw", classes = 847},
    pc59 = {labels = "raw", classes = 59},
    pc459 = {labels = "raw", classes = 459},
    voc20 = {labels = "voc20", classes = 20},
    voc20b = {labels = "voc20b", min_classes = 21, eval_classes = 21},
}

local parser = argparse.new("scripts/eval.lua",
                            "Evaluate open-vocabulary segmentation on a dataset folder.")
seg_model.add_options(parser, {required = false})
parser:option("--data", {metavar = "DIR", required = true,
              help = "dataset folder: images/ + annotations/ (ADE20K), images/S/ + " ..
                  "annotations[_detectron2]/S/ with --split, or N_image.png + N_target.png (VOC)"})
parser:option("--classes", {metavar = "FILE", required = true,
              help = "class names, one per line, in label-id order (e.g. " ..
                  "../shared/data/classnames/ade20k_150.txt)"})
parser:option("--dataset", {default = "raw",
              choices = {"raw", "ade150", "ade847", "pc59", "pc459", "voc20", "voc20b"},
              help = "label encoding and class count: ade150 (0 = ignore, k -> k-1), voc20 / " ..
                  "voc20b (VOC palette colours; background ignored / class 20 with every " ..
                  "prediction >= 20 mapped to it), others raw gray ids"})
parser:option("--split", {metavar = "S", help = "split sub-folder (e.g. validation, val2017)"})
parser:option("--csv", {metavar = "FILE", help = "write per-class results: id,class,iou,acc,gt_pixels (percent; nan without ground truth)"})
parser:option("--limit", {type = "integer", metavar = "N", help = "evaluate only the first N images"})
parser:option("--pred-dir", {metavar = "DIR",
              help = "score existing predictions DIR/<image name without extension>.png " ..
                  "(8-bit gray class ids) instead of running a model (--model not needed)"})
parser:option("--save-pred", {metavar = "DIR",
              help = "write each model prediction as DIR/<image name without extension>.png"})
parser:flag("--no-sliding", {help = "one resized view instead of the sliding window"})
parser:flag("--quiet", {help = "no per-image progress lines"})

local function stem(name)
    return (name:gsub("%.[^./]*$", ""))
end

local function clock(seconds)
    if seconds ~= seconds or seconds == math.huge then return "?" end
    seconds = math.floor(seconds + 0.5)
    return string.format("%d:%02d:%02d", seconds // 3600, seconds // 60 % 60, seconds % 60)
end

local function read_class_file(path)
    if not seg_model.is_file(path) then
        error(string.format("cannot read --classes file '%s'", path), 0)
    end
    return seg_model.read_classes(path)
end

local function check_args(opts)
    local ds = DATASETS[opts.dataset]
    if not seg_model.is_dir(opts.data) then
        error(string.format("--data '%s' is not a directory", opts.data), 0)
    end
    if opts.pred_dir and not seg_model.is_dir(opts.pred_dir) then
        error(string.format("--pred-dir '%s' is not a directory", opts.pred_dir), 0)
    end
    if not opts.pred_dir and not opts.model then
        error("give --model (or --pred-dir to score existing predictions)", 0)
    end
    if opts.pred_dir and opts.model then error("give either --model or --pred-dir, not both", 0) end
    if opts.save_pred and opts.pred_dir then error("--save-pred needs --model", 0) end
    if opts.limit and opts.limit < 1 then error("--limit must be >= 1", 0) end
    local names = read_class_file(opts.classes)
    if ds.classes and #names ~= ds.classes then
        error(string.format("--dataset %s has %d classes but --classes '%s' lists %d",
                            opts.dataset, ds.classes, opts.classes, #names), 0)
    end
    if ds.min_classes and #names < ds.min_classes then
        error(string.format("--dataset %s needs the 20 VOC names followed by background " ..
                                "names (at least %d), --classes '%s' lists %d", opts.dataset,
                            ds.min_classes, opts.classes, #names), 0)
    end
    if opts.save_pred and #names > 255 then
        error(string.format("--save-pred writes 8-bit PNGs: %d classes do not fit", #names), 0)
    end
    if opts.template then seg_model.parse_templates(opts.template) end
    return ds, names
end

-- Names of the evaluated classes (voc20b: the 20 VOC names and "background").
local function eval_names(ds, names)
    local n = ds.eval_classes or #names
    local out = {}
    for i = 1, n do out[i] = names[i] end
    if ds.eval_classes then out[n] = "background" end
    return out
end

local function percent(v, digits)
    if v ~= v then return "nan" end
    return string.format("%." .. (digits or 2) .. "f", v * 100)
end

local function csv_field(s)
    if s:find('[,"\n]') then return '"' .. s:gsub('"', '""') .. '"' end
    return s
end

local function write_csv(path, names, res, gt_pixels)
    local f, err = io.open(path, "w")
    if not f then error("cannot write --csv: " .. err, 0) end
    f:write("id,class,iou,acc,gt_pixels\n")
    for k = 1, #names do
        f:write(string.format("%d,%s,%s,%s,%d\n", k - 1, csv_field(names[k]), percent(res.iou[k], 4),
                              percent(res.acc[k], 4), gt_pixels[k - 1] or 0))
    end
    f:close()
end

local function print_results(names, res, gt_pixels)
    print(string.format("mIoU %s  pAcc %s  mAcc %s  fwIoU %s  (%d pixels)", percent(res.miou),
                        percent(res.pacc), percent(res.macc), percent(res.fwiou), res.pixels))
    local width = 5
    for _, n in ipairs(names) do width = math.max(width, math.min(#n, 40)) end
    print(string.format("%4s  %-" .. width .. "s  %7s  %7s  %10s", "id", "class", "IoU", "Acc",
                        "gt pixels"))
    local skipped = 0
    for k = 1, #names do
        if (gt_pixels[k - 1] or 0) > 0 then
            print(string.format("%4d  %-" .. width .. "s  %7s  %7s  %10d", k - 1,
                                names[k]:sub(1, 40), percent(res.iou[k]), percent(res.acc[k]),
                                gt_pixels[k - 1]))
        else
            skipped = skipped + 1
        end
    end
    if skipped > 0 then
        print(string.format("(%d classes without ground-truth pixels not shown: their IoU " ..
                                "is undefined and left out of the means)", skipped))
    end
end

-- Prediction source: a function(i, name, image) -> Label.
local function prediction_source(clh, opts, names)
    if opts.pred_dir then
        return function(_, name)
            local path = opts.pred_dir .. "/" .. stem(name) .. ".png"
            if not seg_model.is_file(path) then
                error(string.format("no prediction for image '%s': %s is missing", name, path), 0)
            end
            return clh.read_label(path, "raw")
        end
    end
    local ctx = clh.init {platform = opts.platform, device = opts.device}
    local t0 = clh.now()
    local r = seg_model.load(clh, {model = opts.model, clip = opts.clip, vocab = opts.vocab,
                                   template = opts.template, ctx = ctx})
    r.model:set_classes(names, r.tokenizer)
    io.stderr:write(string.format("model: %s (%s), input %d, %d classes, loaded in %.1f s on %s\n",
                                  opts.model, r.kind, r.options.image_size, #names,
                                  clh.now() - t0, ctx:device().name))
    return function(_, name, image)
        local label = r.model:predict(image, {sliding = not opts.no_sliding})
        if opts.save_pred then label:save_png(opts.save_pred .. "/" .. stem(name) .. ".png") end
        return label
    end
end

argparse.main(function()
    local opts = parser:parse(seg_model.join_repeated(arg, "--template", ";"))
    local ds_info, names = check_args(opts)
    local clh = paths.clhclip()
    local ds = clh.dataset(opts.data, {split = opts.split, labels = ds_info.labels})
    local total = ds:count()
    if total == 0 then error(string.format("no images found under '%s'", opts.data), 0) end
    if opts.limit then total = math.min(total, opts.limit) end
    if opts.save_pred then os.execute("mkdir -p '" .. opts.save_pred:gsub("'", "'\\''") .. "'") end

    local enames = eval_names(ds_info, names)
    local conf = clh.confusion(#enames, {voc20b = opts.dataset == "voc20b"})
    local predict = prediction_source(clh, opts, names)
    local gt_pixels = {}
    local t0 = clh.now()
    for i = 1, total do
        local name = ds:name(i)
        local image, gt = ds:read(i)
        local pred = predict(i, name, image)
        if pred.width ~= gt.width or pred.height ~= gt.height then
            error(string.format("prediction for '%s' is %dx%d but its ground truth is %dx%d",
                                name, pred.width, pred.height, gt.width, gt.height), 0)
        end
        local ok, err = pcall(conf.add, conf, pred, gt)
        if not ok then error(string.format("image '%s': %s", name, tostring(err)), 0) end
        for id, count in pairs(gt:counts()) do
            if id ~= 255 then gt_pixels[id] = (gt_pixels[id] or 0) + count end
        end
        pred:free()
        gt:free()
        if not opts.quiet then
            local elapsed = clh.now() - t0
            local rate = i / math.max(elapsed, 1e-9)
            io.stderr:write(string.format("[%d/%d] %s  %.2f img/s  ETA %s\n", i, total, name,
                                          rate, clock((total - i) / rate)))
        end
    end
    local elapsed = clh.now() - t0
    local res = conf:results()
    print(string.format("data: %s (%s%s), %d images, %d classes evaluated, %.1f s (%.2f img/s)",
                        opts.data, opts.dataset, opts.split and (", split " .. opts.split) or "",
                        total, #enames, elapsed, total / math.max(elapsed, 1e-9)))
    print_results(enames, res, gt_pixels)
    if opts.csv then
        write_csv(opts.csv, enames, res, gt_pixels)
        print("wrote " .. opts.csv)
    end
end)

-- scripts/eval.lua --pred-dir on the real ADE20K / VOC samples in ../shared/data/segmentation:
-- hand-made predictions are scored by the script (a subprocess) and compared with IoU /
-- accuracy computed here from pixel counts.
local h = require "helpers"
local clh = h.clh
local T = h.suite()

local ADE = "segmentation/ade20k_sceneparsing"
local VOC = "segmentation/voc2012_vainf"

local function eval(args)
    return h.run_script(h.repo .. "/scripts/eval.lua", args, {CLHCLIP_BUILD = h.build})
end

local function tmpdir()
    local dir = h.tmpname("_eval")
    os.execute("mkdir -p " .. h.shell_quote(dir))
    return dir
end

local function stem(name)
    return (name:gsub("%.[^.]*$", ""))
end

-- Split one CSV line (quoted fields allowed).
local function csv_fields(line)
    local out, i = {}, 1
    while i <= #line + 1 do
        if line:sub(i, i) == '"' then
            local j, buf = i + 1, {}
            while true do
                local c = line:sub(j, j)
                if c == '"' and line:sub(j + 1, j + 1) == '"' then
                    buf[#buf + 1] = '"'
                    j = j + 2
                elseif c == '"' or c == "" then
                    break
                else
                    buf[#buf + 1] = c
                    j = j + 1
                end
            end
            out[#out + 1] = table.concat(buf)
            i = j + 2
        else
            local j = line:find(",", i, true) or #line + 1
            out[#out + 1] = line:sub(i, j - 1)
            i = j + 1
        end
    end
    return out
end

-- CSV rows by 0-based class id: {name=, iou=, acc=, gt=} (nan -> nil).
local function read_csv(path)
    local f = assert(io.open(path, "r"), "the CSV was written")
    h.eq(f:read("l"), "id,class,iou,acc,gt_pixels", "CSV header")
    local rows = {}
    for line in f:lines() do
        local v = csv_fields(line)
        rows[tonumber(v[1])] = {name = v[2], iou = tonumber(v[3] ~= "nan" and v[3] or nil),
                                acc = tonumber(v[4] ~= "nan" and v[4] or nil),
                                gt = tonumber(v[5])}
    end
    f:close()
    return rows
end

local function summary(out)
    local m, pa, ma, fw = out:match("mIoU (%S+)%s+pAcc (%S+)%s+mAcc (%S+)%s+fwIoU (%S+)")
    h.truthy(m, "summary line in:\n" .. out)
    return {miou = tonumber(m), pacc = tonumber(pa), macc = tonumber(ma), fwiou = tonumber(fw)}
end

-- Reference metrics from (pred, gt) flat id tables, as detectron2 computes them (percent).
local function reference(pairs_list, n, voc20b)
    local tp, gt_n, pred_n = {}, {}, {}
    for k = 0, n - 1 do tp[k], gt_n[k], pred_n[k] = 0, 0, 0 end
    for _, pg in ipairs(pairs_list) do
        local pred, gt = pg[1], pg[2]
        for i = 1, #gt do
            local g = gt[i]
            if g ~= 255 then
                local p = pred[i]
                if voc20b and p >= 20 then p = 20 end
                gt_n[g] = gt_n[g] + 1
                pred_n[p] = pred_n[p] + 1
                if p == g then tp[g] = tp[g] + 1 end
            end
        end
    end
    local r = {iou = {}, acc = {}, gt = gt_n}
    local total, correct, sum_iou, sum_acc, fw, valid = 0, 0, 0, 0, 0, 0
    for k = 0, n - 1 do total = total + gt_n[k] end
    for k = 0, n - 1 do
        if gt_n[k] > 0 then
            r.iou[k] = 100 * tp[k] / (gt_n[k] + pred_n[k] - tp[k])
            r.acc[k] = 100 * tp[k] / gt_n[k]
            sum_iou, sum_acc, valid = sum_iou + r.iou[k], sum_acc + r.acc[k], valid + 1
            fw = fw + gt_n[k] / total * r.iou[k]
            correct = correct + tp[k]
        end
    end
    r.miou, r.macc, r.fwiou, r.pacc = sum_iou / valid, sum_acc / valid, fw, 100 * correct / total
    return r
end

-- Compare the script's CSV and summary with the reference.
local function check_against(out, csv, ref, n)
    local s = summary(out)
    for _, key in ipairs {"miou", "pacc", "macc", "fwiou"} do
        h.near(s[key], ref[key], 0.006, key)
    end
    local rows = read_csv(csv)
    for k = 0, n - 1 do
        h.truthy(rows[k], "CSV row for class " .. k)
        h.eq(rows[k].gt, ref.gt[k], "gt pixels of class " .. k)
        if ref.gt[k] > 0 then
            h.near(rows[k].iou, ref.iou[k], 1e-4, "IoU of class " .. k)
            h.near(rows[k].acc, ref.acc[k], 1e-4, "accuracy of class " .. k)
        else
            h.eq(rows[k].iou, nil, "IoU of class " .. k .. " without ground truth is nan")
        end
    end
    return rows
end

-- Write predictions made by edit(name, ids, w, h) (a copy of the ground truth in `mode`)
-- to a fresh folder; returns it and the (pred, gt) pairs.
local function make_predictions(root, mode, edit)
    local ds = clh.dataset(root, {labels = mode})
    local dir, pairs_list = tmpdir(), {}
    for i = 1, ds:count() do
        local _, gt = ds:read(i)
        local ids = gt:totable()
        local pred = {}
        for j = 1, #ids do pred[j] = ids[j] end
        edit(ds:name(i), pred, gt.width, gt.height)
        clh.write_label_png(dir .. "/" .. stem(ds:name(i)) .. ".png", pred, gt.width, gt.height)
        pairs_list[#pairs_list + 1] = {pred, ids}
    end
    return dir, pairs_list
end

local function ade_args(pred_dir, csv)
    return {"--data", h.shared(ADE), "--classes", h.shared("classnames/ade20k_150.txt"),
            "--dataset", "ade150", "--pred-dir", pred_dir, "--csv", csv}
end

function T.ade_ground_truth_as_prediction_scores_100()
    local root = h.shared(ADE)
    local dir, pl = make_predictions(root, "ade150", function() end)
    local csv = dir .. "/out.csv"
    local out, rc = eval(ade_args(dir, csv))
    h.eq(rc, 0, "exit code; output:\n" .. out)
    local s = summary(out)
    for _, key in ipairs {"miou", "pacc", "macc", "fwiou"} do h.near(s[key], 100, 1e-9, key) end
    local rows = check_against(out, csv, reference(pl, 150), 150)
    h.eq(rows[2].name, "sky", "class 2 name")
    h.truthy(out:find("[1/3]", 1, true) and out:find("img/s", 1, true) and
                 out:find("ETA", 1, true), "progress lines")
end

-- Every "grass" pixel (ADE class 9) predicted as "tree" (4): IoU(grass) = 0 and
-- IoU(tree) = G_tree / (G_tree + G_grass), known in closed form from the pixel counts.
function T.ade_class_replaced_by_another()
    local root = h.shared(ADE)
    local grass, tree = 9, 4
    local dir, pl = make_predictions(root, "ade150", function(_, ids)
        for j = 1, #ids do
            if ids[j] == grass then ids[j] = tree end
        end
    end)
    local g = reference(pl, 150).gt
    h.truthy(g[grass] > 0 and g[tree] > 0, "the sample holds grass and tree")
    local csv = dir .. "/out.csv"
    local out, rc = eval(ade_args(dir, csv))
    h.eq(rc, 0, "exit code; output:\n" .. out)
    local rows = read_csv(csv)
    h.near(rows[grass].iou, 0, 1e-9, "IoU of grass")
    h.near(rows[grass].acc, 0, 1e-9, "accuracy of grass")
    h.near(rows[tree].iou, 100 * g[tree] / (g[tree] + g[grass]), 1e-4, "IoU of tree")
    h.near(rows[tree].acc, 100, 1e-9, "accuracy of tree")
    local total, present = 0, 0
    for k = 0, 149 do
        total = total + g[k]
        if g[k] > 0 then present = present + 1 end
    end
    local s = summary(out)
    h.near(s.pacc, 100 * (total - g[grass]) / total, 0.006, "pixel accuracy")
    h.near(s.miou, (100 * (present - 2) + rows[tree].iou) / present, 0.006, "mIoU")
end

-- A block of every image predicted as one class, including ignored pixels.
function T.ade_block_edit_matches_reference()
    local root = h.shared(ADE)
    local dir, pl = make_predictions(root, "ade150", function(_, ids, w, hgt)
        for y = 0, hgt // 3 do
            for x = 0, w // 2 do ids[y * w + x + 1] = 2 end -- "sky"
        end
        for y = hgt // 2, hgt - 1 do ids[y * w + 1] = 100 end -- a class absent from the gt
    end)
    local csv = dir .. "/out.csv"
    local out, rc = eval(ade_args(dir, csv))
    h.eq(rc, 0, "exit code; output:\n" .. out)
    check_against(out, csv, reference(pl, 150), 150)
end

-- VOC-20: background is ignored, so predictions there do not count; sheep -> cow on a
-- block of the sheep image.
function T.voc20_edits_match_reference()
    local root = h.shared(VOC)
    local dir, pl = make_predictions(root, "voc20", function(name, ids, w, hgt)
        for j = 1, #ids do
            if ids[j] == 255 then ids[j] = 5 end
        end
        if name == "23_image.png" then
            for y = 0, hgt // 2 do
                for x = 0, w - 1 do
                    if ids[y * w + x + 1] == 16 then ids[y * w + x + 1] = 9 end
                end
            end
        end
    end)
    local csv = dir .. "/out.csv"
    local out, rc = eval({"--data", root, "--classes", h.shared("classnames/pascal_voc_20.txt"),
                          "--dataset", "voc20", "--pred-dir", dir, "--csv", csv})
    h.eq(rc, 0, "exit code; output:\n" .. out)
    local ref = reference(pl, 20)
    h.eq(ref.gt[5], 0, "bus has no ground truth (background predictions are ignored)")
    check_against(out, csv, ref, 20)
end

-- VOC-20b: background is class 20 and every prediction >= 20 (the context names) counts
-- as background.
function T.voc20b_maps_context_predictions_to_background()
    local root = h.shared(VOC)
    local dir, pl = make_predictions(root, "voc20b", function(name, ids, w, hgt)
        for j = 1, #ids do
            if ids[j] == 20 then ids[j] = 20 + j % 39 end -- any context name: still right
        end
        if name == "1_image.png" then
            for y = 0, hgt // 4 do
                for x = 0, w - 1 do ids[y * w + x + 1] = 45 end -- context -> background
            end
        end
    end)
    local csv = dir .. "/out.csv"
    local out, rc = eval({"--data", root, "--classes", h.shared("classnames/pascal_voc_20b.txt"),
                          "--dataset", "voc20b", "--pred-dir", dir, "--csv", csv})
    h.eq(rc, 0, "exit code; output:\n" .. out)
    local rows = check_against(out, csv, reference(pl, 21, true), 21)
    h.eq(rows[20].name, "background", "class 20 is background")
    h.truthy(rows[20].iou > 90, "context predictions on background count as right")
end

function T.eval_help_and_bad_arguments()
    local out, rc = eval({"--help"})
    h.eq(rc, 0, "--help exit code")
    local src = assert(io.open(h.repo .. "/scripts/eval.lua")):read("a")
    for flag in src:gmatch('parser:%a+%("(%-%-[%w%-]+)"') do
        h.truthy(out:find(flag, 1, true), "--help lists " .. flag)
    end
    for _, flag in ipairs {"--model", "--clip", "--vocab", "--template", "--platform", "--device"} do
        h.truthy(out:find(flag, 1, true), "--help lists " .. flag)
    end

    local dir = tmpdir()
    local function fails(args, needle)
        local o, code = eval(args)
        h.eq(code, 1, "exit code for " .. table.concat(args, " ") .. "; output:\n" .. o)
        h.truthy(o:find("error: ", 1, true) and o:find(needle, 1, true),
                 "message containing '" .. needle .. "': " .. o)
    end
    fails({"--classes", "x.txt", "--pred-dir", dir}, "--data is required")
    fails({"--data", dir, "--classes", "x.txt", "--dataset", "ade999", "--pred-dir", dir},
          "--dataset must be one of")
    fails({"--data", dir, "--classes", dir .. "/missing.txt", "--pred-dir", dir},
          "cannot read --classes file")
    fails({"--data", dir .. "/nope", "--classes", "x.txt", "--pred-dir", dir}, "is not a directory")

    local root = h.shared(ADE)
    local names = h.shared("classnames/ade20k_150.txt")
    fails({"--data", root, "--classes", names, "--dataset", "ade150"}, "give --model")
    fails({"--data", root, "--classes", h.shared("classnames/pascal_voc_20.txt"), "--dataset",
           "ade150", "--pred-dir", dir}, "has 150 classes but --classes")
    fails({"--data", root, "--classes", names, "--dataset", "ade150", "--pred-dir", dir},
          "no prediction for image 'ADE_val_00000001.jpg'")
    fails({"--data", root, "--classes", names, "--dataset", "ade150", "--pred-dir", dir,
           "--limit", "0"}, "--limit must be >= 1")
end

-- A prediction of the wrong size is an error naming the image.
function T.eval_refuses_prediction_of_wrong_size()
    local root = h.shared(ADE)
    local dir = tmpdir()
    local ds = clh.dataset(root, {labels = "ade150"})
    for i = 1, ds:count() do
        clh.write_label_png(dir .. "/" .. stem(ds:name(i)) .. ".png", {0, 0, 0, 0}, 2, 2)
    end
    local out, rc = eval({"--data", root, "--classes", h.shared("classnames/ade20k_150.txt"),
                          "--dataset", "ade150", "--pred-dir", dir, "--limit", "1"})
    h.eq(rc, 1, "exit code; output:\n" .. out)
    h.truthy(out:find("prediction for 'ADE_val_00000001.jpg' is 2x2", 1, true), "message: " .. out)
end

return T

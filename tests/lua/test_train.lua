-- scripts/train.lua end to end on a tiny random CLIP and procedural data: progress lines,
-- metrics log, checkpoints, validation, --resume continuing the step count, bad arguments.
local h = require "helpers"
local clh = h.clh
local T = h.suite()

local SIZE = 32
local HEAD = "hidden=8,heads=2,appearance_proj=6,text_proj=4,guidance_up=6:4," ..
                 "decoder_guidance_proj=2:2,decoder=8:4,gn_group_size=4,window=2,pad_len=10," ..
                 "mlp_ratio=2,n_layers=1"

local cache = {}

local function tmpdir(tag)
    local dir = h.tmpname(tag)
    os.execute("mkdir -p " .. h.shell_quote(dir))
    return dir
end

local function setup()
    if not cache.clip then
        h.ctx()
        cache.vocab = h.fixture("tokenizer/tiny_merges.txt.gz")
        cache.clip = tmpdir("_trclip")
        require("clhclip.tinyclip").write(clh, cache.clip, {
            vision = {hidden = 32, layers = 2, heads = 2, intermediate = 64},
            text = {hidden = 32, layers = 1, heads = 2, intermediate = 64},
            image_size = SIZE, projection_dim = 24,
        }, 5)
        cache.data = tmpdir("_trdata")
        clh.make_procedural_dataset {dir = cache.data, n = 6, size = SIZE, seed = 3}
    end
    return cache
end

local function train(args)
    return h.run_script(h.repo .. "/scripts/train.lua", args, {CLHCLIP_BUILD = h.build})
end

local function lines(path)
    local out = {}
    for l in io.lines(path) do out[#out + 1] = l end
    return out
end

function T.trains_checkpoints_validates_and_resumes()
    local c = setup()
    local out = tmpdir("_trout")
    local common = {"--data", c.data, "--vocab", c.vocab, "--crop", tostring(SIZE), "--batch",
                    "2", "--out", out, "--threads", "1", "--lr", "1e-3", "--ckpt-every", "2"}
    local args = {"--clip", c.clip, "--head", HEAD, "--block-size", "16", "--steps", "3",
                  "--val-data", c.data, "--val-every", "2", "--val-limit", "2"}
    for _, a in ipairs(common) do args[#args + 1] = a end
    local text, code = train(args)
    h.eq(code, 0, "train.lua exit status (output: " .. text .. ")")
    for step = 1, 3 do
        h.truthy(text:find(string.format("step %d/3  loss [%%d.]+  lr", step)),
                 "progress line of step " .. step)
    end
    h.truthy(text:find("img/s  ETA"), "rate and ETA printed")
    h.truthy(text:find("validation at step 2: mIoU"), "validation ran")
    h.truthy(h.exists(out .. "/ckpt_0000002.safetensors"), "periodic checkpoint")
    h.truthy(h.exists(out .. "/last.safetensors"), "last checkpoint")
    local log = lines(out .. "/metrics.jsonl")
    h.truthy(#log >= 5, "3 step entries and 2 validation entries")
    h.truthy(log[1]:find('"step": 1') and log[1]:find('"loss"'), "first metrics entry")
    -- resume: continues at step 4 with the stored CLIP path, classes and optimizer
    local resume = {"--resume", "auto", "--steps", "4"}
    for _, a in ipairs(common) do resume[#resume + 1] = a end
    text, code = train(resume)
    h.eq(code, 0, "resumed run exit status (output: " .. text .. ")")
    h.truthy(text:find("resumed from .* at step 3"), "resumed at step 3")
    h.truthy(text:find("step 4/4"), "ran step 4")
    h.truthy(not text:find("step 1/4"), "did not start over")
    h.eq(#lines(out .. "/metrics.jsonl"), #log + 1, "metrics log appended")
    -- the checkpoint serves eval.lua and segment.lua directly (CLIP path and classes stored)
    local csv = out .. "/eval.csv"
    text, code = h.run_script(h.repo .. "/scripts/eval.lua",
                              {"--model", out .. "/last.safetensors", "--data", c.data,
                               "--classes", c.data .. "/classes.txt", "--vocab", c.vocab,
                               "--csv", csv, "--no-sliding", "--quiet"},
                              {CLHCLIP_BUILD = h.build})
    h.eq(code, 0, "eval.lua on the checkpoint (output: " .. text .. ")")
    h.truthy(text:find("mIoU"), "eval printed the mIoU")
    h.eq(#lines(csv), 1 + 8, "CSV header + one line per class")
end

function T.bad_arguments_are_reported()
    local c = setup()
    local text, code = train({"--clip", c.clip})
    h.eq(code, 1, "missing --data")
    h.truthy(text:find("%-%-data"), "names --data: " .. text)
    text, code = train({"--data", c.data, "--vocab", c.vocab, "--out", tmpdir("_trbad")})
    h.eq(code, 1, "missing --clip")
    h.truthy(text:find("%-%-clip DIR is required"), text)
    text, code = train({"--clip", c.clip, "--data", c.data, "--vocab", c.vocab, "--head",
                        "hidden=x", "--out", tmpdir("_trbad2")})
    h.eq(code, 1, "bad --head")
    h.truthy(text:find("%-%-head: bad item"), text)
    text, code = train({"--clip", c.clip, "--data", c.data, "--labels", "nope"})
    h.eq(code, 1, "bad --labels")
    text, code = train({"--help"})
    h.eq(code, 0, "--help")
    for _, flag in ipairs {"--clip", "--data", "--resume", "--max-grad-norm", "--val-every"} do
        h.truthy(text:find(flag, 1, true), "--help lists " .. flag)
    end
end

return T

-- scripts/info.lua and scripts/zeroshot.lua run as subprocesses.
local h = require "helpers"
local clh = h.clh
local T = h.suite()

local function env()
    return {CLHCLIP_BUILD = h.build}
end

local function script(name)
    return h.repo .. "/scripts/" .. name
end

local function run(name, args, extra_env)
    local e = env()
    for k, v in pairs(extra_env or {}) do e[k] = v end
    return h.run_script(script(name), args, e)
end

-- Every "--flag" declared in the script source appears in its --help output.
local function check_help_lists_every_flag(name)
    local out, rc = run(name, {"--help"})
    h.eq(rc, 0, name .. " --help exit code")
    h.truthy(out:find("usage: ", 1, true), name .. " --help shows usage")
    local src = assert(io.open(script(name))):read("a")
    local n = 0
    for flag in src:gmatch('parser:%a+%("(%-%-[%w%-]+)"') do
        n = n + 1
        h.truthy(out:find(flag, 1, true), name .. " --help lists " .. flag)
    end
    h.truthy(n >= 3, name .. ": flags found in the source")
end

function T.info_help_and_bad_arguments()
    check_help_lists_every_flag("info.lua")
    local out, rc = run("info.lua", {"--bogus"})
    h.eq(rc, 1, "exit code for an unknown flag")
    h.truthy(out:find("error: unknown option '--bogus'", 1, true), "message: " .. out)
    out, rc = run("info.lua", {"--device"})
    h.eq(rc, 1, "exit code for a missing value")
    h.truthy(out:find("error: --device needs a value", 1, true), "message: " .. out)
end

function T.info_lists_devices_and_the_selection()
    h.ctx()
    local out, rc = run("info.lua", {})
    h.eq(rc, 0, "exit code; output:\n" .. out)
    for _, d in ipairs(clh.devices()) do
        h.truthy(out:find(d.name, 1, true), "lists " .. d.name)
        h.truthy(out:find(d.c_version, 1, true), "shows the OpenCL C version")
    end
    for _, field in ipairs {"compute units", "global memory", "max allocation", "local memory",
                            "max work-group size", "fp16", "fp64", "subgroups", "driver"} do
        h.truthy(out:find(field, 1, true), "shows " .. field)
    end
    local selected = out:match("selected[^\n]*")
    h.truthy(selected and selected:find(clh.context():device().name, 1, true),
             "selected line names the default device: " .. tostring(selected))
end

function T.info_honours_the_environment_selection()
    h.ctx()
    local d = clh.devices()[1]
    local out, rc = run("info.lua", {"--brief"}, {CLHCLIP_PLATFORM = tostring(d.platform_index),
                                                  CLHCLIP_DEVICE = tostring(d.device_index)})
    h.eq(rc, 0, "exit code; output:\n" .. out)
    local selected = out:match("selected[^\n]*") or ""
    h.truthy(selected:find(string.format("device %d.%d", d.platform_index, d.device_index), 1,
                           true), "selection follows the environment: " .. selected)
    out, rc = run("info.lua", {"--brief"}, {CLHCLIP_DEVICE = "no-such-device-xyz"})
    h.eq(rc, 1, "exit code for an unmatched selection")
    h.truthy(out:find("error: ", 1, true) and out:find("no-such-device-xyz", 1, true),
             "message names the selection: " .. out)
end

function T.info_without_any_opencl_platform()
    -- ocl-icd reads its vendor list from OCL_ICD_VENDORS; an empty directory hides all drivers.
    local empty = h.tmpname("_icd")
    os.execute("mkdir -p " .. h.shell_quote(empty))
    local out, rc = run("info.lua", {}, {OCL_ICD_VENDORS = empty})
    os.remove(empty)
    if rc == 0 then h.skip("this ICD loader ignores OCL_ICD_VENDORS") end
    h.eq(rc, 1, "exit code")
    h.truthy(out:find("\nerror: [^\n]*OpenCL"), "prints the library's message: " .. out)
end

function T.zeroshot_help_and_argument_errors()
    check_help_lists_every_flag("zeroshot.lua")
    local cases = {
        {{}, "error: --model is required"},
        {{"--model", "x"}, "error: --image is required"},
        {{"--model", "x", "--image", "/nonexistent/cat.png", "--labels", "a"},
         "error: cannot read --image '/nonexistent/cat.png'"},
        {{"--model", "x", "--image", script("info.lua"), "--top", "two"},
         "error: --top expects an integer, got 'two'"},
        {{"--model", "x", "--image", script("info.lua"), "--mode", "bogus"},
         "error: --mode must be one of crop, resize"},
        {{"--model", "x", "--image", script("info.lua")}, "error: no labels"},
        {{"--model", "x", "--image", script("info.lua"), "--labels", " , ,"}, "error: no labels"},
        {{"--model", "x", "--image", script("info.lua"), "--labels-file", "/nonexistent/l.txt"},
         "error: cannot open --labels-file"},
        {{"--model", "x", "--image", script("info.lua"), "--labels", "a", "--template", "no"},
         "error: --template must contain {}"},
        {{"--model", "x", "--image", script("info.lua"), "--labels", "a", "--top", "0"},
         "error: --top must be >= 1"},
        {{"--model", "x", "--image", script("info.lua"), "stray"},
         "error: unexpected argument 'stray'"},
    }
    for i, c in ipairs(cases) do
        local out, rc = run("zeroshot.lua", c[1])
        h.eq(rc, 1, "case " .. i .. " exit code; output: " .. out)
        h.truthy(out:find(c[2], 1, true), string.format("case %d: want %q, got %q", i, c[2], out))
    end
end

function T.zeroshot_reports_library_errors()
    h.ctx()
    local image = h.fixture("image/synth_50x61.png")
    local out, rc = run("zeroshot.lua", {"--model", "/nonexistent/model", "--image", image,
                                         "--labels", "a cat"})
    h.eq(rc, 1, "exit code for a missing model")
    h.truthy(out:find("error: ", 1, true) and out:find("/nonexistent/model", 1, true),
             "message names the model: " .. out)
    out, rc = run("zeroshot.lua", {"--model", h.fixture("clip_tiny_openai"), "--image", image,
                                   "--labels", "a cat", "--vocab",
                                   h.fixture("tokenizer/tiny_merges.txt.gz")})
    h.eq(rc, 1, "exit code for a vocabulary larger than the model's")
    h.truthy(out:find("has 824 tokens but the model's vocabulary has 500", 1, true),
             "vocabulary mismatch message: " .. out)
end

-- Probabilities computed in-process with the binding, to check the script's numbers.
local function expected_probs(model_dir, vocab, image, prompts)
    local model <close> = clh.load_clip(model_dir)
    local tok <close> = clh.tokenizer(vocab)
    local img = model:encode_image(clh.preprocess(image, model:config().image_size)).pooled
    local txt = model:encode_text(prompts, {tokenizer = tok})
    local function unit(v)
        local s = 0
        for _, x in ipairs(v) do s = s + x * x end
        for i = 1, #v do v[i] = v[i] / math.sqrt(s) end
        return v
    end
    local iv = unit(img:totable())
    local flat, p = txt:totable(), txt:size(2)
    local scale = math.exp(model:logit_scale())
    local logits, probs, sum = {}, {}, 0
    for r = 1, #prompts do
        local row = {}
        for j = 1, p do row[j] = flat[(r - 1) * p + j] end
        row = unit(row)
        local dot = 0
        for j = 1, p do dot = dot + row[j] * iv[j] end
        logits[r] = scale * dot
    end
    local m = math.max(table.unpack(logits))
    for r = 1, #prompts do
        probs[r] = math.exp(logits[r] - m)
        sum = sum + probs[r]
    end
    for r = 1, #prompts do probs[r] = probs[r] / sum end
    return probs
end

local function copy_file(from, to)
    local data = assert(io.open(from, "rb")):read("a")
    local f = assert(io.open(to, "wb"))
    f:write(data)
    f:close()
end

-- A copy of the tiny_p8 model whose text EOS id is `eos` (so that a tiny tokenizer's EOT
-- is pooled), optionally with that tokenizer's vocab.json + merges.txt beside it.
local function tiny_model_dir(eos, vocab_dir)
    local src = h.fixture("clip_tiny_p8")
    local dir = h.tmpname("_model")
    os.execute("mkdir -p " .. h.shell_quote(dir))
    local config = assert(io.open(src .. "/config.json")):read("a")
    local patched, n = config:gsub('"eos_token_id": 999', '"eos_token_id": ' .. eos)
    assert(n == 1, "config.json has no eos_token_id 999")
    local f = assert(io.open(dir .. "/config.json", "w"))
    f:write(patched)
    f:close()
    copy_file(src .. "/model.safetensors", dir .. "/model.safetensors")
    local files = {"config.json", "model.safetensors"}
    if vocab_dir then
        for _, name in ipairs {"vocab.json", "merges.txt"} do
            copy_file(vocab_dir .. "/" .. name, dir .. "/" .. name)
            files[#files + 1] = name
        end
    end
    return dir, function()
        for _, name in ipairs(files) do os.remove(dir .. "/" .. name) end
        os.remove(dir)
    end
end

-- "prob  label" lines of zeroshot output -> {{prob, label}, ...}
local function parse_probs(out)
    local got = {}
    for p, label in out:gmatch("\n(%d%.%d+)  ([^\n]+)") do got[#got + 1] = {tonumber(p), label} end
    return got
end

local function check_against_binding(out, labels, probs)
    local got = parse_probs(out)
    h.eq(#got, #labels, "labels printed; output:\n" .. out)
    local sum = 0
    for i, g in ipairs(got) do
        sum = sum + g[1]
        if i > 1 then h.truthy(got[i - 1][1] >= g[1], "sorted best first") end
        local idx
        for j, l in ipairs(labels) do if l == g[2] then idx = j end end
        h.truthy(idx, "known label " .. g[2])
        h.near(g[1], probs[idx], 1e-4, "probability of " .. g[2])
    end
    h.near(sum, 1, 2e-4, "probabilities sum to 1")
    h.truthy(out:find("time: load", 1, true), "timing line")
    h.truthy(math.max(table.unpack(probs)) - math.min(table.unpack(probs)) > 1e-3,
             "labels get different probabilities (text pooling found the EOT)")
end

function T.zeroshot_end_to_end_on_the_tiny_model()
    h.ctx()
    local vocab = h.fixture("tokenizer/tiny_merges.txt.gz")
    local image = h.fixture("image/synth_50x61.png")
    local model, cleanup = tiny_model_dir(823, nil) -- EOT of tiny_merges
    local labels_file = h.tmpname(".txt")
    local f = assert(io.open(labels_file, "w"))
    f:write("a diagram\n\nthe scene\n")
    f:close()
    local ok, err = pcall(function()
        local out, rc = run("zeroshot.lua", {"--model", model, "--image", image, "--labels",
                                             "a cat, a dog", "--labels-file", labels_file,
                                             "--vocab", vocab, "--template", "a photo of {}"})
        h.eq(rc, 0, "exit code; output:\n" .. out)
        local labels = {"a cat", "a dog", "a diagram", "the scene"}
        local prompts = {}
        for i, l in ipairs(labels) do prompts[i] = "a photo of " .. l end
        check_against_binding(out, labels, expected_probs(model, vocab, image, prompts))

        out, rc = run("zeroshot.lua", {"--model", model, "--image", image, "--labels",
                                       "a cat,a dog,a diagram", "--vocab", vocab, "--top", "2",
                                       "--mode", "resize", "--profile"})
        h.eq(rc, 0, "exit code with --top 2; output:\n" .. out)
        h.eq(#parse_probs(out), 2, "--top 2 prints two labels")
        h.truthy(out:find("total", 1, true), "--profile prints the kernel table")
    end)
    cleanup()
    os.remove(labels_file)
    assert(ok, err)
end

function T.zeroshot_uses_the_model_directory_vocabulary()
    h.ctx()
    local vocab_dir = h.fixture("tokenizer/tiny_hf")
    local image = h.fixture("image/synth_37x23.png")
    local model, cleanup = tiny_model_dir(243, vocab_dir) -- EOT of tiny_hf
    local ok, err = pcall(function()
        local out, rc = run("zeroshot.lua", {"--model", model, "--image", image, "--labels",
                                             "a cat,a dog,a diagram"})
        h.eq(rc, 0, "exit code; output:\n" .. out)
        local labels = {"a cat", "a dog", "a diagram"}
        local prompts = {}
        for i, l in ipairs(labels) do prompts[i] = "a photo of " .. l end
        check_against_binding(out, labels, expected_probs(model, vocab_dir, image, prompts))
    end)
    cleanup()
    assert(ok, err)
end

function T.zeroshot_with_a_real_vocabulary_model()
    -- A full-size model is not committed; run when one is provided.
    local dir = os.getenv("CLHCLIP_TEST_MODEL")
    if not dir or dir == "" then
        h.skip("set CLHCLIP_TEST_MODEL to a CLIP model directory with the real vocabulary")
    end
    local image = h.shared("segmentation/voc2012_vainf/1_image.png")
    local out, rc = run("zeroshot.lua", {"--model", dir, "--image", image, "--labels",
                                         "a person,a cat,a car,a bird"})
    h.eq(rc, 0, "exit code; output:\n" .. out)
    h.truthy(out:find("\n%d%.%d+  "), "prints probabilities")
end

return T

-- Benchmarks of clhclip at the CLIP encoders' shapes, through the public Lua API.
--   lua5.4 scripts/bench.lua --what gemm,attention --runs 5 --json /tmp/clh.json
--   lua5.4 scripts/bench.lua --what all --model /tmp/vitb16
-- Each figure: a warm-up (its first call, which includes kernel compilation, is reported
-- separately with the clBuildProgram seconds it added), then --runs timed calls, printed
-- as median and min/max. Every timing waits for the device. The GEMM path follows
-- $CLHCLIP_GEMM (clblast|host|ocl|auto); --gemm-paths host,ocl,clblast runs the GEMM figures
-- once per path, each in its own process, and prints them side by side.
-- tests/reference/bench_torch.py runs the same shapes
-- in PyTorch and prints the side-by-side table from both JSON files (docs/benchmarks.md).
local paths = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib_path.lua")
local argparse = require "clhclip.argparse"

local ALL = {"gemm", "attention", "vit224", "vit384", "text", "train-tiny", "train", "seg384",
             "segtrain"}
local parser = argparse.new("scripts/bench.lua", "Benchmarks at the CLIP encoders' shapes.")
parser:option("--what", {metavar = "LIST", default = "gemm,attention",
              help = "comma list of " .. table.concat(ALL, ",") .. " or all"})
parser:option("--runs", {type = "integer", default = 5, help = "timed runs per figure"})
parser:option("--warmup", {type = "integer", default = 1,
              help = "untimed calls per figure (at least 1: the first call is the JIT one)"})
parser:option("--json", {metavar = "FILE", help = "also write the results as JSON"})
parser:option("--model", {metavar = "DIR",
              help = "ViT-B/16-shaped CLIP model for vit224/vit384/text (random weights are " ..
                  "fine: python3 tests/reference/make_clip_fixtures.py --config vitb16_384 " ..
                  "--out /tmp/vitb16)"})
parser:option("--prompts", {type = "integer", default = 171,
              help = "prompts for the text and train figures"})
parser:option("--classes", {type = "integer", default = 150,
              help = "classes for the seg384 figure (segtrain uses --prompts)"})
parser:flag("--recompute", {help = "train figures: recompute activations in the backward"})
parser:option("--gemm-paths", {metavar = "LIST",
              help = "run the GEMM figures once per CLHCLIP_GEMM path (e.g. host,ocl,clblast), " ..
                  "each path in its own process, alternating over --rounds; one table"})
parser:option("--rounds", {type = "integer", default = 1,
              help = "--gemm-paths: rounds over the paths (the table takes the median)"})
parser:option("--lua-results", {metavar = "FILE",
              help = "also write the results as a Lua table (used by --gemm-paths)"})
parser:option("--platform", {metavar = "P", help = "OpenCL platform index or name substring"})
parser:option("--device", {metavar = "D", help = "OpenCL device index or name substring"})

-- GEMM figures, C[M,N] = A[M,K] * W[N,K]^T (a linear layer; names are M x K x N), and the
-- attention products of ViT-B/16 at 384 for all 12 heads, each head one matmul of views.
local GEMMS = {
    {name = "gemm 577x768x768 (ViT-B/16 384 qkv/out proj)", m = 577, k = 768, n = 768},
    {name = "gemm 577x768x3072 (ViT-B/16 384 MLP fc1)", m = 577, k = 768, n = 3072},
    {name = "gemm 577x3072x768 (ViT-B/16 384 MLP fc2)", m = 577, k = 3072, n = 768},
    {name = "gemm 13167x512x512 (text, 171 prompts x 77)", m = 13167, k = 512, n = 512},
    {name = "gemm 12x 577x64x577 (ViT-B/16 384 q k^T)", m = 577, k = 64, n = 577, heads = 12},
    {name = "gemm 12x 577x577x64 (ViT-B/16 384 p v)", m = 577, k = 577, n = 64, heads = 12,
     plain_b = true},
}

local function median(xs)
    local s = {}
    for i, v in ipairs(xs) do s[i] = v end
    table.sort(s)
    local n = #s
    return n % 2 == 1 and s[(n + 1) // 2] or (s[n // 2] + s[n // 2 + 1]) / 2, s[1], s[n]
end

-- Runs fn (which must wait for the device) warmup + runs times.
local function measure(ctx, clh, opts, fn)
    local b0, t0 = ctx:build_seconds(), clh.now()
    fn()
    local first = clh.now() - t0
    local build = ctx:build_seconds() - b0
    for _ = 2, opts.warmup do fn() end
    local times = {}
    for i = 1, opts.runs do
        local t = clh.now()
        fn()
        times[i] = clh.now() - t
    end
    local med, lo, hi = median(times)
    return {first_s = first, build_s = build, median_s = med, min_s = lo, max_s = hi,
            runs = opts.runs, peak_device_bytes = ctx:peak_device_bytes()}
end

local function report(r)
    local extra = r.gflops and string.format("  %.1f GFLOP/s", r.gflops) or ""
    print(string.format("%-48s median %9.3f ms (min %9.3f, max %9.3f)%s", r.name,
                        r.median_s * 1e3, r.min_s * 1e3, r.max_s * 1e3, extra))
    print(string.format("%-48s first call %.3f s, of which clBuildProgram %.3f s; peak device " ..
                            "memory so far %.1f MiB", "", r.first_s, r.build_s,
                        r.peak_device_bytes / 2 ^ 20))
end

-- One figure: heads products C_h = A_h * op(B_h), each A_h [M,K] and B_h [N,K] (or [K,N]
-- with plain_b) a view of one tensor.
local function bench_gemm(ctx, clh, opts, out)
    for _, g in ipairs(GEMMS) do
        clh.manual_seed(1)
        local heads = g.heads or 1
        local b_shape = g.plain_b and {g.k, g.n} or {g.n, g.k}
        local a = clh.randn({heads * g.m, g.k}, 1, ctx)
        local w = clh.randn({heads * b_shape[1], b_shape[2]}, 0.02, ctx)
        local av, wv = {}, {}
        for h = 1, heads do
            av[h] = a:view({g.m, g.k}, (h - 1) * g.m * g.k)
            wv[h] = w:view(b_shape, (h - 1) * g.n * g.k)
        end
        local r = measure(ctx, clh, opts, function()
            for h = 1, heads do
                local c = clh.matmul(av[h], wv[h], {trans_b = not g.plain_b})
                c:free()
            end
            ctx:finish()
        end)
        r.id = string.format("gemm_%s%dx%dx%d", heads > 1 and heads .. "x" or "", g.m, g.k, g.n)
        r.name, r.m, r.n, r.k, r.heads = g.name, g.m, g.n, g.k, heads
        r.gflops = 2 * heads * g.m * g.n * g.k / r.median_s / 1e9
        out[#out + 1] = r
        report(r)
        a:free()
        w:free()
    end
end

local function shell_quote(s)
    return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- --gemm-paths: CLHCLIP_GEMM is read at every GEMM call, so one context could switch paths,
-- but Lua cannot set environment variables; one child process per path also keeps OpenBLAS's
-- spinning worker threads (host path) out of the other paths' timings (toolchain.md 9.6).
-- Paths alternate within each round; the table shows the median over rounds of each
-- figure's median.
local function compare_gemm_paths(opts)
    local paths_list = {}
    for p in opts.gemm_paths:gmatch("[^,%s]+") do paths_list[#paths_list + 1] = p end
    local results = {} -- results[path][id] = list of {median_s, gflops}
    local names, order = {}, {}
    local tmp = os.tmpname()
    for round = 1, opts.rounds do
        for _, p in ipairs(paths_list) do
            local cmd = string.format("CLHCLIP_GEMM=%s %s %s --what gemm --runs %d --warmup %d " ..
                                          "--lua-results %s", shell_quote(p), shell_quote(arg[-1]),
                                      shell_quote(arg[0]), opts.runs, opts.warmup,
                                      shell_quote(tmp))
            if opts.platform then cmd = cmd .. " --platform " .. shell_quote(opts.platform) end
            if opts.device then cmd = cmd .. " --device " .. shell_quote(opts.device) end
            print(string.format("-- round %d, CLHCLIP_GEMM=%s", round, p))
            io.stdout:flush()
            if not os.execute(cmd) then error("child benchmark failed: " .. cmd, 0) end
            local rs = dofile(tmp)
            results[p] = results[p] or {}
            for _, r in ipairs(rs) do
                if not names[r.id] then
                    names[r.id] = r.name
                    order[#order + 1] = r.id
                end
                results[p][r.id] = results[p][r.id] or {}
                table.insert(results[p][r.id], r)
            end
        end
    end
    os.remove(tmp)
    local header = string.format("%-44s", "GEMM figure (median of per-round medians)")
    for _, p in ipairs(paths_list) do header = header .. string.format(" | %-21s", p) end
    print(header)
    for _, id in ipairs(order) do
        local line = string.format("%-44s", names[id]:sub(1, 44))
        for _, p in ipairs(paths_list) do
            local rs = results[p] and results[p][id] or {}
            local ms, gf = {}, {}
            for i, r in ipairs(rs) do ms[i], gf[i] = r.median_s * 1e3, r.gflops end
            if #ms > 0 then
                line = line .. string.format(" | %8.2f ms %6.1f GF/s", median(ms), median(gf))
            else
                line = line .. string.format(" | %-21s", "-")
            end
        end
        print(line)
    end
end

local function lua_literal(v)
    if type(v) == "table" then
        local parts = {}
        for k2, x in pairs(v) do
            parts[#parts + 1] = "[" .. lua_literal(k2) .. "] = " .. lua_literal(x)
        end
        return "{" .. table.concat(parts, ", ") .. "}"
    elseif type(v) == "string" then
        return string.format("%q", v)
    end
    return string.format(math.type(v) == "integer" and "%d" or "%.17g", v)
end

-- Attention core of one ViT-B/16 layer at 384x384: 12 heads, 577 tokens, head dim 64, as
-- the public ops compose it per head: softmax(q k^T / 8) v.
local function bench_attention(ctx, clh, opts, out)
    local heads, len, hd = 12, 577, 64
    clh.manual_seed(2)
    local q, k, v = clh.randn({heads * len, hd}, 1, ctx), clh.randn({heads * len, hd}, 1, ctx),
                    clh.randn({heads * len, hd}, 1, ctx)
    local qh, kh, vh = {}, {}, {}
    for h = 1, heads do
        local off = (h - 1) * len * hd
        qh[h], kh[h], vh[h] = q:view({len, hd}, off), k:view({len, hd}, off), v:view({len, hd}, off)
    end
    local r = measure(ctx, clh, opts, function()
        for h = 1, heads do
            local s = clh.matmul(qh[h], kh[h], {trans_b = true})
            local p = clh.softmax(s, 1 / math.sqrt(hd))
            local o = clh.matmul(p, vh[h])
            s:free()
            p:free()
            o:free()
        end
        ctx:finish()
    end)
    r.id = "attention384"
    r.name = "attention ViT-B/16 384 (12 heads x 577, per head)"
    out[#out + 1] = r
    report(r)
end

local function bench_vit(ctx, clh, opts, out, model, size)
    local px = clh.tensor({1, 3, size, size}, 0.1, ctx)
    local r = measure(ctx, clh, opts, function()
        local o = model:encode_image(px, {pooled = true, dense = true})
        o.dense:totable() -- waits for the device
        o.dense:free()
        o.pooled:free()
    end)
    r.id = "vit" .. size
    r.name = string.format("vit%d ViT-B/16 image encoder %dx%d (pooled+dense)", size, size, size)
    out[#out + 1] = r
    report(r)
    px:free()
end

local function bench_text(ctx, clh, opts, out, model)
    -- Fixed pseudo-random prompts of 6-20 tokens, each padded with 0 to the full context
    -- of 77 as the tokenizer does, so every prompt costs 77 positions (171 x 77 = 13167 rows).
    local ids, seed = {}, 12345
    for i = 1, opts.prompts do
        local row = {49406}
        seed = (seed * 1103515245 + 12345) % 2147483648
        for _ = 1, 6 + seed % 15 do
            seed = (seed * 1103515245 + 12345) % 2147483648
            row[#row + 1] = 1000 + seed % 40000
        end
        row[#row + 1] = 49407
        while #row < 77 do row[#row + 1] = 0 end
        ids[i] = row
    end
    local r = measure(ctx, clh, opts, function()
        local t = model:encode_text(ids)
        t:totable()
        t:free()
    end)
    r.id = "text"
    r.name = string.format("text encoder, %d prompts", opts.prompts)
    out[#out + 1] = r
    report(r)
end


-- Token id rows: SOT, 6-20 pseudo-random ids below eot, EOT, zero padding to `context`.
local function prompt_ids(n, context, sot, eot)
    local ids, seed = {}, 12345
    for i = 1, n do
        local row = {sot}
        seed = (seed * 1103515245 + 12345) % 2147483648
        for _ = 1, math.min(6 + seed % 15, context - 2) do
            seed = (seed * 1103515245 + 12345) % 2147483648
            row[#row + 1] = 1 + seed % (eot - 2)
        end
        row[#row + 1] = eot
        while #row < context do row[#row + 1] = 0 end
        ids[i] = row
    end
    return ids
end

-- One H-CLIP training step: forward of both towers (CAT-Seg dense output, two hooked
-- blocks, text features), backward from constant output gradients, AdamW step, update.
local function bench_train(ctx, clh, opts, out, model, id, size, block, hooks, n_prompts)
    local cfg = model:config()
    local hc = clh.hclip(model, {block_size = block, recompute = opts.recompute})
    local adam = clh.adamw(ctx)
    local group = adam:add_group {lr = 2e-6, weight_decay = 1e-4}
    local params, grads = hc:parameters()
    for i = 1, #params do adam:add(group, params[i], grads[i]) end
    local px = clh.tensor({1, 3, size, size}, 0.1, ctx)
    local ids = prompt_ids(n_prompts, cfg.max_positions, cfg.vocab_size - 2, cfg.eos_token_id)
    local request = {pooled = false, dense = true, dense_last_layer = true, hooks = hooks}
    local r = measure(ctx, clh, opts, function()
        hc:zero_grad()
        local o = hc:forward(px, request, ids, {train = true})
        local g = {dense = clh.tensor(o.dense:shape(), 1e-3, ctx),
                   text = clh.tensor(o.text:shape(), 1e-3, ctx), hooks = {}}
        for _, b in ipairs(hooks) do g.hooks[b] = clh.tensor(o.hooks[b]:shape(), 1e-3, ctx) end
        hc:backward(g)
        adam:step()
        hc:update()
        grads[1]:totable() -- waits for the device
    end)
    r.id = id
    r.name = string.format("%s training step %dx%d + %d prompts%s", id, size, size, n_prompts,
                           opts.recompute and " (recompute)" or "")
    out[#out + 1] = r
    report(r)
    px:free()
    adam:free()
    hc:free()
end

-- Class names "class 1" .. "class n" (the default tokenizer needs the CLIP vocabulary).
local function class_names(n)
    local names = {}
    for i = 1, n do names[i] = "class " .. i end
    return names
end

-- Segmentation inference on one 384x384 image, single view (CLIP + CAT-Seg head with the
-- ViT-B configuration + upsampling and argmax on the host); the text is cached after the
-- warm-up call, as in eval.lua.
local function bench_seg(ctx, clh, opts, out, model)
    local m = clh.segmodel(model, {image_size = 384})
    m:set_classes(class_names(opts.classes))
    local bytes = {}
    for i = 1, 384 * 384 do bytes[i] = string.char(i % 251, i % 241, i % 239) end
    local img = clh.image_from_rgb8(table.concat(bytes), 384, 384)
    local r = measure(ctx, clh, opts, function() m:predict(img, {sliding = false}) end)
    r.id = "seg384"
    r.name = string.format("segmentation 384x384 (%d classes, one view)", opts.classes)
    out[#out + 1] = r
    report(r)
    img:free()
    m:free()
end

-- One segmentation training step (adapters + head, batch 1, crop 384, --prompts classes,
-- class-attention pooling 2): forward, BCE loss, backward through head and both towers,
-- AdamW step.
local function bench_segtrain(ctx, clh, opts, out, model)
    local m = clh.segmodel(model, {image_size = 384,
                                   adapter = {block_size = 128, recompute = opts.recompute}})
    m:set_classes(class_names(opts.prompts))
    local dir = os.tmpname()
    os.remove(dir)
    clh.make_procedural_dataset {dir = dir, n = 2, size = 384, seed = 1}
    local loader = clh.dataset(dir):loader {batch = 1, crop = 384, seed = 1, threads = 1}
    local opt = require("clhclip.segtrain").optimizer(clh, m, {lr = 2e-4})
    local r = measure(ctx, clh, opts, function()
        local b = loader:next()
        opt:zero_grad()
        m:train_step(b)
        opt:clip_grad_norm(0.01)
        opt:step()
        m:update()
        b:free()
        ctx:finish()
    end)
    r.id = "segtrain"
    r.name = string.format("segmentation training step 384 + %d classes%s", opts.prompts,
                           opts.recompute and " (recompute)" or "")
    out[#out + 1] = r
    report(r)
    loader:free()
    opt:free()
    m:free()
    os.execute("rm -rf '" .. dir .. "'")
end

local ARRAY = {} -- metatable marking a table that is written as a JSON array even when empty

local function json_value(v)
    if type(v) == "string" then
        return '"' .. v:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end) ..
                   '"'
    elseif math.type(v) == "integer" then
        return tostring(v)
    elseif type(v) == "number" then
        return string.format("%.9g", v)
    elseif type(v) == "table" then
        local parts = {}
        if #v > 0 or getmetatable(v) == ARRAY then
            for _, x in ipairs(v) do parts[#parts + 1] = json_value(x) end
            return "[" .. table.concat(parts, ", ") .. "]"
        end
        local keys = {}
        for key in pairs(v) do keys[#keys + 1] = key end
        table.sort(keys)
        for _, key in ipairs(keys) do parts[#parts + 1] = json_value(key) .. ": " .. json_value(v[key]) end
        return "{" .. table.concat(parts, ", ") .. "}"
    end
    return tostring(v)
end

argparse.main(function()
    local opts = parser:parse(arg)
    if opts.runs < 1 then error("--runs must be at least 1", 0) end
    if opts.warmup < 1 then error("--warmup must be at least 1", 0) end
    if opts.gemm_paths then
        if opts.rounds < 1 then error("--rounds must be at least 1", 0) end
        return compare_gemm_paths(opts)
    end
    local want = {}
    for item in opts.what:gmatch("[^,%s]+") do
        if item == "all" then
            for _, w in ipairs(ALL) do want[w] = true end
        else
            local known = false
            for _, w in ipairs(ALL) do known = known or w == item end
            if not known then
                error(string.format("--what: unknown item '%s' (known: %s, all)", item,
                                    table.concat(ALL, ",")), 0)
            end
            want[item] = true
        end
    end
    local clh = paths.clhclip()
    local ctx = clh.init {platform = opts.platform, device = opts.device}
    local dev = ctx:device()
    local gemm_path = os.getenv("CLHCLIP_GEMM") or "auto"
    local attention_path = os.getenv("CLHCLIP_ATTENTION") or "auto"
    print(string.format("device: %s (%s, %s, %d compute units); GEMM path: CLHCLIP_GEMM=%s; " ..
                            "attention: CLHCLIP_ATTENTION=%s", dev.name, dev.type, dev.driver,
                        dev.compute_units, gemm_path, attention_path))
    print(string.format("runs %d after %d warm-up call(s); times wait for the device",
                        opts.runs, opts.warmup))
    local out = {}
    if want.gemm then bench_gemm(ctx, clh, opts, out) end
    if want.attention then bench_attention(ctx, clh, opts, out) end
    if want["train-tiny"] then
        local tiny = clh.load_clip(paths.repo .. "/tests/fixtures/clip_tiny_p8", ctx)
        bench_train(ctx, clh, opts, out, tiny, "train-tiny", 48, 16, {0, 1}, 8)
        tiny:free()
    end
    if want.vit224 or want.vit384 or want.text or want.train or want.seg384 or want.segtrain then
        if not opts.model then
            print("SKIP vit224/vit384/text/train/seg384/segtrain: no --model DIR given (make a random ViT-B/16 one " ..
                      "with: python3 tests/reference/make_clip_fixtures.py --config vitb16_384 " ..
                      "--out /tmp/vitb16)")
        else
            local t0 = clh.now()
            local model = clh.load_clip(opts.model, ctx)
            print(string.format("loaded %s in %.2f s", opts.model, clh.now() - t0))
            if want.vit224 then bench_vit(ctx, clh, opts, out, model, 224) end
            if want.vit384 then bench_vit(ctx, clh, opts, out, model, 384) end
            if want.text then bench_text(ctx, clh, opts, out, model) end
            if want.train then
                bench_train(ctx, clh, opts, out, model, "train", 384, 128, {3, 7}, opts.prompts)
            end
            if want.seg384 then bench_seg(ctx, clh, opts, out, model) end
            if want.segtrain then bench_segtrain(ctx, clh, opts, out, model) end
            model:free()
        end
    end
    print(string.format("clBuildProgram total %.3f s; peak device memory %.1f MiB",
                        ctx:build_seconds(), ctx:peak_device_bytes() / 2 ^ 20))
    if opts.lua_results then
        local f = assert(io.open(opts.lua_results, "w"))
        f:write("return ", lua_literal(out), "\n")
        f:close()
    end
    if opts.json then
        local results = setmetatable({}, ARRAY)
        for _, r in ipairs(out) do results[#results + 1] = r end
        local doc = {device = dev.name, device_type = dev.type, driver = dev.driver,
                     gemm_path = gemm_path, attention_path = attention_path, runs = opts.runs,
                     warmup = opts.warmup,
                     build_seconds = ctx:build_seconds(),
                     peak_device_bytes = ctx:peak_device_bytes(), results = results}
        local f = assert(io.open(opts.json, "w"))
        f:write(json_value(doc), "\n")
        f:close()
        print("wrote " .. opts.json)
    end
end)

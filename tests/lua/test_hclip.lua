-- H-CLIP training from Lua (clh.hclip, clh.adamw, clhclip.nn, clhclip.optim) on the tiny
-- fixture model clip_tiny_p8 (vision 64 wide, text 48 wide: block size 16).
local h = require "helpers"
local clh = h.clh
local nn = require "clhclip.nn"
local optim = require "clhclip.optim"
local T = h.suite()

local Q = 16

local function load_model()
    h.ctx()
    return clh.load_clip(h.fixture("clip_tiny_p8"))
end

-- Three token id rows of the model's full context (as tests/test_hclip.c), and two images.
local function make_inputs(m)
    local c = m:config()
    local rows = {}
    for r = 0, 2 do
        local row = {}
        for j = 0, c.max_positions - 1 do row[j + 1] = 0 end
        for j = 0, 3 + r do row[j + 1] = 1 + (r * 37 + j * 11) % (c.vocab_size - 2) end
        row[5 + r] = c.eos_token_id
        rows[r + 1] = row
    end
    clh.manual_seed(11)
    local pixels = clh.randn({2, 3, c.image_size, c.image_size})
    return {pixels = pixels, texts = rows}
end

-- Add N(0, scale^2) noise to every trainable tensor, then rebuild the transforms.
local function perturb(hc, scale)
    local params = hc:parameters()
    for _, p in ipairs(params) do
        local v, noise = p:totable(), clh.randn(p:shape(), scale):totable()
        for i = 1, #v do v[i] = v[i] + noise[i] end
        p:copy(v)
    end
    hc:update()
end

-- 0.5 |out - target|^2 and its gradient as a tensor.
local function mse(out, target)
    local y = out:totable()
    local loss = 0
    for i = 1, #y do
        local d = y[i] - target[i]
        y[i] = d
        loss = loss + 0.5 * d * d
    end
    return loss, clh.tensor(out:shape(), y)
end

local DENSE = {pooled = false, dense = true}

-- Targets: the outputs of the same model under other, random adapters (reachable).
local function make_targets(m, input)
    local teacher <close> = clh.hclip(m, {block_size = Q})
    clh.manual_seed(77)
    perturb(teacher, 0.1)
    local out = teacher:forward(input.pixels, DENSE, input.texts, {train = false})
    return {dense = out.dense:totable(), text = out.text:totable()}
end

-- feval for clhclip.optim: loss of the dense and text outputs, gradients via backward.
local function make_feval(net, input, targets)
    local _, grads = net:parameters()
    return function()
        net:zeroGradParameters()
        local out = net:forward(input)
        local l1, dd = mse(out.dense, targets.dense)
        local l2, dt = mse(out.text, targets.text)
        net:backward(input, {dense = dd, text = dt})
        return l1 + l2, grads
    end
end

local function totables(list)
    local out = {}
    for i, t in ipairs(list) do out[i] = t:totable() end
    return out
end

-- ------------------------------------------------------------------ identity

function T.identity_at_init_matches_plain_model()
    local m = load_model()
    local input = make_inputs(m)
    local req = {pooled = true, dense = true, hooks = {1}}
    local plain = m:encode_image(input.pixels, req)
    local plain_text = m:encode_text(input.texts)
    for _, ortho in ipairs({"text", "both", "none", "vision"}) do
        local hc <close> = clh.hclip(m, {block_size = Q, ortho = ortho})
        for _, train in ipairs({false, true}) do
            local out = hc:forward(input.pixels, req, input.texts, {train = train})
            local where = ortho .. (train and " train" or " eval")
            h.same(out.pooled:totable(), plain.pooled:totable(), where .. " pooled")
            h.same(out.dense:totable(), plain.dense:totable(), where .. " dense")
            h.same(out.hooks[1]:totable(), plain.hooks[1]:totable(), where .. " hook 1")
            h.same(out.text:totable(), plain_text:totable(), where .. " text")
        end
    end
    -- the nn module gives the same, with strings tokenized like encode_text's
    local tok <close> = clh.tokenizer(h.fixture("tokenizer/tiny_merges.txt.gz"))
    local net = nn.HCLIP(m, {block_size = Q, request = {pooled = true}, text = {tokenizer = tok}})
    local words = {"a photo of a cat", "a dog"}
    local out = net:forward({pixels = input.pixels, texts = words})
    h.same(out.pooled:totable(), plain.pooled:totable(), "nn.HCLIP pooled")
    h.same(out.text:totable(), m:encode_text(words, {tokenizer = tok}):totable(), "nn.HCLIP text")
    h.eq(out.dense, nil, "dense output (not requested)")
    -- one tower only
    local only_text = net:forward({texts = input.texts})
    h.eq(only_text.pooled, nil, "pooled without pixels")
    h.same(only_text.text:totable(), plain_text:totable(), "text-only forward")
    net:free()
end

-- ------------------------------------------------------------------ parameters

function T.parameters_shapes_and_names()
    local m = load_model()
    local c = m:config()
    local layers = math.max(c.text.layers, c.vision.layers)
    local mblocks = c.text.hidden // Q + c.vision.hidden // Q
    local slots = 4 * layers
    local hc = clh.hclip(m, {block_size = Q})
    local lay = hc:layout()
    h.eq(lay.block_size, Q, "layout.block_size")
    h.eq(lay.text_blocks, c.text.hidden // Q, "layout.text_blocks")
    h.eq(lay.vision_blocks, c.vision.hidden // Q, "layout.vision_blocks")
    h.eq(lay.n_blocks, 4 * (c.text.layers * lay.text_blocks + c.vision.layers * lay.vision_blocks),
         "layout.n_blocks")
    h.eq(lay.ortho, "text", "layout.ortho (default)")
    h.same(hc:param_names(), {"hclip.P", "hclip.A", "hclip.B"}, "param names")
    local params, grads = hc:parameters()
    local want = {{Q, Q, slots, mblocks}, {layers, mblocks, mblocks}, {slots, slots}}
    h.eq(#params, 3, "#params")
    h.eq(#grads, 3, "#grads")
    for i = 1, 3 do
        h.same(params[i]:shape(), want[i], "params[" .. i .. "] shape")
        h.same(grads[i]:shape(), want[i], "grads[" .. i .. "] shape")
    end
    -- identity initialisation: A and B are identity matrices, P's text blocks 0 (Cayley)
    local b = params[3]:totable()
    for i = 1, slots do
        for j = 1, slots do h.eq(b[(i - 1) * slots + j], i == j and 1 or 0, "B") end
    end
    -- the same Tensor objects come back, and they are the library's own memory: a
    -- change to P reaches the outputs after update()
    local params2, grads2 = hc:parameters()
    for i = 1, 3 do
        h.truthy(rawequal(params[i], params2[i]) and rawequal(grads[i], grads2[i]),
                 "parameters() returns the same tensors")
    end
    local input = make_inputs(m)
    local before = hc:forward(input.pixels, nil, nil, {train = false}).pooled:totable()
    clh.manual_seed(3)
    perturb(hc, 0.05)
    local after = hc:forward(input.pixels, nil, nil, {train = false}).pooled:totable()
    local err = h.max_abs_err(after, before)
    h.truthy(err > 1e-4, "perturbed P, A, B change the output (max change " .. err .. ")")
    -- switched-off maps are left out
    local lean = clh.hclip(m, {block_size = Q, modality_map = false, layer_map = false})
    h.same(lean:param_names(), {"hclip.P"}, "names without A and B")
    h.eq(lean:layout().modality_map, false, "layout.modality_map")
    local p_only = lean:parameters()
    h.eq(#p_only, 1, "#params without A and B")
    lean:free()
    -- a parameter tensor keeps its H-CLIP alive, and outlives an explicit free
    local orphan = (function()
        local tmp = clh.hclip(m, {block_size = Q})
        return (tmp:parameters())[2]
    end)()
    collectgarbage("collect")
    h.eq(orphan:numel(), layers * mblocks * mblocks, "orphan parameter numel")
    hc:free()
    h.eq(#params[1]:totable(), Q * Q * slots * mblocks, "P readable after the H-CLIP was freed")
end

-- ------------------------------------------------------------------ training

function T.training_loop_loss_falls()
    local m = load_model()
    local input = make_inputs(m)
    input.request = DENSE
    local targets = make_targets(m, input)
    local net = nn.HCLIP(m, {block_size = Q})
    local params = net:parameters()
    local feval = make_feval(net, input, targets)
    local config = {lr = 1e-2, weight_decay = 1e-4, max_grad_norm = 10,
                    schedule = optim.cosine(60, 3)}
    local state = {}
    local losses = {}
    for step = 1, 30 do
        local _, fx = optim.adamw(feval, params, config, state)
        net:updateTransforms()
        losses[step] = fx[1]
    end
    h.eq(state.t, 30, "state.t")
    h.truthy(state.grad_norm and state.grad_norm > 0, "state.grad_norm is recorded")
    local function window(a, b)
        local s = 0
        for i = a, b do s = s + losses[i] end
        return s / (b - a + 1)
    end
    local w1, w2, w3 = window(1, 10), window(11, 20), window(21, 30)
    h.truthy(w2 < w1 and w3 < w2, string.format("loss windows fall: %.4g %.4g %.4g", w1, w2, w3))
    h.truthy(losses[30] < 0.5 * losses[1],
             string.format("loss %.4g -> %.4g falls by half", losses[1], losses[30]))
    -- feval must hand back the same gradient tensors
    h.raises("another tensor for grads[1]", optim.adamw,
             function() return 0, {clh.tensor({1}), clh.tensor({1}), clh.tensor({1})} end,
             params, config, state)
    net:free()
end

-- N steps equal K steps + save + load into fresh objects + (N - K) steps, bit for bit.
function T.save_load_resume_is_bit_identical()
    local N, K = 6, 3
    local m = load_model()
    local input = make_inputs(m)
    input.request = DENSE
    local targets = make_targets(m, input)
    local function config()
        return {lr = 5e-3, weight_decay = 1e-4, max_grad_norm = 10, schedule = optim.cosine(20, 2)}
    end
    local function run(net, cfg, state, steps)
        local params = net:parameters()
        local feval = make_feval(net, input, targets)
        for _ = 1, steps do
            optim.adamw(feval, params, cfg, state)
            net:updateTransforms()
        end
    end
    local a = nn.HCLIP(m, {block_size = Q})
    run(a, config(), {}, N)

    local path = h.tmpname(".safetensors")
    local b = nn.HCLIP(m, {block_size = Q})
    local state_b = {}
    run(b, config(), state_b, K)
    clh.manual_seed(5)
    clh.randn({3})
    local rng = clh.rng_state()
    b:save(path, {optimizer = state_b, step = K, extra = '{"note":"lua"}'})
    b:free()
    state_b.optimizer:free()

    clh.manual_seed(99) -- load must bring the saved generator back
    local c = nn.HCLIP(m, {block_size = Q})
    local params_c, grads_c = c:parameters()
    local cfg_c = config()
    local state_c = optim.adamw_init(params_c, grads_c, cfg_c, {})
    local info = c:load(path, {optimizer = state_c})
    h.eq(info.step, K, "loaded step")
    h.eq(info.optimizer_steps, K, "loaded optimizer steps")
    h.eq(info.extra, '{"note":"lua"}', "loaded extra metadata")
    h.eq(info.rng.seed, rng.seed, "loaded rng seed")
    h.eq(info.rng.counter, rng.counter, "loaded rng counter")
    local now = clh.rng_state()
    h.eq(now.seed, rng.seed, "default RNG seed restored")
    h.eq(now.counter, rng.counter, "default RNG counter restored")
    run(c, cfg_c, state_c, N - K)
    local pa, pc = totables((a:parameters())), totables(params_c)
    for i = 1, #pa do h.same(pc[i], pa[i], "parameter " .. i .. " after resume") end
    -- a checkpoint without training state restores nothing else
    local path2 = h.tmpname(".safetensors")
    c:save(path2, {rng = false})
    local info2 = c:load(path2)
    h.eq(info2.step, nil, "no step without training state")
    h.eq(info2.rng, nil, "no rng without training state")
    -- another adapter configuration is refused with the library's message
    local other = clh.hclip(m, {block_size = 8})
    h.raises("adapter configuration", other.load, other, path)
    h.raises("/nonexistent/ckpt.safetensors", other.load, other, "/nonexistent/ckpt.safetensors")
    other:free()
    os.remove(path)
    os.remove(path2)
    a:free()
    c:free()
end

-- Two parameter groups: a group with lr 0 stays put (but for weight decay: 0 here too).
function T.adamw_object_with_param_groups()
    local m = load_model()
    local input = make_inputs(m)
    input.request = DENSE
    local targets = make_targets(m, input)
    local net = nn.HCLIP(m, {block_size = Q})
    local params, grads = net:parameters()
    local opt = optim.AdamW({{params = {params[1]}, grads = {grads[1]}, lr = 1e-2},
                             {params = {params[2], params[3]}, grads = {grads[2], grads[3]},
                              lr = 0}}, {weight_decay = 0})
    h.eq(opt.param_groups[2].weight_decay, 0, "config default reaches the groups")
    h.eq(opt.param_groups[1].betas[2], optim.defaults.betas[2], "betas default")
    local before = totables(params)
    local feval = make_feval(net, input, targets)
    local loss = opt:step(feval)
    net:updateTransforms()
    h.truthy(loss > 0, "step(closure) returns the loss")
    h.eq(opt:steps(), 1, "steps")
    local after = totables(params)
    h.truthy(h.max_abs_err(after[1], before[1]) > 0, "group 1 (lr 1e-2) moved")
    h.same(after[2], before[2], "group 2 (lr 0): A unchanged")
    h.same(after[3], before[3], "group 2 (lr 0): B unchanged")
    opt.param_groups[2].lr = 1e-2 -- applies from the next step
    opt:zero_grad()
    opt:step(feval)
    h.truthy(h.max_abs_err(totables(params)[3], before[3]) > 0, "B moves once its lr is set")
    h.near(opt.optimizer:group(2).lr, 1e-2, 1e-9, "device group lr")
    opt:free()
    opt:free()
    net:free()
end

function T.cosine_schedule()
    local total, warmup = 10, 2
    local f = optim.cosine(total, warmup)
    for t = 0, total + 1 do
        local want
        if t < warmup then
            want = t / warmup
        elseif t >= total then
            want = 0
        else
            want = 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
        end
        h.near(f(t), want, 1e-6, "schedule(" .. t .. ")")
        h.near(clh.cosine_schedule(t, total, warmup), want, 1e-6, "cosine_schedule " .. t)
    end
    h.raises("total", optim.cosine, 0)
    h.raises("warmup", clh.cosine_schedule, 1, 10, 11)
end

-- ------------------------------------------------------------------ HE term, folding

function T.he_drift_and_loss()
    local m = load_model()
    local c = m:config()
    local hc = clh.hclip(m, {block_size = Q, ortho = "text"})
    local d0 = hc:he_drift()
    h.eq(#d0.text, c.text.layers, "text layers in drift")
    h.eq(#d0.vision, c.vision.layers, "vision layers in drift")
    for _, tower in ipairs({"text", "vision"}) do
        for _, l in ipairs(d0[tower]) do
            h.eq(#l, 4, "q, k, v, o per layer")
            for t = 1, 4 do h.near(l[t], 0, 1e-6, tower .. " drift at init") end
        end
    end
    clh.manual_seed(9)
    perturb(hc, 0.2)
    local d = hc:he_drift(1)
    local text_max, vision_max = 0, 0
    for _, l in ipairs(d.text) do for t = 1, 4 do text_max = math.max(text_max, math.abs(l[t])) end end
    for _, l in ipairs(d.vision) do
        for t = 1, 4 do vision_max = math.max(vision_max, math.abs(l[t])) end
    end
    h.truthy(text_max <= 1e-4, "orthogonal (text) transforms keep HE: " .. text_max)
    h.truthy(vision_max > 1e-4, "free (vision) transforms change HE: " .. vision_max)
    hc:he_loss{lambda = 1e-2, text = false, vision = true, first = 1}
    local input = make_inputs(m)
    local out = hc:forward(input.pixels, DENSE)
    hc:zero_grad()
    hc:backward{dense = clh.tensor(out.dense:shape(), 0)}
    h.truthy(hc:he_loss_value() > 0, "HE loss value after backward")
    local _, grads = hc:parameters()
    local gmax = 0
    for _, v in ipairs(grads[1]:totable()) do gmax = math.max(gmax, math.abs(v)) end
    h.truthy(gmax > 0, "the HE term alone gives P a gradient")
    hc:he_loss{lambda = 0}
    h.raises("last layer", hc.he_loss, hc, {lambda = 1, first = 2, last = 1})
    hc:free()
end

function T.export_folded_matches()
    local m = load_model()
    local input = make_inputs(m)
    local hc = clh.hclip(m, {block_size = Q})
    clh.manual_seed(21)
    perturb(hc, 0.1)
    local dir = h.tmpname("-folded")
    hc:export_folded(dir)
    local folded = clh.load_clip(dir)
    local req = {pooled = true, dense = true}
    local a = hc:forward(input.pixels, req, input.texts, {train = false})
    local b = folded:encode_image(input.pixels, req)
    local err, mag = h.max_abs_err(b.dense:totable(), a.dense:totable())
    h.truthy(err <= 1e-5 * mag, "folded dense: " .. err .. " vs " .. mag)
    err, mag = h.max_abs_err(folded:encode_text(input.texts):totable(), a.text:totable())
    h.truthy(err <= 1e-5 * mag, "folded text: " .. err .. " vs " .. mag)
    folded:free()
    os.remove(dir .. "/model.safetensors")
    os.remove(dir .. "/config.json")
    os.remove(dir)
    hc:free()
end

-- ------------------------------------------------------------------ RNG

function T.manual_seed_reproducible()
    h.ctx()
    clh.manual_seed(42)
    local a = clh.randn({1001}):totable()
    local b = clh.randn({1001}):totable()
    clh.manual_seed(42)
    local c = clh.randn({1001}):totable()
    h.same(c, a, "same seed, same numbers")
    h.truthy(h.max_abs_err(a, b) > 0, "the generator advances")
    clh.manual_seed(42)
    local half = clh.randn({1001}, 0.5):totable()
    for i = 1, #a do h.eq(half[i], 0.5 * a[i], "std 0.5 scales") end
    local mean, sq = 0, 0
    for i = 1, #a do
        mean = mean + a[i] / #a
        sq = sq + a[i] * a[i] / #a
    end
    h.near(mean, 0, 0.1, "mean of N(0,1) draws")
    h.near(math.sqrt(sq - mean * mean), 1, 0.1, "std of N(0,1) draws")
    local st = clh.rng_state()
    local x = clh.randn({2, 3}):totable()
    clh.set_rng_state(st)
    h.same(clh.randn({2, 3}):totable(), x, "set_rng_state replays")
    clh.set_rng_state{seed = st.seed, counter = st.counter + 2}
    local y = clh.randn({4}):totable()
    h.same({y[1], y[2]}, {x[3], x[4]}, "the counter indexes the stream (2 per pair)")
    h.raises("counter", clh.set_rng_state, {seed = 1})
    h.raises("std", clh.randn, {2}, -1)
end

-- ------------------------------------------------------------------ errors, lifetime

function T.argument_errors_are_lua_errors()
    local m = load_model()
    local input = make_inputs(m)
    h.raises("bad argument #1", clh.hclip, "model")
    h.raises("block size 20", clh.hclip, m, {block_size = 20})
    h.raises("option 'ortho'", clh.hclip, m, {block_size = Q, ortho = "diagonal"})
    h.raises("option 'block_size'", clh.hclip, m, {block_size = "big"})
    local r, err = clh.safe.hclip(m, {block_size = 20})
    h.eq(r, nil, "safe.hclip result")
    h.truthy(err:find("block size 20", 1, true), "safe.hclip message")
    local hc = clh.hclip(m, {block_size = Q})
    h.raises("no training forward is pending", hc.backward, hc, {})
    h.raises("give pixels, texts or both", hc.forward, hc)
    h.raises("pixels must be a clhclip.Tensor", hc.forward, hc, "pixels")
    h.raises("texts must be", hc.forward, hc, nil, nil, 42)
    h.raises("bad argument #2", hc.backward, hc, "grads")
    local out = hc:forward(input.pixels, {pooled = true, hooks = {1}}, input.texts)
    h.raises("gradOutput.text must be a clhclip.Tensor", hc.backward, hc, {text = "x"})
    h.raises("did not hook block 2", hc.backward, hc, {hooks = {[2] = out.hooks[1]}})
    h.raises("gradient for the pooled output has", hc.backward, hc,
             {pooled = clh.tensor({3}, 1)})
    h.raises("forward did not produce", (function()
        hc:forward(input.pixels, {pooled = true})
        return hc.backward
    end)(), hc, {dense = clh.tensor({2, 17, 40})})
    -- nn: backward needs a training forward, evaluate() mode keeps none
    local net = nn.HCLIP(m, {block_size = Q})
    h.raises("no training forward", net.backward, net, {}, {})
    net:evaluate()
    net:forward({pixels = input.pixels})
    h.raises("no training forward", net.backward, net, {}, {pooled = clh.tensor({2, 40})})
    net:training()
    h.raises("input must be a table", net.forward, net, input.pixels)
    h.raises("scale is not supported", (function()
        net:forward({pixels = input.pixels})
        return net.backward
    end)(), net, {}, {}, 0.5)
    -- optimizer arguments
    local opt = clh.adamw()
    h.raises("group 1 does not exist", opt.add, opt, 1, clh.tensor({2}), clh.tensor({2}))
    h.raises("lr must be", opt.add_group, opt, {lr = -1})
    local g = opt:add_group{lr = 1e-3}
    h.raises("param must be a clhclip.Tensor", opt.add, opt, g, {}, clh.tensor({2}))
    h.raises("does not have the shape", opt.add, opt, g, clh.tensor({2}), clh.tensor({3}))
    h.raises("betas", opt.add_group, opt, {betas = 0.9})
    h.raises("option 'optimizer'", hc.save, hc, h.tmpname(), {optimizer = 1})
    h.raises("rng=false cannot be combined with step", hc.save, hc, h.tmpname(),
             {rng = false, step = 3})
    h.raises("feval must be a function", optim.adamw, nil, {})
    h.raises("params must be a non-empty array", optim.AdamW, {}, {})
    h.raises("2 params but 1 grads", optim.AdamW, {clh.tensor({1}), clh.tensor({1})},
             {clh.tensor({1})})
    opt:free()
    hc:free()
    net:free()
end

function T.free_twice_and_lifetimes()
    h.ctx()
    local ctx = clh.init{default = false}
    local m = ctx:load_clip(h.fixture("clip_tiny_p8"))
    local hc = clh.hclip(m, {block_size = Q})
    local opt = ctx:adamw()
    local p, g = hc:parameters()
    opt:add(opt:add_group{}, p[1], g[1])
    local pixels = ctx:tensor({1, 3, 32, 32}, 0.5)
    -- the H-CLIP keeps its model and context alive
    m = nil
    ctx:free()
    collectgarbage("collect")
    local out = hc:forward(pixels, nil, nil, {train = false})
    h.same(out.pooled:shape(), {1, 40}, "forward after the context was freed")
    hc:free()
    hc:free()
    h.raises("H-CLIP was freed", hc.parameters, hc)
    h.raises("H-CLIP was freed", hc.forward, hc, pixels)
    opt:step()
    opt:free()
    opt:free()
    h.raises("optimizer was freed", opt.step, opt)
    -- explicitly freeing the base model is caught
    local m2 = clh.load_clip(h.fixture("clip_tiny_p8"))
    local hc2 = clh.hclip(m2, {block_size = Q})
    m2:free()
    h.raises("base model was freed", hc2.forward, hc2, clh.tensor({1, 3, 32, 32}))
    hc2:free()
    do
        local hc3 <close> = clh.hclip(clh.load_clip(h.fixture("clip_tiny_p8")), {block_size = Q})
        local opt3 <close> = clh.adamw()
    end
    -- freeing an H-CLIP whose training forward is pending gives the workspace back
    local m5 = clh.load_clip(h.fixture("clip_tiny_p8"))
    local px = clh.randn({2, 3, 32, 32})
    local function cycle()
        local hc5 = clh.hclip(m5, {block_size = Q})
        hc5:forward(px, {dense = true}, {{1, 2, 999}})
        hc5:free()
    end
    cycle()
    collectgarbage("collect")
    local base = clh.context():device_bytes()
    for _ = 1, 20 do cycle() end
    collectgarbage("collect")
    h.eq(clh.context():device_bytes(), base, "device bytes after 20 freed pending forwards")
    m5:free()
    -- tensors of another context are refused
    local ctx2 = clh.init{default = false}
    local m3 = clh.load_clip(h.fixture("clip_tiny_p8"))
    local hc4 = clh.hclip(m3, {block_size = Q})
    h.raises("another context", hc4.forward, hc4, ctx2:tensor({1, 3, 32, 32}))
    hc4:free()
    m3:free()
    ctx2:free()
end

return T

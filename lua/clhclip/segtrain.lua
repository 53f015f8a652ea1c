-- Training loop of a segmentation model (adapters + CAT-Seg head), shared by
-- scripts/train.lua and scripts/demo.lua (hclip-spec 5.6: AdamW, the CLIP tensors at a
-- fraction of the head's learning rate, no decay on norms and pad tokens, cosine schedule,
-- full-model gradient-norm clipping).
--
--   local segtrain = require "clhclip.segtrain"
--   local opt = segtrain.optimizer(clh, model, {lr = 2e-4, clip_lr_mult = 0.01, weight_decay = 1e-4})
--   segtrain.run{clh = clh, model = model, optimizer = opt, loader = loader, steps = N, ...}
local M = {}

-- AdamW with three groups: CLIP adapters (lr * clip_lr_mult), head, head without decay.
function M.optimizer(clh, model, o)
    local opt = clh.adamw()
    local decay = o.weight_decay or 1e-4
    local g_clip = opt:add_group {lr = o.lr * (o.clip_lr_mult or 0.01), weight_decay = decay}
    local g_head = opt:add_group {lr = o.lr, weight_decay = decay}
    local g_nodecay = opt:add_group {lr = o.lr, weight_decay = 0}
    for _, p in ipairs(model:parameters()) do
        local g = p.clip and g_clip or (p.no_decay and g_nodecay or g_head)
        opt:add(g, p.param, p.grad)
    end
    return opt
end

local function fmt_time(s)
    if s ~= s or s == math.huge then return "?" end
    s = math.floor(s + 0.5)
    if s >= 3600 then return string.format("%dh%02dm", s // 3600, s % 3600 // 60) end
    if s >= 60 then return string.format("%dm%02ds", s // 60, s % 60) end
    return string.format("%ds", s)
end
M.fmt_time = fmt_time

-- Mean IoU etc. of the model on a dataset (first `limit` samples), with progress on `out`.
function M.evaluate(clh, model, ds, o)
    o = o or {}
    local n = math.min(ds:count(), o.limit or math.huge)
    local conf = clh.confusion(model:num_classes(), {voc20b = o.voc20b})
    local t0 = clh.now()
    for i = 1, n do
        local img, gt = ds:read(i)
        local pred = model:predict(img, {sliding = o.sliding ~= false})
        conf:add(pred, gt)
        if o.on_image then o.on_image(i, img, pred, gt) end
        img:free()
        gt:free()
        pred:free()
        if o.progress and (i == n or i % o.progress == 0) then
            local rate = i / (clh.now() - t0)
            io.stderr:write(string.format("\r  eval %d/%d  %.1f img/s  ETA %s   ", i, n, rate,
                                          fmt_time((n - i) / rate)))
            if i == n then io.stderr:write("\n") end
        end
    end
    local r = conf:results()
    conf:free()
    return r, n
end

-- A JSON string literal (control characters, quotes and backslashes escaped).
function M.json_string(s)
    return '"' .. tostring(s):gsub('[%c"\\]', function(c)
        return string.format("\\u%04x", c:byte())
    end) .. '"'
end

local function append_json(path, fields)
    if not path then return end
    local keys = {}
    for k in pairs(fields) do keys[#keys + 1] = k end
    table.sort(keys)
    local parts = {}
    for _, k in ipairs(keys) do
        local v = fields[k]
        local s
        if type(v) == "number" then
            s = (v ~= v or v == math.huge or v == -math.huge) and "null" or string.format("%.7g", v)
        elseif type(v) == "boolean" then
            s = tostring(v)
        else
            s = M.json_string(v)
        end
        parts[#parts + 1] = string.format('"%s": %s', k, s)
    end
    local f = assert(io.open(path, "a"))
    f:write("{" .. table.concat(parts, ", ") .. "}\n")
    f:close()
end
M.append_json = append_json

-- Run steps start+1 .. a.steps. Fields of a:
--   clh, model, optimizer, loader (seeked to `start` by the caller), steps, start (0),
--   batch (images per step, for img/s), pool (2), max_grad_norm (0.01; 0: off),
--   exclude_ignored, warmup (0), log_every (1), metrics (jsonl path or nil),
--   checkpoint(step) (called every ckpt_every steps and at the end), ckpt_every,
--   validate(step) -> table of fields to log (called every val_every steps), val_every,
--   print (function(line), default io.stdout)
function M.run(a)
    local clh, model, opt = a.clh, a.model, a.optimizer
    local out = a.print or function(s) io.stdout:write(s, "\n") io.stdout:flush() end
    local start, total = a.start or 0, a.steps
    local clip_norm = a.max_grad_norm == nil and 0.01 or a.max_grad_norm
    local t_start, t_window, window_steps = clh.now(), clh.now(), 0
    local last_loss
    for step = start + 1, total do
        local batch = a.loader:next()
        opt:zero_grad()
        local loss = model:train_step(batch, {pool = a.pool or 2,
                                              exclude_ignored = a.exclude_ignored})
        batch:free()
        local norm = clip_norm > 0 and opt:clip_grad_norm(clip_norm) or 0
        local scale = clh.cosine_schedule(step - 1, total, a.warmup or 0)
        if loss == loss and norm == norm then
            opt:step(scale)
            model:update()
        else
            out(string.format("step %d: non-finite loss or gradient norm (%s, %s): step skipped",
                              step, tostring(loss), tostring(norm)))
        end
        last_loss = loss
        window_steps = window_steps + 1
        local now = clh.now()
        if step % (a.log_every or 1) == 0 or step == total then
            local rate = window_steps * (a.batch or 1) / (now - t_window)
            local per_step = (now - t_start) / (step - start)
            out(string.format("step %d/%d  loss %.4f  lr %.3g  |g| %.3g  %.1f img/s  ETA %s",
                              step, total, loss, opt:group(2).lr * scale, norm, rate,
                              fmt_time(per_step * (total - step))))
            append_json(a.metrics, {step = step, loss = loss, lr = opt:group(2).lr * scale,
                                    grad_norm = norm, img_per_s = rate,
                                    seconds = now - t_start})
            t_window, window_steps = now, 0
        end
        if a.validate and a.val_every and a.val_every > 0 and
            (step % a.val_every == 0 or step == total) then
            local fields = a.validate(step)
            if fields then
                fields.step = step
                append_json(a.metrics, fields)
            end
        end
        if a.checkpoint and ((a.ckpt_every and a.ckpt_every > 0 and step % a.ckpt_every == 0) or
            step == total) then
            a.checkpoint(step)
        end
    end
    return last_loss, clh.now() - t_start
end

return M

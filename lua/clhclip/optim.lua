-- clhclip.optim: torch/optim-style AdamW over the device optimizer clh.adamw
-- (design-notes 1.2, 3.13). The moments m, v live on the device; Lua holds the config.
--
-- Functional form, torch's signature:
--   local optim = require "clhclip.optim"
--   local config = {lr = 1e-3, weight_decay = 1e-4, max_grad_norm = 1,
--                   schedule = optim.cosine(total_steps, warmup)}
--   local state = {}
--   local function feval(params)             -- loss and the gradient tensors
--       net:zeroGradParameters(); ...forward, backward...
--       return loss, grads
--   end
--   optim.adamw(feval, params, config, state)   -- -> params, {loss}
--   net:updateTransforms()
--
-- Object form with parameter groups:
--   local opt = optim.AdamW(params, grads, {lr = 1e-3})
--   local opt = optim.AdamW({{params = {P}, grads = {dP}, lr = 1e-3},
--                            {params = {A, B}, grads = {dA, dB}, lr = 1e-4}}, config)
--   opt:zero_grad(); ...; opt:step()
local clh = require "clhclip"

local optim = {}

-- torch.optim.AdamW's defaults.
optim.defaults = {lr = 1e-3, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = 1e-2}

-- The group settings of `over` (falling back to `base`, then the defaults).
local function group_config(over, base)
    base = base or {}
    local function pick(k)
        if over[k] ~= nil then return over[k] end
        if base[k] ~= nil then return base[k] end
        return optim.defaults[k]
    end
    local betas = pick("betas")
    if type(betas) ~= "table" or #betas ~= 2 then
        error("optim: betas must be a table {beta1, beta2}", 4)
    end
    return {lr = pick("lr"), betas = {betas[1], betas[2]}, eps = pick("eps"),
            weight_decay = pick("weight_decay")}
end

local function check_tensor_list(list, what, level)
    if type(list) ~= "table" or #list == 0 then
        error(string.format("optim: %s must be a non-empty array of Tensors (got %s)", what,
                            type(list)), level + 1)
    end
end

local function check_pairs(params, grads, level)
    check_tensor_list(params, "params", level + 1)
    check_tensor_list(grads, "grads", level + 1)
    if #params ~= #grads then
        error(string.format("optim: %d params but %d grads", #params, #grads), level + 1)
    end
end

-- The lr multiplier of config.schedule (a function of the 0-based step) or 1.
local function lr_scale(config, steps)
    if config.schedule == nil then return 1 end
    if type(config.schedule) ~= "function" then
        error("optim: config.schedule must be a function of the step (see optim.cosine)", 3)
    end
    return config.schedule(steps)
end

local function finite(x)
    return x == x and x ~= math.huge and x ~= -math.huge
end

-- Clip (config.max_grad_norm), then step unless the gradient norm is not finite.
-- Returns the norm before clipping (nil without clipping) and whether it stepped.
local function clip_and_step(opt, config)
    local norm
    if config.max_grad_norm then
        norm = opt:clip_grad_norm(config.max_grad_norm)
        if not finite(norm) then return norm, false end
    end
    opt:step(lr_scale(config, opt:steps()))
    return norm, true
end

-- ------------------------------------------------------------------ functional form

-- Create the device optimizer of an optim.adamw state ahead of the first call (needed
-- to load a checkpoint's optimizer state into it before training resumes).
function optim.adamw_init(params, grads, config, state)
    check_pairs(params, grads, 2)
    config = config or {}
    state = state or config
    local opt = clh.adamw(params[1]:context())
    local group = opt:add_group(group_config(config))
    for i = 1, #params do opt:add(group, params[i], grads[i]) end
    state.optimizer = opt
    state.grads = {table.unpack(grads)}
    state.t = opt:steps()
    return state
end

-- optim.adamw(feval, params, config, state) -> params, {loss}
-- feval(params) -> loss, grads. config: lr, betas, eps, weight_decay, max_grad_norm,
-- schedule. state (default: config) keeps the device optimizer (state.optimizer, made at
-- the first call), the step count state.t and the last gradient norm state.grad_norm.
-- The grads must be the same Tensors at every call. When the norm is not finite the
-- step is skipped (state.skipped counts them).
function optim.adamw(feval, params, config, state)
    if type(feval) ~= "function" then
        error("optim.adamw: feval must be a function (got " .. type(feval) .. ")", 2)
    end
    config = config or {}
    state = state or config
    local loss, grads = feval(params)
    if not state.optimizer then
        optim.adamw_init(params, grads, config, state)
    else
        check_pairs(params, grads, 2)
        for i = 1, #state.grads do
            if not rawequal(grads[i], state.grads[i]) then
                error(string.format("optim.adamw: feval returned another tensor for grads[%d] " ..
                                        "than at the first call; the device optimizer keeps " ..
                                        "the first ones", i), 2)
            end
        end
    end
    local opt = state.optimizer
    opt:set_group(1, group_config(config))
    local stepped
    state.grad_norm, stepped = clip_and_step(opt, config)
    if not stepped then state.skipped = (state.skipped or 0) + 1 end
    state.t = opt:steps()
    return params, {loss}
end

-- ------------------------------------------------------------------ object form

local AdamW = {}
AdamW.__index = AdamW
optim.AdamWClass = AdamW

local function is_group_list(t)
    return type(t) == "table" and type(t[1]) == "table" and t[1].params ~= nil
end

-- optim.AdamW(params, grads[, config]) or optim.AdamW(groups[, config]); each group is
-- {params=, grads=, lr=, betas=, eps=, weight_decay=} with config's values as defaults.
-- opt.param_groups holds the groups with every setting filled in; changing one (for
-- example param_groups[1].lr) applies from the next step().
function optim.AdamW(params, grads, config)
    local groups
    if is_group_list(params) then
        groups, config = params, grads
    else
        groups = {{params = params, grads = grads}}
    end
    config = config or {}
    local self = setmetatable({config = config, param_groups = {}}, AdamW)
    for g, group in ipairs(groups) do
        check_pairs(group.params, group.grads, 2)
        local full = group_config(group, config)
        full.params, full.grads = group.params, group.grads
        self.param_groups[g] = full
    end
    if #self.param_groups == 0 then error("optim.AdamW: no parameter groups", 2) end
    local opt = clh.adamw(self.param_groups[1].params[1]:context())
    for _, group in ipairs(self.param_groups) do
        local gi = opt:add_group(group)
        for i = 1, #group.params do opt:add(gi, group.params[i], group.grads[i]) end
    end
    self.optimizer = opt
    return self
end

-- opt:step([closure]) -> loss (closure's result), gradient norm (with max_grad_norm).
-- Applies config.max_grad_norm and config.schedule; skips the step when the norm is not
-- finite (self.skipped counts them).
function AdamW:step(closure)
    local loss
    if closure then loss = closure() end
    for g, group in ipairs(self.param_groups) do self.optimizer:set_group(g, group) end
    local norm, stepped = clip_and_step(self.optimizer, self.config)
    if not stepped then self.skipped = (self.skipped or 0) + 1 end
    self.grad_norm = norm
    return loss, norm
end

function AdamW:zero_grad()
    self.optimizer:zero_grad()
end

function AdamW:clip_grad_norm(max_norm)
    return self.optimizer:clip_grad_norm(max_norm)
end

-- Steps taken so far (restored by loading a checkpoint with this optimizer).
function AdamW:steps()
    return self.optimizer:steps()
end

-- lr of every group, or of group g.
function AdamW:set_lr(lr, g)
    for i, group in ipairs(self.param_groups) do
        if g == nil or g == i then group.lr = lr end
    end
end

function AdamW:free()
    self.optimizer:free()
end

AdamW.__close = AdamW.free

-- ------------------------------------------------------------------ schedules

-- optim.cosine(total, warmup) -> function(t) giving the lr multiplier of 0-based step t:
-- linear warm-up over `warmup` steps, then half a cosine down to 0 at `total`
-- (transformers' get_cosine_schedule_with_warmup). Use as config.schedule.
function optim.cosine(total, warmup)
    warmup = warmup or 0
    if math.type(total) ~= "integer" or total < 1 then
        error("optim.cosine: total must be a positive integer", 2)
    end
    if math.type(warmup) ~= "integer" or warmup < 0 or warmup > total then
        error("optim.cosine: warmup must be an integer in 0..total", 2)
    end
    return function(t) return clh.cosine_schedule(t, total, warmup) end
end

return optim

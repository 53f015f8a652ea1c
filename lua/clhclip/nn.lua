-- clhclip.nn: torch/nn-style modules over the clhclip binding (design-notes 1.2, 3.13).
--
--   local nn = require "clhclip.nn"
--   local net = nn.HCLIP(model, {block_size = 128, request = {dense = true}})
--   local out = net:forward({pixels = px, texts = {"a photo of a cat"}})
--   net:zeroGradParameters()
--   net:backward(input, {dense = d_dense, text = d_text})
--   local params, grads = net:parameters()
--   ... optimizer step ...
--   net:updateTransforms()             -- rebuild the block transforms from P, A, B
--
-- Modules follow torch/nn's Module: forward(input) = updateOutput(input);
-- backward(input, gradOutput) = updateGradInput + accGradParameters; parameters()
-- returns two arrays {params}, {grads}; training() / evaluate() switch the mode. There is
-- no getParameters(): the tensors live in device memory of their own and an optimizer
-- takes the arrays as they are (clhclip.optim).
local clh = require "clhclip"

local nn = {}

-- nn.class(name[, parent]) -> class table; calling it constructs an instance through
-- its __init. Metamethods (__tostring, __close) are inherited from the parent.
function nn.class(name, parent)
    local cls = {__typename = name}
    cls.__index = cls
    if parent then
        for _, k in ipairs({"__tostring", "__close"}) do cls[k] = rawget(parent, k) end
    end
    return setmetatable(cls, {
        __index = parent,
        __call = function(c, ...)
            local obj = setmetatable({}, c)
            obj:__init(...)
            return obj
        end,
    })
end

-- ------------------------------------------------------------------ Module

local Module = nn.class("nn.Module")
nn.Module = Module

Module.__tostring = function(self) return self.__typename end

function Module:__init()
    self.output = nil
    self.gradInput = nil
    self.train = true
end

function Module:updateOutput(input)
    error(self.__typename .. ": updateOutput is not implemented", 2)
end

function Module:forward(input)
    return self:updateOutput(input)
end

function Module:updateGradInput(input, gradOutput)
    return self.gradInput
end

function Module:accGradParameters(input, gradOutput, scale)
end

function Module:backward(input, gradOutput, scale)
    scale = scale or 1
    self:updateGradInput(input, gradOutput)
    self:accGradParameters(input, gradOutput, scale)
    return self.gradInput
end

-- params, grads (nil when the module has none)
function Module:parameters()
    return nil
end

function Module:zeroGradParameters()
    local _, grads = self:parameters()
    for _, g in ipairs(grads or {}) do g:fill(0) end
end

function Module:getParameters()
    error(self.__typename .. ":getParameters: clhclip does not flatten parameters; use " ..
              "parameters() (optimizers take the arrays)", 2)
end

function Module:training()
    self.train = true
    return self
end

function Module:evaluate()
    self.train = false
    return self
end

function Module:clearState()
    self.output = nil
    self.gradInput = nil
    return self
end

-- ------------------------------------------------------------------ HCLIP

-- nn.HCLIP(model, options): H-CLIP adapters on a loaded CLIP (identity at creation).
-- options: the adapter settings of clh.hclip (block_size, ortho, modality_map, layer_map,
-- recompute), plus
--   request = {pooled=true, dense=false, dense_last_layer=false, hooks={...}}: the image
--             outputs forward() computes (an input may override it with input.request);
--   text    = {tokenizer=, context=, truncate=}: how strings are tokenized.
local HCLIP = nn.class("nn.HCLIP", Module)
nn.HCLIP = HCLIP

local ADAPTER_KEYS = {"block_size", "ortho", "modality_map", "layer_map", "recompute"}

function HCLIP:__init(model, options)
    Module.__init(self)
    options = options or {}
    if type(options) ~= "table" then
        error("nn.HCLIP: options must be a table (got " .. type(options) .. ")", 3)
    end
    local adapter = {}
    for _, k in ipairs(ADAPTER_KEYS) do adapter[k] = options[k] end
    self.hclip = clh.hclip(model, adapter)
    self.model = model
    self.request = options.request or {pooled = true}
    self.text_options = options.text or {}
    self.pending = false -- the last forward ran in training mode and awaits backward
end

HCLIP.__close = function(self) self:free() end

function HCLIP:__tostring()
    return "nn.HCLIP: " .. tostring(self.hclip)
end

-- input = {pixels = Tensor [N,3,H,W] or nil, texts = strings or token id rows or nil,
--          request = optional image request}
-- -> {pooled=, dense=, hooks={[block]=Tensor}, text=Tensor}
function HCLIP:updateOutput(input)
    if type(input) ~= "table" then
        error("nn.HCLIP:forward: input must be a table {pixels=, texts=} (got " .. type(input) ..
                  ")", 3)
    end
    local topts = {train = self.train}
    for k, v in pairs(self.text_options) do topts[k] = v end
    if self.pending and not self.train then
        self.hclip:discard() -- an evaluation forward makes the pending backward impossible
    end
    self.pending = false
    self.output = self.hclip:forward(input.pixels, input.request or self.request, input.texts,
                                     topts)
    self.pending = self.train
    return self.output
end

function HCLIP:forward(input)
    return self:updateOutput(input)
end

-- The inputs (pixels, token ids) get no gradient.
function HCLIP:updateGradInput(input, gradOutput)
    self.gradInput = nil
    return nil
end

-- gradOutput = {pooled=, dense=, hooks={[block]=}, text=}, gradients of the last forward's
-- outputs (missing ones count as zero); accumulated into the grads of parameters().
function HCLIP:accGradParameters(input, gradOutput, scale)
    if scale ~= nil and scale ~= 1 then
        error("nn.HCLIP:backward: scale is not supported; scale the output gradients instead", 3)
    end
    if not self.pending then
        error("nn.HCLIP:backward: no training forward to go back through (call forward in " ..
                  "training() mode first, once per backward)", 3)
    end
    if type(gradOutput) ~= "table" then
        error("nn.HCLIP:backward: gradOutput must be a table {pooled=, dense=, hooks=, text=} " ..
                  "(got " .. type(gradOutput) .. ")", 3)
    end
    self.pending = false
    self.hclip:backward(gradOutput)
end

function HCLIP:backward(input, gradOutput, scale)
    self:updateGradInput(input, gradOutput)
    self:accGradParameters(input, gradOutput, scale)
    return self.gradInput
end

-- params, grads: {P, A, B}, {dP, dA, dB} (A/B absent when switched off); the same
-- Tensor objects on every call.
function HCLIP:parameters()
    return self.hclip:parameters()
end

function HCLIP:zeroGradParameters()
    self.hclip:zero_grad()
end

-- Rebuild the block transforms from P, A, B: call after every optimizer step.
function HCLIP:updateTransforms()
    self.hclip:update()
    return self
end

function HCLIP:paramNames()
    return self.hclip:param_names()
end

-- Checkpoints: opts.optimizer takes a clh.adamw, an optim.AdamW or an optim.adamw state.
function HCLIP:save(path, opts)
    self.hclip:save(path, opts)
end

function HCLIP:load(path, opts)
    return self.hclip:load(path, opts)
end

function HCLIP:exportFolded(dir)
    self.hclip:export_folded(dir)
end

function HCLIP:setHELoss(opts)
    self.hclip:he_loss(opts)
    return self
end

function HCLIP:heLoss()
    return self.hclip:he_loss_value()
end

function HCLIP:heDrift(s)
    return self.hclip:he_drift(s)
end

function HCLIP:layout()
    return self.hclip:layout()
end

function HCLIP:clearState()
    Module.clearState(self)
    if self.pending then self.hclip:discard() end -- give the saved activations back
    self.pending = false
    return self
end

function HCLIP:free()
    self.output = nil
    self.pending = false
    self.hclip:free()
end

return nn

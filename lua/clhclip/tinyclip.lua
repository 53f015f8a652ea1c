-- A small CLIP with random weights, written as an HF folder (config.json +
-- model.safetensors) so that clh.load_clip reads it like any downloaded model. Used by the
-- demo (frozen random base weights under a trained adapter + head) and by tests; no weights
-- are downloaded. Initialisation follows HF CLIPPreTrainedModel: normal(0, 0.02) matrices
-- and embeddings, zero biases, unit layer norms.
local M = {}

M.defaults = {
    vision = {hidden = 64, layers = 4, heads = 4, intermediate = 256},
    text = {hidden = 64, layers = 2, heads = 4, intermediate = 256},
    image_size = 96, -- native grid 12 x 12 at patch 8
    patch_size = 8,
    projection_dim = 64,
    vocab_size = 824, -- the committed tiny BPE vocabulary (tests/fixtures/tokenizer)
    max_positions = 77,
    eos_token_id = 823,
    bos_token_id = 822,
}

local function merged(defaults, cfg)
    local out = {}
    for k, v in pairs(defaults) do
        if type(v) == "table" then
            out[k] = merged(v, cfg and cfg[k] or {})
        elseif cfg and cfg[k] ~= nil then
            out[k] = cfg[k]
        else
            out[k] = v
        end
    end
    return out
end

local function tower_json(t, extra)
    local parts = {}
    for k, v in pairs(extra) do parts[#parts + 1] = string.format('"%s": %s', k, v) end
    parts[#parts + 1] = string.format('"hidden_size": %d', t.hidden)
    parts[#parts + 1] = string.format('"num_hidden_layers": %d', t.layers)
    parts[#parts + 1] = string.format('"num_attention_heads": %d', t.heads)
    parts[#parts + 1] = string.format('"intermediate_size": %d', t.intermediate)
    parts[#parts + 1] = '"hidden_act": "quick_gelu"'
    parts[#parts + 1] = '"layer_norm_eps": 1e-05'
    table.sort(parts)
    return "{" .. table.concat(parts, ", ") .. "}"
end

local function config_json(c)
    local text = tower_json(c.text, {
        vocab_size = c.vocab_size,
        max_position_embeddings = c.max_positions,
        eos_token_id = c.eos_token_id,
        bos_token_id = c.bos_token_id,
        projection_dim = c.projection_dim,
    })
    local vision = tower_json(c.vision, {
        image_size = c.image_size,
        patch_size = c.patch_size,
        projection_dim = c.projection_dim,
        num_channels = 3,
    })
    return string.format('{"model_type": "clip", "projection_dim": %d, ' ..
                             '"logit_scale_init_value": 2.6592, "text_config": %s, ' ..
                             '"vision_config": %s}\n', c.projection_dim, text, vision)
end

local function add_encoder(clh, ctx, w, prefix, t)
    local d, f = t.hidden, t.intermediate
    for i = 0, t.layers - 1 do
        local p = string.format("%s.encoder.layers.%d.", prefix, i)
        for _, name in ipairs {"q_proj", "k_proj", "v_proj", "out_proj"} do
            w[p .. "self_attn." .. name .. ".weight"] = clh.randn({d, d}, 0.02, ctx)
            w[p .. "self_attn." .. name .. ".bias"] = clh.tensor({d}, 0, ctx)
        end
        for _, ln in ipairs {"layer_norm1", "layer_norm2"} do
            w[p .. ln .. ".weight"] = clh.tensor({d}, 1, ctx)
            w[p .. ln .. ".bias"] = clh.tensor({d}, 0, ctx)
        end
        w[p .. "mlp.fc1.weight"] = clh.randn({f, d}, 0.02, ctx)
        w[p .. "mlp.fc1.bias"] = clh.tensor({f}, 0, ctx)
        w[p .. "mlp.fc2.weight"] = clh.randn({d, f}, 0.02, ctx)
        w[p .. "mlp.fc2.bias"] = clh.tensor({d}, 0, ctx)
    end
end

-- Write the model into dir (created by the caller) with clh.manual_seed(seed) applied.
-- Returns the full configuration used.
function M.write(clh, dir, cfg, seed, ctx)
    local c = merged(M.defaults, cfg)
    clh.manual_seed(seed or 0)
    local w, dv, dt = {}, c.vision.hidden, c.text.hidden
    local grid = c.image_size // c.patch_size
    w["text_model.embeddings.token_embedding.weight"] = clh.randn({c.vocab_size, dt}, 0.02, ctx)
    w["text_model.embeddings.position_embedding.weight"] =
        clh.randn({c.max_positions, dt}, 0.01, ctx)
    add_encoder(clh, ctx, w, "text_model", c.text)
    w["text_model.final_layer_norm.weight"] = clh.tensor({dt}, 1, ctx)
    w["text_model.final_layer_norm.bias"] = clh.tensor({dt}, 0, ctx)
    w["vision_model.embeddings.class_embedding"] = clh.randn({dv}, 0.02, ctx)
    w["vision_model.embeddings.patch_embedding.weight"] =
        clh.randn({dv, 3, c.patch_size, c.patch_size}, 0.02, ctx)
    w["vision_model.embeddings.position_embedding.weight"] =
        clh.randn({grid * grid + 1, dv}, 0.02, ctx)
    w["vision_model.pre_layrnorm.weight"] = clh.tensor({dv}, 1, ctx)
    w["vision_model.pre_layrnorm.bias"] = clh.tensor({dv}, 0, ctx)
    add_encoder(clh, ctx, w, "vision_model", c.vision)
    w["vision_model.post_layernorm.weight"] = clh.tensor({dv}, 1, ctx)
    w["vision_model.post_layernorm.bias"] = clh.tensor({dv}, 0, ctx)
    w["visual_projection.weight"] = clh.randn({c.projection_dim, dv}, dv ^ -0.5, ctx)
    w["text_projection.weight"] = clh.randn({c.projection_dim, dt}, dt ^ -0.5, ctx)
    w["logit_scale"] = clh.tensor({1}, 2.6592, ctx)
    clh.save_tensors(dir .. "/model.safetensors", w, {format = "pt"})
    local f = assert(io.open(dir .. "/config.json", "w"))
    f:write(config_json(c))
    f:close()
    for _, t in pairs(w) do t:free() end
    return c
end

return M

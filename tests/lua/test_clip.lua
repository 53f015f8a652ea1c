-- CLIP through the binding against the HF reference fixtures (tests/fixtures/clip_*,
-- made by tests/reference/make_clip_fixtures.py). Outputs must agree with HF to
-- max |got - expected| <= 1e-5 * max |expected|.
local h = require "helpers"
local clh = h.clh
local T = h.suite()

local REL_TOL = 1e-5

-- Architecture per fixture, from tests/reference/README.md.
local FIXTURES = {
    clip_tiny_p8 = {
        data = "clip_tiny_p8",
        config = {image_size = 32, patch_size = 8, vocab_size = 1000, max_positions = 16,
                  eos_token_id = 999, eos_argmax = false, projection_dim = 40,
                  vision = {hidden = 64, heads = 4, layers = 3, intermediate = 128,
                            act = "quick_gelu"},
                  text = {hidden = 48, heads = 4, layers = 2, intermediate = 96}},
    },
    clip_legacy_sparse = {
        data = "clip_legacy_sparse",
        config = {image_size = 64, patch_size = 32, eos_argmax = true, projection_dim = 512},
    },
    clip_tiny_openai = {
        data = "clip_tiny_openai",
        config = {image_size = 16, patch_size = 4, vocab_size = 500, max_positions = 8,
                  projection_dim = 32,
                  vision = {hidden = 128, heads = 2, layers = 1, intermediate = 512},
                  text = {hidden = 64, heads = 1, layers = 2, intermediate = 256}},
    },
    clip_tiny_openai_hf = {
        data = "clip_tiny_openai",
        config = {image_size = 16, patch_size = 4, vocab_size = 500, max_positions = 8,
                  eos_token_id = 499, projection_dim = 32},
    },
}

local function check_config(got, want, where)
    for k, v in pairs(want) do
        if type(v) == "table" then
            check_config(got[k], v, where .. "." .. k)
        else
            h.eq(got[k], v, where .. "." .. k)
        end
    end
end

local function compare(tensor, exp_file, name, where)
    local want, shape = exp_file:read(name)
    h.truthy(tensor ~= nil, where .. ": " .. name .. " was not returned")
    h.same(tensor:shape(), shape, where .. ": " .. name .. " shape")
    local err, mag = h.max_abs_err(tensor:totable(), want)
    if err > REL_TOL * mag then
        error(string.format("%s: %s max abs error %.3g > %.1g * max|expected| (%.3g)", where, name,
                            err, REL_TOL, mag), 2)
    end
    return err, mag
end

-- Rows of an integer [T, ctx] tensor from inputs.safetensors.
local function id_rows(inputs)
    local flat, shape = inputs:read("input_ids")
    local rows = {}
    for r = 1, shape[1] do
        local row = {}
        for j = 1, shape[2] do row[j] = flat[(r - 1) * shape[2] + j] end
        rows[r] = row
    end
    return rows
end

local function hooks_in(exp_file)
    local hooks = {}
    for _, n in ipairs(exp_file:names()) do
        local i = n:match("^hidden_vision_(%d+)$")
        if i then hooks[#hooks + 1] = math.tointeger(tonumber(i)) end
    end
    table.sort(hooks)
    return hooks
end

local function run_fixture(name)
    local spec = FIXTURES[name]
    local dir = h.fixture(name)
    local data = h.fixture(spec.data)
    h.ctx()
    local model <close> = clh.load_clip(dir)
    check_config(model:config(), spec.config, name .. " config")
    local inputs <close> = clh.safetensors(data .. "/inputs.safetensors")
    local exp <close> = clh.safetensors(data .. "/expected.safetensors")
    local pixels = inputs:tensor("pixel_values")
    local hooks = hooks_in(exp)
    h.truthy(#hooks > 0, name .. ": fixture lists vision hooks")

    local out = model:encode_image(pixels, {dense = true, hooks = hooks})
    compare(out.pooled, exp, "image_pooled", name)
    compare(out.dense, exp, "image_dense", name)
    for _, i in ipairs(hooks) do compare(out.hooks[i], exp, "hidden_vision_" .. i, name) end

    local cat = model:encode_image(pixels, {pooled = false, dense = true, dense_last_layer = true})
    h.eq(cat.pooled, nil, name .. ": pooled not requested")
    compare(cat.dense, exp, "image_dense_catseg", name)

    compare(model:encode_text(id_rows(inputs)), exp, "text_features", name)
    h.near(model:logit_scale(), exp:read("logit_scale")[1], 1e-6, name .. " logit_scale")
end

function T.tiny_p8_matches_hf()
    run_fixture("clip_tiny_p8")
end

function T.legacy_sparse_config_matches_hf()
    run_fixture("clip_legacy_sparse")
end

function T.openai_names_without_config_match_hf()
    run_fixture("clip_tiny_openai")
end

function T.openai_weights_with_hf_names_match_hf()
    run_fixture("clip_tiny_openai_hf")
end

function T.encode_text_from_strings_uses_a_tokenizer()
    h.ctx()
    local model <close> = clh.load_clip(h.fixture("clip_tiny_p8"))
    local tok <close> = clh.tokenizer(h.fixture("tokenizer/tiny_merges.txt.gz"))
    local from_text = model:encode_text({"a photo of a cat", "a diagram"}, {tokenizer = tok})
    h.same(from_text:shape(), {2, 40}, "features shape")
    local ids = tok:tokenize({"a photo of a cat", "a diagram"}, {context = 16})
    h.same(model:encode_text(ids):totable(), from_text:totable(), "same as explicit ids")
    local one = model:encode_text(ids[1])
    h.same(one:shape(), {1, 40}, "a single id row")
    h.raises("rows must be equally long", model.encode_text, model, {{1, 2}, {1}})
    h.raises("not a token id", model.encode_text, model, {{1, -2}})
    h.raises("outside the vocabulary", model.encode_text, model, {{1, 5000}})
    h.raises("no texts or ids given", model.encode_text, model, {})
    h.raises("bad argument #2", model.encode_text, model, 42)
end

function T.model_lifetime_and_argument_errors()
    h.ctx()
    local model = clh.load_clip(h.fixture("clip_tiny_p8"))
    h.truthy(tostring(model):find("clhclip.CLIP", 1, true), "tostring")
    h.eq(model:path(), h.fixture("clip_tiny_p8"), "path")
    h.eq(model:context(), clh.context(), "uses the default context")
    h.raises("clhclip.Tensor expected", model.encode_image, model, {})
    local pixels = clh.tensor({1, 3, 32, 32})
    h.raises("option 'hooks' must be an array", model.encode_image, model, pixels, {hooks = 3})
    h.raises("hooks[1] = -1 is not a block index", model.encode_image, model, pixels,
             {hooks = {-1}})
    h.raises(nil, model.encode_image, model, pixels, {hooks = {7}}) -- only 3 blocks
    h.raises(nil, model.encode_image, model, clh.tensor({1, 3, 30, 30})) -- not a multiple of 8
    local out = model:encode_image(pixels)
    model:free()
    model:free()
    h.raises("model was freed", model.config, model)
    h.same(out.pooled:shape(), {1, 40}, "outputs outlive the model")
end

function T.model_on_an_explicit_context()
    h.ctx()
    local ctx <close> = clh.init {default = false}
    local model = ctx:load_clip(h.fixture("clip_tiny_p8"))
    h.eq(model:context(), ctx, "model context")
    local pixels = ctx:tensor({1, 3, 32, 32}, 0.5)
    local pooled = model:encode_image(pixels).pooled
    h.eq(pooled:context(), ctx, "outputs live in the model's context")
    h.truthy(ctx:device_bytes() > 0, "weights are accounted")
end

return T

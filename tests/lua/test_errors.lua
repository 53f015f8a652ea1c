-- Wrong argument types and bad inputs give Lua errors with a useful message (never a
-- crash), and clh.safe returns nil, message instead of raising.
local h = require "helpers"
local clh = h.clh
local T = h.suite()

function T.tensor_constructor_argument_errors()
    h.ctx()
    h.raises("bad argument #1", clh.tensor, "abc")
    h.raises("table expected", clh.tensor, 42)
    h.raises("shape must have 1 to 6 dimensions (got 0)", clh.tensor, {})
    h.raises("shape must have 1 to 6 dimensions (got 7)", clh.tensor, {1, 1, 1, 1, 1, 1, 1})
    h.raises("shape[2] must be positive (got -1)", clh.tensor, {2, -1})
    h.raises("shape[1] must be positive (got 0)", clh.tensor, {0})
    h.raises("shape[1] must be an integer (got number)", clh.tensor, {2.5})
    h.raises("shape[1] must be an integer (got string)", clh.tensor, {"two"})
    h.raises("shape is too large", clh.tensor, {1 << 30, 1 << 30, 1 << 30})
    h.raises("bad argument #2", clh.tensor, {2}, "x")
    h.raises("clhclip.Context expected", clh.tensor, {2}, nil, "not a context")
end

function T.tensor_method_argument_errors()
    h.ctx()
    local t = clh.tensor({2, 3}, 1)
    h.raises("clhclip.Tensor expected", t.shape, 42)
    h.raises("clhclip.Tensor expected", t.shape, {})
    h.raises("clhclip.Tensor expected", t.totable, clh.context())
    h.raises("bad argument #2", t.view, t, "x")
    h.raises("offset must be >= 0", t.view, t, {2}, -1)
    h.raises("bad argument #2", t.size, t, "x")
    h.raises("table or clhclip.Tensor", t.copy, t, 42)
    h.raises("bad argument #2", t.fill, t, "a")
    h.raises("option 'nested' must be a boolean", t.totable, t, {nested = 1})
    h.raises("bad argument #2", t.save, t, {})
    h.raises("bad argument #1", clh.l2_normalize, 3)
    h.raises("matmul needs a 2-D tensor", clh.matmul, clh.tensor {3}, t)
    h.raises("clhclip.Tensor expected", clh.save_tensors, h.tmpname(), {x = 42})
    h.raises("tensor names must be strings", clh.save_tensors, h.tmpname(), {t})
end

function T.context_option_errors()
    h.raises("bad argument #1", clh.init, "gpu")
    h.raises("option 'platform' must be a string or an index", clh.init, {platform = true})
    h.raises("option 'profile' must be a boolean", clh.init, {profile = "yes"})
    h.raises("option 'default' must be a boolean", clh.init, {default = 0})
    h.ctx()
    local err = h.raises("no-such-device-xyz", clh.init,
                         {device = "no-such-device-xyz", default = false})
    h.truthy(#err > 30, "message explains the failed selection: " .. err)
end

function T.file_errors_name_the_path()
    h.raises("bad argument #1", clh.tokenizer, {})
    h.raises("/nonexistent/vocab.txt.gz", clh.tokenizer, "/nonexistent/vocab.txt.gz")
    h.raises("bad argument #1", clh.load_image, {})
    h.raises("/nonexistent/image.png", clh.load_image, "/nonexistent/image.png")
    h.ctx()
    h.raises("/nonexistent/model", clh.load_clip, "/nonexistent/model")
    h.raises("bad argument #1", clh.load_clip, nil)
    h.raises("/nonexistent/a.safetensors", clh.safetensors, "/nonexistent/a.safetensors")
end

function T.image_and_preprocess_argument_errors()
    local img = clh.image_from_rgb8(string.rep("\0", 12), 2, 2)
    h.raises("2x2 RGB needs 12 bytes, got 11", clh.image_from_rgb8, string.rep("\0", 11), 2, 2)
    h.raises("width must be 1..65536", clh.image_from_rgb8, "", 0, 2)
    h.raises("x out of range", img.pixel, img, 2, 0)
    h.raises("width out of range", img.crop, img, 0, 0, 3, 1)
    h.raises("size must be 1..8192", clh.preprocess, img, 0)
    h.raises("mode must be 'crop' or 'resize' (got 'bogus')", clh.preprocess, img, 4, "bogus")
    h.raises("path, clhclip.Image or array of them", clh.preprocess, 42, 4)
    h.raises("empty image list", clh.preprocess, {}, 4)
    h.raises("expected an image path or clhclip.Image (got number)", clh.preprocess, {img, 5}, 4)
    img:free()
    img:free()
    h.eq(tostring(img), "clhclip.Image (freed)", "tostring after free")
    h.raises("image was freed", img.pixel, img, 0, 0)
end

function T.safe_variants_return_nil_and_message()
    local v, err = clh.safe.tokenizer("/nonexistent/vocab.json")
    h.eq(v, nil, "value")
    h.truthy(type(err) == "string" and err:find("/nonexistent/vocab.json", 1, true),
             "message names the file: " .. tostring(err))
    local m, err2 = clh.safe.load_clip("/nonexistent/model")
    h.eq(m, nil, "model")
    h.truthy(err2:find("/nonexistent/model", 1, true), "message: " .. err2)
    h.ctx()
    local t = clh.safe.tensor({2}, 3)
    h.eq(tostring(t), "clhclip.Tensor [2]", "success passes values through")
    local a, b = clh.safe.tensor({})
    h.eq(a, nil, "failure value")
    h.truthy(b:find("shape must have", 1, true), "failure message: " .. b)
end

return T

-- Tensors through the Lua binding: creation, shape, host copies, views, fill, lifetime,
-- safetensors round trips and the binding's small op wrappers.
local h = require "helpers"
local clh = h.clh
local T = h.suite()

local function range(n, start)
    local t = {}
    for i = 1, n do t[i] = (start or 1) + i - 1 end
    return t
end

function T.new_tensor_has_shape_and_zeros()
    h.ctx()
    local t = clh.tensor {2, 3, 4}
    h.same(t:shape(), {2, 3, 4}, "shape")
    h.same(t:size(), {2, 3, 4}, "size()")
    h.eq(t:size(1), 2, "size(1)")
    h.eq(t:size(-1), 4, "size(-1)")
    h.eq(t:dim(), 3, "dim")
    h.eq(#t, 24, "#t")
    h.eq(t:numel(), 24, "numel")
    h.eq(t:offset(), 0, "offset")
    h.eq(tostring(t), "clhclip.Tensor [2, 3, 4]", "tostring")
    local v = t:totable()
    h.eq(#v, 24, "totable length")
    for i = 1, 24 do h.eq(v[i], 0.0, "zero " .. i) end
    h.raises("dimension out of range", t.size, t, 4)
    h.raises("dimension out of range", t.size, t, -4)
end

function T.flat_and_nested_data_round_trip()
    h.ctx()
    local flat = clh.tensor({2, 3}, {1, 2, 3, 4, 5, 6})
    local nested = clh.tensor({2, 3}, {{1, 2, 3}, {4, 5, 6}})
    h.same(flat:totable(), {1, 2, 3, 4, 5, 6}, "flat")
    h.same(nested:totable(), {1, 2, 3, 4, 5, 6}, "nested")
    local n = nested:totable {nested = true}
    h.eq(#n, 2, "rows")
    h.same(n[1], {1, 2, 3}, "row 1")
    h.same(n[2], {4, 5, 6}, "row 2")
    -- fp32 storage: 0.1 comes back as the nearest float
    local f = clh.tensor({1}, {0.1}):totable()[1]
    h.near(f, 0.1, 1e-8, "fp32 value")
    h.truthy(f ~= 0.1, "value was rounded to fp32")
end

function T.data_length_and_types_are_checked()
    h.ctx()
    h.raises("data has 5 numbers but the tensor has 6 elements", clh.tensor, {2, 3},
             {1, 2, 3, 4, 5})
    h.raises("data at depth 2 has 2 entries but the shape wants 3", clh.tensor, {2, 3},
             {{1, 2, 3}, {4, 5}})
    h.raises("data at depth 1 has 3 entries", clh.tensor, {2, 3}, {{1, 2, 3}, {4, 5, 6}, {7}})
    h.raises("data[2] must be a number (got string)", clh.tensor, {3}, {1, "x", 3})
    h.raises("entry 2 must be a table", clh.tensor, {2, 2}, {{1, 2}, 3})
    local t = clh.tensor {2, 2}
    h.raises("data has 3 numbers", t.copy, t, {1, 2, 3})
end

function T.fill_and_number_data()
    h.ctx()
    local t = clh.tensor({5}, 2.5)
    h.same(t:totable(), {2.5, 2.5, 2.5, 2.5, 2.5}, "filled at creation")
    h.eq(t:fill(-1), t, "fill returns self")
    h.same(t:totable(), {-1, -1, -1, -1, -1}, "filled")
end

function T.copy_from_table_and_tensor()
    h.ctx()
    local a = clh.tensor {2, 2}
    h.eq(a:copy {1, 2, 3, 4}, a, "copy returns self")
    h.same(a:totable(), {1, 2, 3, 4}, "after table copy")
    local b = clh.tensor {4}
    b:copy(a) -- equal numel, different shape
    h.same(b:totable(), {1, 2, 3, 4}, "after tensor copy")
    local c = clh.tensor({2, 2}, a)
    h.same(c:totable(), {1, 2, 3, 4}, "created from tensor")
    local d = a:clone()
    a:fill(0)
    h.same(d:totable(), {1, 2, 3, 4}, "clone is independent")
    local wrong = clh.tensor {3}
    h.truthy(not pcall(wrong.copy, wrong, a), "copy with a different numel fails")
end

function T.views_share_memory()
    h.ctx()
    local base = clh.tensor({2, 3}, range(6))
    local row2 = base:view({3}, 3)
    h.same(row2:shape(), {3}, "view shape")
    h.same(row2:totable(), {4, 5, 6}, "view data")
    h.eq(row2:offset(), 3, "view offset")
    row2:fill(0)
    h.same(base:totable(), {1, 2, 3, 0, 0, 0}, "write through view")
    local flat = base:view {6}
    h.same(flat:totable(), {1, 2, 3, 0, 0, 0}, "reshaped view")
    h.truthy(not pcall(base.view, base, {4}, 3), "view past the end fails")
    -- a view keeps the buffer alive after its base is freed
    base:free()
    h.same(row2:totable(), {0, 0, 0}, "view outlives base")
end

function T.free_twice_and_use_after_free()
    h.ctx()
    local t = clh.tensor({2}, {1, 2})
    t:free()
    t:free()
    h.eq(tostring(t), "clhclip.Tensor (freed)", "tostring after free")
    h.raises("tensor was freed", t.shape, t)
    h.raises("tensor was freed", t.totable, t)
    h.raises("tensor was freed", function() return #t end)
    h.raises("tensor was freed", clh.tensor, {2}, t)
    local u = clh.tensor {2}
    h.raises("tensor was freed", u.copy, u, t)
end

function T.close_frees_at_scope_end()
    h.ctx()
    local ref
    do
        local t <close> = clh.tensor({3}, 7)
        ref = t
        h.same(t:totable(), {7, 7, 7}, "inside scope")
    end
    h.eq(tostring(ref), "clhclip.Tensor (freed)", "freed by <close>")
end

function T.device_memory_returns_after_gc()
    local ctx = h.ctx()
    collectgarbage("collect")
    local before = ctx:device_bytes()
    for _ = 1, 50 do local _ = clh.tensor({256, 256}, 1) end
    collectgarbage("collect")
    collectgarbage("collect")
    h.eq(ctx:device_bytes(), before, "device bytes after collecting 50 tensors")
    local keep = clh.tensor {1000}
    h.truthy(ctx:device_bytes() >= before + 4000, "a live tensor is accounted")
    h.truthy(ctx:peak_device_bytes() >= ctx:device_bytes(), "peak >= current")
    keep:free()
    h.eq(ctx:device_bytes(), before, "explicit free returns the bytes")
end

function T.device_memory_is_bounded_without_explicit_frees()
    h.ctx()
    -- 64 x 16 MiB = 1 GiB allocated in total; the binding's GC pressure (full collection
    -- past 256 MiB of device memory) must keep the live amount far below that.
    local ctx <close> = clh.init {default = false}
    collectgarbage("stop")
    local ok, err = pcall(function()
        for _ = 1, 64 do local _ = ctx:tensor {4, 1024, 1024} end
    end)
    collectgarbage("restart")
    assert(ok, err)
    local peak = ctx:peak_device_bytes()
    h.truthy(peak <= (256 + 16) * 1024 * 1024,
             string.format("peak device memory %.0f MiB", peak / 1048576))
end

function T.freed_context_lives_until_its_tensors_are_freed()
    h.ctx()
    local ctx = clh.init {default = false}
    local t = ctx:tensor({2}, {3, 4})
    ctx:free()
    ctx:free()
    h.eq(tostring(ctx), "clhclip.Context (freed)", "tostring")
    h.raises("context was freed", ctx.tensor, ctx, {2})
    h.raises("context was freed", ctx.device, ctx)
    h.raises("context was freed", clh.tensor, {2}, nil, ctx)
    h.same(t:totable(), {3, 4}, "tensor still usable")
    h.raises("context was freed", t.clone, t)
    t:free()
end

function T.save_and_load_safetensors()
    h.ctx()
    local path = h.tmpname(".safetensors")
    local t = clh.tensor({2, 3}, {1, -2, 3.5, 4, 5, 6e-3})
    h.eq(t:save(path, "weights", {origin = "test"}), t, "save returns self")
    local back = clh.load_tensor(path, "weights")
    h.same(back:shape(), {2, 3}, "loaded shape")
    h.same(back:totable(), t:totable(), "loaded values")
    h.same(clh.load_tensor(path):totable(), t:totable(), "single tensor loads without a name")
    local f = clh.safetensors(path)
    h.same(f:names(), {"weights"}, "names")
    local info = f:info("weights")
    h.eq(info.dtype, "F32", "dtype")
    h.eq(info.numel, 6, "numel")
    h.eq(f:metadata("origin"), "test", "metadata")
    h.eq(f:metadata("missing"), nil, "missing metadata")
    local values, shape = f:read("weights")
    h.same(shape, {2, 3}, "read shape")
    h.same(values, t:totable(), "read values")
    h.raises("weights2", f.info, f, "weights2")
    f:close()
    f:close()
    h.raises("closed", f.names, f)
    os.remove(path)

    local a, b = clh.tensor({2}, {1, 2}), clh.tensor({1, 3}, {7, 8, 9})
    clh.save_tensors(path, {a = a, b = b})
    h.same(clh.load_tensor(path, "b"):totable(), {7, 8, 9}, "second tensor")
    h.same(clh.load_tensor(path, "b"):shape(), {1, 3}, "second shape")
    h.raises("give the name", clh.load_tensor, path)
    os.remove(path)
end

function T.load_tensor_errors_name_the_file()
    h.ctx()
    h.raises("/nonexistent/x.safetensors", clh.load_tensor, "/nonexistent/x.safetensors")
    local path = h.tmpname(".safetensors")
    local f = assert(io.open(path, "wb"))
    f:write("\16\0\0\0\0\0\0\0{not json at all")
    f:close()
    h.truthy(not pcall(clh.load_tensor, path), "truncated/malformed file fails")
    os.remove(path)
end

function T.l2_normalize_softmax_matmul()
    h.ctx()
    local x = clh.tensor({2, 2}, {3, 4, 0, 2})
    h.all_near(clh.l2_normalize(x):totable(), {0.6, 0.8, 0, 1}, 1e-6, "l2_normalize")
    local s = clh.softmax(clh.tensor({1, 3}, {1, 2, 3})):totable()
    local e = {math.exp(1), math.exp(2), math.exp(3)}
    local z = e[1] + e[2] + e[3]
    h.all_near(s, {e[1] / z, e[2] / z, e[3] / z}, 1e-6, "softmax")
    local a = clh.tensor({2, 3}, {1, 2, 3, 4, 5, 6})
    local b = clh.tensor({3, 2}, {1, 0, 0, 1, 1, 1})
    h.all_near(clh.matmul(a, b):totable(), {4, 5, 10, 11}, 1e-5, "a @ b")
    h.all_near(clh.matmul(a, a, {trans_b = true}):totable(), {14, 32, 32, 77}, 1e-4, "a @ a^T")
    h.raises("inner dimensions differ", clh.matmul, a, a)
end

return T

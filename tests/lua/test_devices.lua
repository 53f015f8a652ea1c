-- Device listing and contexts.
local h = require "helpers"
local clh = h.clh
local T = h.suite()

local STRING_FIELDS = {"platform_name", "platform_vendor", "platform_version", "name", "vendor",
                       "version", "c_version", "driver", "type", "report"}
local INT_FIELDS = {"platform_index", "device_index", "compute_units", "clock_mhz", "global_mem",
                    "max_alloc", "local_mem", "max_work_group_size"}
local BOOL_FIELDS = {"is_gpu", "is_cpu", "has_fp16", "has_fp64", "has_subgroups"}

local function check_info(d, where)
    for _, f in ipairs(STRING_FIELDS) do
        h.eq(type(d[f]), "string", where .. "." .. f)
    end
    for _, f in ipairs(INT_FIELDS) do
        h.truthy(math.type(d[f]) == "integer" and d[f] >= 0, where .. "." .. f .. " integer")
    end
    for _, f in ipairs(BOOL_FIELDS) do
        h.eq(type(d[f]), "boolean", where .. "." .. f)
    end
    h.eq(#d.max_work_item_sizes, 3, where .. ".max_work_item_sizes")
    h.truthy(d.name ~= "", where .. ".name is not empty")
    h.truthy(d.global_mem >= d.max_alloc, where .. " global_mem >= max_alloc")
    h.truthy(d.max_work_group_size >= 1, where .. " max_work_group_size >= 1")
    h.truthy(d.report:find(d.name, 1, true), where .. " report names the device")
    local types = {GPU = true, CPU = true, ACCELERATOR = true, OTHER = true}
    h.truthy(types[d.type], where .. ".type is known: " .. d.type)
    h.eq(d.is_gpu, d.type == "GPU", where .. ".is_gpu")
end

function T.devices_list_every_field()
    local ok, list = pcall(clh.devices)
    if not ok then h.skip("no OpenCL platform: " .. tostring(list)) end
    if #list == 0 then h.skip("no OpenCL device") end
    for i, d in ipairs(list) do check_info(d, "devices()[" .. i .. "]") end
end

function T.default_context_is_shared_and_describes_its_device()
    local ctx = h.ctx()
    h.eq(clh.context(), ctx, "clh.context() returns the same default")
    local d = ctx:device()
    check_info(d, "ctx:device()")
    local found = false
    for _, e in ipairs(clh.devices()) do
        found = found or (e.platform_index == d.platform_index and e.device_index ==
                    d.device_index and e.name == d.name)
    end
    h.truthy(found, "the selected device is in clh.devices()")
    h.truthy(tostring(ctx):find(d.name, 1, true), "tostring names the device")
end

function T.context_selection_by_index()
    h.ctx()
    local d = clh.devices()[1]
    local ctx <close> = clh.init {platform = d.platform_index, device = d.device_index,
                                  default = false}
    h.eq(ctx:device().name, d.name, "selected by index")
    h.truthy(clh.context() ~= ctx, "default = false keeps the default context")
end

function T.context_counters_and_profile()
    h.ctx()
    local ctx <close> = clh.init {profile = true, default = false}
    h.eq(ctx:device_bytes(), 0, "fresh context holds no device memory")
    local t = ctx:tensor({1024}, 1)
    h.truthy(ctx:device_bytes() >= 4096, "tensor bytes are accounted")
    h.truthy(ctx:peak_device_bytes() >= ctx:device_bytes(), "peak >= current")
    ctx:build_all()
    h.truthy(ctx:build_seconds() > 0, "build_all spent time in clBuildProgram")
    local y = clh.l2_normalize(t)
    h.eq(y:context(), ctx, "op output lives in the input's context")
    ctx:finish()
    local profile = ctx:profile()
    h.truthy(profile:find("l2_normalize", 1, true), "profile lists the kernel:\n" .. profile)
    h.eq(clh.profile_table(ctx), profile, "clh.profile_table")
    ctx:profile_reset()
    h.truthy(not ctx:profile():find("l2_normalize", 1, true), "reset clears the rows")
    y:free()
    h.eq(type(ctx:error()), "string", "error string")
    t:free()
    h.eq(ctx:device_bytes(), 0, "freed")
end

function T.default_context_is_recreated_after_free()
    local ctx = h.ctx()
    local t = clh.tensor({2}, 5)
    ctx:free()
    local again = clh.context()
    h.truthy(again ~= ctx, "a new default context")
    h.same(t:totable(), {5, 5}, "old tensor still valid")
    h.same(clh.tensor({1}, 1):totable(), {1}, "new default works")
end

return T

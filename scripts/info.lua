-- clinfo-like report: every OpenCL platform and device with the capabilities clhclip
-- uses, and the device the default selection picks (honouring CLHCLIP_PLATFORM and
-- CLHCLIP_DEVICE, or --platform/--device).
local paths = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib_path.lua")
local argparse = require "clhclip.argparse"

local parser = argparse.new("scripts/info.lua",
                            "List OpenCL platforms and devices and show which one clhclip picks.")
parser:option("--platform", {metavar = "P",
              help = "platform index or name substring for the selection (else $CLHCLIP_PLATFORM)"})
parser:option("--device", {metavar = "D",
              help = "device index or name substring for the selection (else $CLHCLIP_DEVICE)"})
parser:flag("--brief", {help = "one line per device"})
parser.epilog = "Environment: CLHCLIP_PLATFORM, CLHCLIP_DEVICE, CLHCLIP_BUILD (module dir, " ..
                    "now " .. paths.build .. "), POCL_CACHE_DIR (PoCL kernel cache)."

local function mib(bytes)
    if bytes >= 1 << 30 then return string.format("%.2f GiB", bytes / (1 << 30)) end
    if bytes >= 1 << 20 then return string.format("%.1f MiB", bytes / (1 << 20)) end
    return string.format("%.1f KiB", bytes / 1024)
end

local function yesno(b)
    return b and "yes" or "no"
end

local function print_device(d)
    local rows = {
        {"name", d.name},
        {"vendor", d.vendor},
        {"type", d.type},
        {"OpenCL version", d.version},
        {"OpenCL C version", d.c_version},
        {"driver", d.driver},
        {"compute units", tostring(d.compute_units)},
        {"clock", d.clock_mhz .. " MHz"},
        {"global memory", string.format("%s (%d bytes)", mib(d.global_mem), d.global_mem)},
        {"max allocation", string.format("%s (%d bytes)", mib(d.max_alloc), d.max_alloc)},
        {"local memory", string.format("%s (%d bytes)", mib(d.local_mem), d.local_mem)},
        {"max work-group size", tostring(d.max_work_group_size)},
        {"max work-item sizes", table.concat(d.max_work_item_sizes, " x ")},
        {"fp16", yesno(d.has_fp16)},
        {"fp64", yesno(d.has_fp64)},
        {"subgroups", yesno(d.has_subgroups)},
    }
    print(string.format("  device %d.%d", d.platform_index, d.device_index))
    for _, r in ipairs(rows) do print(string.format("    %-20s %s", r[1], r[2])) end
end

local function selection_text(opts)
    local p = opts.platform or os.getenv("CLHCLIP_PLATFORM")
    local d = opts.device or os.getenv("CLHCLIP_DEVICE")
    if (not p or p == "") and (not d or d == "") then
        return "default rule: first GPU, else the first device"
    end
    return string.format("platform=%s device=%s", p or "(any)", d or "(any)")
end

argparse.main(function()
    local opts = parser:parse(arg)
    local clh = paths.clhclip()
    print("clhclip " .. clh.version)
    local devices = clh.devices()
    if #devices == 0 then
        -- Let the library explain (it hints at the ICD loader and POCL_CACHE_DIR).
        local ctx, err = clh.safe.init {default = false}
        if ctx then ctx:free() end
        error(err or "no OpenCL device found", 0)
    end
    local last_platform
    for _, d in ipairs(devices) do
        if d.platform_index ~= last_platform then
            last_platform = d.platform_index
            print(string.format("platform %d: %s", d.platform_index, d.platform_name))
            print(string.format("  vendor %s; version %s", d.platform_vendor, d.platform_version))
        end
        if opts.brief then
            print(string.format("  device %d.%d: %s (%s, %d CU, %s)", d.platform_index,
                                d.device_index, d.name, d.type, d.compute_units,
                                mib(d.global_mem)))
        else
            print_device(d)
        end
    end
    local ctx = clh.init {platform = opts.platform, device = opts.device, default = false}
    local d = ctx:device()
    print(string.format("selected (%s): device %d.%d %s [%s]", selection_text(opts),
                        d.platform_index, d.device_index, d.name, d.type))
    ctx:free()
end)

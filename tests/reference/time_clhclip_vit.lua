-- Time clhclip's image-encoder forward (pooled + dense outputs) of a CLIP model folder, the
-- clhclip side of the comparison with tests/reference/time_torch_vitb16.py. Offline tool.
--   lua5.4 tests/reference/time_clhclip_vit.lua MODEL_DIR [SIZE=384] [RUNS=3]
-- (CLHCLIP_BUILD names the build directory, default build; device selection as usual.)
package.cpath = (os.getenv("CLHCLIP_BUILD") or "build") .. "/?.so;" .. package.cpath
local clh = require "clhclip"

local dir = arg[1] or error("usage: time_clhclip_vit.lua MODEL_DIR [SIZE] [RUNS]")
local size, runs = tonumber(arg[2] or 384), tonumber(arg[3] or 3)
local ctx = clh.init {}
local t0 = clh.now()
local model = clh.load_clip(dir)
print(string.format("load %.2f s", clh.now() - t0))
local px = clh.tensor({1, 3, size, size}, 0.1)
local times = {}
for i = 1, runs + 1 do
    local t = clh.now()
    model:encode_image(px, {pooled = true, dense = true}).dense:totable() -- waits for the device
    times[i] = clh.now() - t
    print(string.format("run %d: %.3f s (clBuildProgram so far %.2f s)", i, times[i],
                        ctx:build_seconds()))
end
local first = table.remove(times, 1)
table.sort(times)
print(string.format("%s %dx%d forward on %s: first call %.3f s; warm median %.3f s (min %.3f, " ..
                        "max %.3f) over %d runs", dir, size, size, ctx:device().name, first,
                    times[(#times + 1) // 2], times[1], times[#times], #times))

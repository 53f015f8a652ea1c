-- Lua test runner: runs every function of every tests/lua/test_*.lua in protected mode
-- and prints cmocka-style lines, which tests/run_tests.sh counts:
--   [ RUN      ] file.name / [       OK ] / [  FAILED  ] / [  SKIPPED ]
--   [  PASSED  ] N test(s).   [  SKIPPED ] N test(s).   [  FAILED  ] N test(s).
-- Exit status is 1 when a test failed.
--
-- usage (from the repo root): CLHCLIP_BUILD=build lua5.4 tests/lua/run.lua [PATTERN]
-- PATTERN (or $CLHCLIP_TEST) keeps only tests whose "file.name" contains it.
local here = arg[0]:match("^(.*)/") or "."
local repo = here:match("^(.*)/tests/lua$") or (here == "tests/lua" and ".") or (here .. "/../..")
local paths = dofile(repo .. "/scripts/lib_path.lua")
package.path = here .. "/?.lua;" .. package.path

local h = require "helpers"
h.lua = arg[-1] or "lua5.4"
h.repo = paths.repo
h.build = paths.build

local filter = arg[1] or os.getenv("CLHCLIP_TEST")
if filter == "" then filter = nil end

local function out(fmt, ...)
    io.stdout:write(string.format(fmt, ...), "\n")
    io.stdout:flush()
end

local passed, failed, skipped = {}, {}, {}

local ok_mod, mod = pcall(paths.clhclip)
if not ok_mod then
    out("[==========] Running 1 test(s).")
    out("[ RUN      ] lua.require_clhclip")
    out("[  ERROR   ] --- %s", tostring(mod))
    out("[  FAILED  ] lua.require_clhclip")
    out("[==========] 1 test(s) run.")
    out("[  PASSED  ] 0 test(s).")
    out("[  FAILED  ] 1 test(s), listed below:")
    out("[  FAILED  ] lua.require_clhclip")
    os.exit(1)
end
h.clh = mod

-- Collect the tests.
local tests = {}
for _, file in ipairs(h.list_dir(here, "^test_.*%.lua$")) do
    local group = file:gsub("^test_", ""):gsub("%.lua$", "")
    local chunk, err = loadfile(here .. "/" .. file)
    local suite
    if chunk then
        local ok, res = pcall(chunk)
        if ok and type(res) == "table" and res._tests then
            suite = res._tests
        else
            err = ok and (file .. " did not return a test suite") or tostring(res)
        end
    end
    if suite then
        for _, t in ipairs(suite) do
            tests[#tests + 1] = {name = group .. "." .. t.name, fn = t.fn}
        end
    else
        tests[#tests + 1] = {name = group .. ".load", fn = function() error(err, 0) end}
    end
end
if filter then
    local kept = {}
    for _, t in ipairs(tests) do
        if t.name:find(filter, 1, true) then kept[#kept + 1] = t end
    end
    tests = kept
end

local function handler(e)
    if h.is_skip(e) then return e end
    return debug.traceback(tostring(e), 2)
end

out("[==========] Running %d test(s).", #tests)
for _, t in ipairs(tests) do
    out("[ RUN      ] %s", t.name)
    local t0 = os.clock()
    local ok, err = xpcall(t.fn, handler)
    -- Collect now so that finalizer problems show up next to the test that caused them.
    collectgarbage("collect")
    collectgarbage("collect")
    if ok then
        passed[#passed + 1] = t.name
        out("[       OK ] %s (%.0f ms cpu)", t.name, (os.clock() - t0) * 1e3)
    elseif h.is_skip(err) then
        skipped[#skipped + 1] = t.name
        out("SKIP: %s", err.reason)
        out("[  SKIPPED ] %s", t.name)
    else
        failed[#failed + 1] = t.name
        for line in tostring(err):gmatch("[^\n]+") do out("[  ERROR   ] --- %s", line) end
        out("[  FAILED  ] %s", t.name)
    end
end
out("[==========] %d test(s) run.", #tests)
out("[  PASSED  ] %d test(s).", #passed)
if #skipped > 0 then
    out("[  SKIPPED ] %d test(s), listed below:", #skipped)
    for _, n in ipairs(skipped) do out("[  SKIPPED ] %s", n) end
end
if #failed > 0 then
    out("[  FAILED  ] %d test(s), listed below:", #failed)
    for _, n in ipairs(failed) do out("[  FAILED  ] %s", n) end
    out("")
    out(" %d FAILED TEST(S)", #failed)
end
-- Close the state so that every remaining finalizer runs (a crash there fails the run).
os.exit(#failed > 0 and 1 or 0, true)

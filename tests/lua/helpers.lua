-- Helpers for the Lua tests (tests/lua/test_*.lua, run by tests/lua/run.lua).
--
--   local h = require "helpers"
--   local T = h.suite()
--   function T.shape_of_new_tensor() ... end   -- registered in definition order
--   return T
local M = {}

-- A table that records `function T.name() end` definitions in order.
function M.suite()
    local list = {}
    return setmetatable({}, {
        __newindex = function(_, name, fn)
            assert(type(fn) == "function", "tests must be functions: " .. tostring(name))
            list[#list + 1] = {name = name, fn = fn}
        end,
        __index = function(_, k)
            if k == "_tests" then return list end
        end,
    })
end

local Skip = {}
Skip.__index = Skip
Skip.__tostring = function(s) return "skip: " .. s.reason end

-- Stop the current test and report it as skipped with `reason`.
function M.skip(reason)
    error(setmetatable({reason = reason}, Skip), 0)
end

function M.is_skip(e)
    return getmetatable(e) == Skip
end

local function fmt(v)
    if type(v) == "string" then return string.format("%q", v) end
    return tostring(v)
end

local function fail(msg, level)
    error(msg, (level or 1) + 2)
end

function M.eq(actual, expected, what)
    if actual ~= expected then
        fail(string.format("%s: expected %s, got %s", what or "value", fmt(expected), fmt(actual)))
    end
end

function M.truthy(v, what)
    if not v then fail((what or "condition") .. " is false") end
end

function M.near(actual, expected, tol, what)
    if type(actual) ~= "number" or math.abs(actual - expected) > tol then
        fail(string.format("%s: expected %s +- %g, got %s", what or "value", fmt(expected), tol,
                           fmt(actual)))
    end
end

-- Element-wise equality of two arrays of numbers within tol.
function M.all_near(actual, expected, tol, what)
    what = what or "array"
    if #actual ~= #expected then
        fail(string.format("%s: length %d, expected %d", what, #actual, #expected))
    end
    for i = 1, #expected do
        if math.abs(actual[i] - expected[i]) > tol then
            fail(string.format("%s[%d]: expected %s +- %g, got %s", what, i, fmt(expected[i]), tol,
                               fmt(actual[i])))
        end
    end
end

-- Element-wise exact equality of two arrays (numbers, strings, ...).
function M.same(actual, expected, what)
    what = what or "array"
    if type(actual) ~= "table" then fail(what .. ": expected a table, got " .. fmt(actual)) end
    if #actual ~= #expected then
        fail(string.format("%s: length %d, expected %d", what, #actual, #expected))
    end
    for i = 1, #expected do
        if actual[i] ~= expected[i] then
            fail(string.format("%s[%d]: expected %s, got %s", what, i, fmt(expected[i]),
                               fmt(actual[i])))
        end
    end
end

-- fn(...) must raise an error whose message contains `needle` (plain text).
function M.raises(needle, fn, ...)
    local ok, err = pcall(fn, ...)
    if ok then fail("expected an error containing " .. fmt(needle) .. ", but the call succeeded") end
    err = tostring(err)
    if needle and not err:find(needle, 1, true) then
        fail(string.format("expected an error containing %s, got %s", fmt(needle), fmt(err)))
    end
    return err
end

-- max |a - b| and max |b| of two equally long arrays.
function M.max_abs_err(a, b)
    assert(#a == #b, string.format("length %d vs %d", #a, #b))
    local err, mag = 0, 0
    for i = 1, #a do
        err = math.max(err, math.abs(a[i] - b[i]))
        mag = math.max(mag, math.abs(b[i]))
    end
    return err, mag
end

-- Set by run.lua: the module, the repository root and the build directory.
M.clh = nil
M.repo = "."
M.build = "build"

-- The default context, or skip when no OpenCL device is usable.
function M.ctx()
    local ctx, err = M.clh.safe.context()
    if not ctx then M.skip("no OpenCL device: " .. tostring(err)) end
    return ctx
end

function M.exists(path)
    local f = io.open(path, "rb")
    if f then f:close() end
    return f ~= nil
end

function M.is_dir(path)
    local f = io.open(path .. "/.", "rb")
    if f then f:close() end
    return f ~= nil
end

-- Shared data dir (../shared/data or $CLHCLIP_SHARED_DATA), or skip.
function M.shared_data()
    local dir = os.getenv("CLHCLIP_SHARED_DATA")
    if not dir or dir == "" then dir = M.repo .. "/../shared/data" end
    if not M.is_dir(dir) then
        M.skip("../shared/data is absent (set CLHCLIP_SHARED_DATA)")
    end
    return dir
end

function M.shared(rel)
    local path = M.shared_data() .. "/" .. rel
    if not M.exists(path) and not M.is_dir(path) then M.skip(path .. " is absent") end
    return path
end

-- Committed fixture path, or skip when absent.
function M.fixture(rel)
    local path = M.repo .. "/tests/fixtures/" .. rel
    if not M.exists(path) and not M.is_dir(path) then
        M.skip("fixture " .. path .. " is absent")
    end
    return path
end

-- Names in a directory matching a Lua pattern (sorted).
function M.list_dir(dir, pattern)
    local out = {}
    local p = io.popen("ls -1 " .. M.shell_quote(dir) .. " 2>/dev/null")
    if p then
        for name in p:lines() do
            if not pattern or name:match(pattern) then out[#out + 1] = name end
        end
        p:close()
    end
    table.sort(out)
    return out
end

function M.tmpname(suffix)
    local name = os.tmpname()
    os.remove(name)
    return name .. (suffix or "")
end

function M.shell_quote(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

M.lua = "lua5.4" -- replaced by the runner's interpreter

-- Run a script with arguments (an array); returns output (stdout+stderr) and exit code.
function M.run_script(script, args, env)
    local parts = {}
    for k, v in pairs(env or {}) do parts[#parts + 1] = k .. "=" .. M.shell_quote(v) end
    parts[#parts + 1] = M.shell_quote(M.lua)
    parts[#parts + 1] = M.shell_quote(script)
    for _, a in ipairs(args or {}) do parts[#parts + 1] = M.shell_quote(a) end
    local cmd = table.concat(parts, " ") .. " 2>&1"
    local p = assert(io.popen(cmd, "r"))
    local out = p:read("a")
    local _, how, code = p:close()
    if how ~= "exit" then code = 128 + (code or 0) end
    return out, code
end

-- Minimal JSON string literal decoder (the golden tokenizer files quote their inputs).
function M.json_string(s)
    assert(s:sub(1, 1) == '"' and s:sub(-1) == '"', "not a JSON string: " .. s)
    local out, i, n = {}, 2, #s - 1
    local map = {['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r",
                 t = "\t"}
    while i <= n do
        local c = s:sub(i, i)
        if c ~= "\\" then
            out[#out + 1] = c
            i = i + 1
        else
            local e = s:sub(i + 1, i + 1)
            if e == "u" then
                local cp = tonumber(s:sub(i + 2, i + 5), 16)
                i = i + 6
                if cp >= 0xD800 and cp <= 0xDBFF and s:sub(i, i + 1) == "\\u" then
                    local lo = tonumber(s:sub(i + 2, i + 5), 16)
                    cp = 0x10000 + (cp - 0xD800) * 0x400 + (lo - 0xDC00)
                    i = i + 6
                end
                out[#out + 1] = utf8.char(cp)
            else
                out[#out + 1] = assert(map[e], "bad escape \\" .. e)
                i = i + 2
            end
        end
    end
    return table.concat(out)
end

return M

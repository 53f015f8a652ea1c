-- Small command-line parser for clhclip scripts (torch CmdLine / llm.c error_usage idea):
-- every option is declared with its help text, so --help lists all of them and unknown or
-- malformed arguments give one clear message.
--
--   local argparse = require "clhclip.argparse"
--   local p = argparse.new("zeroshot.lua", "Zero-shot classification of one image.")
--   p:option("--model", {metavar = "DIR", required = true, help = "CLIP model directory"})
--   p:option("--top", {type = "integer", default = 5, help = "labels to print"})
--   p:flag("--profile", {help = "print per-kernel times"})
--   argparse.main(function()
--       local opts = p:parse(arg)     -- opts.model, opts.top, opts.profile
--       ...
--   end)
--
-- Option "--top-k" is stored as opts.top_k. Values are given as "--opt value" or "--opt=value".
-- parse() raises a usage error (a string without position) for bad input, and on --help
-- prints the help text and exits with status 0. argparse.main(fn) runs fn and turns any
-- error into "error: <message>" on stderr and exit status 1 (CLHCLIP_DEBUG=1 adds the
-- error position and a traceback).

local M = {}

local Parser = {}
Parser.__index = Parser

local TYPES = {string = true, number = true, integer = true}

function M.new(prog, description)
    local p = setmetatable({prog = prog, description = description, options = {}, by_name = {}},
                           Parser)
    p:flag("--help", {help = "show this help and exit"})
    return p
end

local function key_of(name)
    return (name:gsub("^%-%-", ""):gsub("%-", "_"))
end

local function add(p, name, spec, is_flag)
    assert(type(name) == "string" and name:match("^%-%-[%w][%w%-]*$"), "bad option name")
    assert(not p.by_name[name], "option declared twice: " .. name)
    spec = spec or {}
    local o = {
        name = name,
        key = key_of(name),
        flag = is_flag,
        help = spec.help or "",
        metavar = spec.metavar or (spec.type == "integer" and "N") or
            (spec.type == "number" and "X") or "VALUE",
        type = spec.type or "string",
        default = spec.default,
        required = spec.required,
        choices = spec.choices,
    }
    assert(TYPES[o.type], "bad option type for " .. name)
    p.options[#p.options + 1] = o
    p.by_name[name] = o
    return p
end

-- p:option("--name", {help=, metavar=, type="string"|"number"|"integer", default=,
--                     required=, choices={...}})
function Parser:option(name, spec)
    return add(self, name, spec, false)
end

-- p:flag("--name", {help=}) : a boolean switch, false unless given.
function Parser:flag(name, spec)
    return add(self, name, spec, true)
end

function Parser:usage()
    local parts = {"usage: lua5.4 " .. self.prog}
    for _, o in ipairs(self.options) do
        local s = o.flag and o.name or (o.name .. " " .. o.metavar)
        parts[#parts + 1] = o.required and s or ("[" .. s .. "]")
    end
    return table.concat(parts, " ")
end

function Parser:help()
    local lines = {self:usage(), ""}
    if self.description then
        lines[#lines + 1] = self.description
        lines[#lines + 1] = ""
    end
    lines[#lines + 1] = "options:"
    local width = 0
    local heads = {}
    for i, o in ipairs(self.options) do
        heads[i] = o.flag and o.name or (o.name .. " " .. o.metavar)
        width = math.max(width, #heads[i])
    end
    for i, o in ipairs(self.options) do
        local extra = {}
        if o.required then extra[#extra + 1] = "required" end
        if o.choices then extra[#extra + 1] = "one of: " .. table.concat(o.choices, ", ") end
        if o.default ~= nil and not o.flag then
            extra[#extra + 1] = "default: " .. tostring(o.default)
        end
        local help = o.help
        if #extra > 0 then help = help .. " (" .. table.concat(extra, "; ") .. ")" end
        lines[#lines + 1] = string.format("  %-" .. width .. "s  %s", heads[i], help)
    end
    if self.epilog then
        lines[#lines + 1] = ""
        lines[#lines + 1] = self.epilog
    end
    return table.concat(lines, "\n")
end

local function usage_error(p, fmt, ...)
    error(string.format(fmt, ...) .. " (see --help)", 0)
end

local function convert(p, o, value)
    if o.type == "integer" then
        local n = math.tointeger(tonumber(value))
        if not n then usage_error(p, "%s expects an integer, got '%s'", o.name, value) end
        value = n
    elseif o.type == "number" then
        local n = tonumber(value)
        if not n then usage_error(p, "%s expects a number, got '%s'", o.name, value) end
        value = n
    end
    if o.choices then
        local ok = false
        for _, c in ipairs(o.choices) do ok = ok or c == value end
        if not ok then
            usage_error(p, "%s must be one of %s, got '%s'", o.name,
                        table.concat(o.choices, ", "), tostring(value))
        end
    end
    return value
end

-- Parse an argument array (the script's `arg`). Returns the options table.
function Parser:parse(args)
    local opts, seen = {}, {}
    local i = 1
    while args[i] ~= nil do
        local a = args[i]
        local name, inline = a:match("^(%-%-[^=]+)=(.*)$")
        name = name or a
        local o = self.by_name[name]
        if not o then
            if a:sub(1, 1) == "-" then
                usage_error(self, "unknown option '%s'", name)
            end
            usage_error(self, "unexpected argument '%s'", a)
        end
        if o.flag then
            if inline then usage_error(self, "%s takes no value", o.name) end
            opts[o.key] = true
        else
            local value = inline
            if value == nil then
                i = i + 1
                value = args[i]
                if value == nil then usage_error(self, "%s needs a value", o.name) end
            end
            opts[o.key] = convert(self, o, value)
        end
        seen[o.key] = true
        i = i + 1
    end
    if opts.help then
        print(self:help())
        os.exit(0)
    end
    for _, o in ipairs(self.options) do
        if not seen[o.key] then
            if o.required then usage_error(self, "%s is required", o.name) end
            if o.flag then
                opts[o.key] = false
            else
                opts[o.key] = o.default
            end
        end
    end
    return opts
end

-- Run fn(); on error print "error: <message>" to stderr and exit with status 1.
function M.main(fn, ...)
    local debug_mode = os.getenv("CLHCLIP_DEBUG") == "1"
    local ok, err = xpcall(fn, function(e)
        local msg = tostring(e)
        if debug_mode then return debug.traceback(msg, 2) end
        -- Library errors carry the calling script line ("x.lua:12: "); users need only
        -- the message (CLHCLIP_DEBUG=1 keeps it, with a traceback).
        msg = msg:gsub("^[^:\n]+%.lua:%d+: ", "")
        return msg
    end, ...)
    if not ok then
        io.stderr:write("error: ", err, "\n")
        os.exit(1)
    end
end

return M

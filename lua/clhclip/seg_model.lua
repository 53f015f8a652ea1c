-- Model resolution for the segmentation scripts (segment.lua, eval.lua, train.lua, demo.lua):
-- one place that turns a `--model` argument into a ready clh.segmodel.
--
--   local seg_model = require "clhclip.seg_model"
--   seg_model.add_options(parser, {image_size = true})   -- --model --clip --vocab --template ...
--   local args = seg_model.join_repeated(arg, "--template", ";")
--   local opts = parser:parse(args)
--   local r = seg_model.load(clh, {model = opts.model, clip = opts.clip, vocab = opts.vocab,
--                                  template = opts.template, image_size = opts.image_size,
--                                  ctx = ctx, warn = function(msg) io.stderr:write(msg, "\n") end})
--   r.model:set_classes(names, r.tokenizer)
--
-- A model path is one of
--   (a) "checkpoint": a training checkpoint *.safetensors (metadata "segmodel"). Its metadata
--       "extra" is a JSON object whose "clip" field names the CLIP it was trained on
--       (`clip` overrides it; a relative path is tried as given, then next to the checkpoint).
--   (b) "export": a folded export folder (config.json + model.safetensors + head.safetensors),
--       or that folder's head.safetensors itself.
--   (c) "clip": a plain CLIP folder or .safetensors file; the head is freshly initialised
--       (untrained) and a warning is given.
local M = {}

M.DEFAULT_TEMPLATE = "A photo of a {} in the scene"

------------------------------------------------------------------------------ JSON (decode)

local json_escapes = {['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n",
                      r = "\r", t = "\t"}

local function json_error(s, i, what)
    error(string.format("bad JSON at character %d: %s", i, what), 0)
end

local function skip_space(s, i)
    return s:find("[^ \t\r\n]", i) or #s + 1
end

local decode_value

local function decode_string(s, i)
    local out = {}
    i = i + 1
    while true do
        local c = s:sub(i, i)
        if c == "" then json_error(s, i, "unterminated string") end
        if c == '"' then return table.concat(out), i + 1 end
        if c == "\\" then
            local e = s:sub(i + 1, i + 1)
            if e == "u" then
                local cp = tonumber(s:sub(i + 2, i + 5), 16)
                if not cp then json_error(s, i, "bad \\u escape") end
                i = i + 6
                if cp >= 0xD800 and cp <= 0xDBFF and s:sub(i, i + 1) == "\\u" then
                    local lo = tonumber(s:sub(i + 2, i + 5), 16) or 0xDC00
                    cp = 0x10000 + (cp - 0xD800) * 0x400 + (lo - 0xDC00)
                    i = i + 6
                end
                out[#out + 1] = utf8.char(cp)
            else
                local r = json_escapes[e]
                if not r then json_error(s, i, "bad escape \\" .. e) end
                out[#out + 1] = r
                i = i + 2
            end
        else
            local j = s:find('["\\]', i) or #s + 1
            out[#out + 1] = s:sub(i, j - 1)
            i = j
        end
    end
end

local function decode_array(s, i)
    local out = {}
    i = skip_space(s, i + 1)
    if s:sub(i, i) == "]" then return out, i + 1 end
    while true do
        out[#out + 1], i = decode_value(s, i)
        i = skip_space(s, i)
        local c = s:sub(i, i)
        if c == "]" then return out, i + 1 end
        if c ~= "," then json_error(s, i, "expected ',' or ']'") end
        i = i + 1
    end
end

local function decode_object(s, i)
    local out = {}
    i = skip_space(s, i + 1)
    if s:sub(i, i) == "}" then return out, i + 1 end
    while true do
        i = skip_space(s, i)
        if s:sub(i, i) ~= '"' then json_error(s, i, "expected a key string") end
        local key
        key, i = decode_string(s, i)
        i = skip_space(s, i)
        if s:sub(i, i) ~= ":" then json_error(s, i, "expected ':'") end
        out[key], i = decode_value(s, i + 1)
        i = skip_space(s, i)
        local c = s:sub(i, i)
        if c == "}" then return out, i + 1 end
        if c ~= "," then json_error(s, i, "expected ',' or '}'") end
        i = i + 1
    end
end

local literals = {["true"] = true, ["false"] = false}

decode_value = function(s, i)
    i = skip_space(s, i)
    local c = s:sub(i, i)
    if c == '"' then return decode_string(s, i) end
    if c == "[" then return decode_array(s, i) end
    if c == "{" then return decode_object(s, i) end
    local word = s:match("^%a+", i)
    if word then
        if word == "null" then return nil, i + 4 end
        if literals[word] ~= nil then return literals[word], i + #word end
        json_error(s, i, "unknown literal '" .. word .. "'")
    end
    local num = s:match("^-?%d+%.?%d*[eE]?[-+]?%d*", i)
    if num and tonumber(num) then return tonumber(num), i + #num end
    json_error(s, i, "unexpected character '" .. c .. "'")
end

-- Decode a JSON text (objects -> tables with string keys, arrays -> sequences, null -> nil).
function M.json_decode(s)
    local v, i = decode_value(s, 1)
    i = skip_space(s, i)
    if i <= #s then json_error(s, i, "trailing characters") end
    return v
end

------------------------------------------------------------------------------ helpers

local function trim(s)
    return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end
M.trim = trim

local function is_file(path)
    local f = io.open(path, "rb")
    if not f then return false end
    -- Reading a directory fails on Linux; a readable file gives data or EOF.
    local ok = f:read(0) ~= nil or f:read("a") ~= nil
    f:close()
    return ok
end
M.is_file = is_file

local function is_dir(path)
    local f = io.open(path .. "/.", "rb")
    if f then f:close() end
    return f ~= nil
end
M.is_dir = is_dir

local function dirname(path)
    return path:match("^(.*)/[^/]*$") or "."
end

-- Arguments with every repeated `name VALUE` / `name=VALUE` merged into one, joined by
-- `sep` (argparse keeps only the last value of an option).
function M.join_repeated(args, name, sep)
    local out, values, first = {}, {}, nil
    local i = 1
    while args[i] ~= nil do
        local a = args[i]
        local inline = a:sub(1, #name + 1) == name .. "=" and a:sub(#name + 2) or nil
        if a == name and args[i + 1] ~= nil then
            values[#values + 1] = args[i + 1]
            first = first or #out + 1
            out[#out + 1] = false
            i = i + 2
        elseif inline then
            values[#values + 1] = inline
            first = first or #out + 1
            out[#out + 1] = false
            i = i + 1
        else
            out[#out + 1] = a
            i = i + 1
        end
    end
    local result = {}
    for k, a in ipairs(out) do
        if k == first then
            result[#result + 1] = name
            result[#result + 1] = table.concat(values, sep)
        elseif a then
            result[#result + 1] = a
        end
    end
    return result
end

-- Templates from a ';'-separated string (or an array); each must contain "{}".
function M.parse_templates(spec)
    local list = {}
    if type(spec) == "table" then
        for _, t in ipairs(spec) do list[#list + 1] = t end
    else
        for item in (spec .. ";"):gmatch("([^;]*);") do
            item = trim(item)
            if item ~= "" then list[#list + 1] = item end
        end
    end
    if #list == 0 then error("--template is empty", 0) end
    for _, t in ipairs(list) do
        if not t:find("{}", 1, true) then
            error(string.format("template '%s' has no {} for the class name", t), 0)
        end
    end
    return list
end

-- Class names from a file (one class per line, kept whole: "cat, kitty" stays one class
-- whose first synonym the model uses) when `spec` names a readable file, else from a
-- comma-separated list. Blank lines and surrounding spaces are dropped.
function M.read_classes(spec, what)
    what = what or "--classes"
    local names = {}
    if is_file(spec) then
        local f, err = io.open(spec, "r")
        if not f then error(string.format("cannot open %s file: %s", what, err), 0) end
        for line in f:lines() do
            line = trim(line)
            if line ~= "" then names[#names + 1] = line end
        end
        f:close()
        if #names == 0 then error(string.format("%s file '%s' holds no class names", what, spec), 0) end
    else
        for item in (spec .. ","):gmatch("([^,]*),") do
            item = trim(item)
            if item ~= "" then names[#names + 1] = item end
        end
        if #names == 0 then
            error(string.format("%s '%s' is neither a readable file nor a comma-separated list",
                                what, spec), 0)
        end
    end
    return names
end

-- The name used for display: the first synonym ("building, edifice" -> "building").
function M.display_name(name)
    return (name:match("^(.-),%s") or name)
end

------------------------------------------------------------------------------ resolution

local function st_metadata(clh, path, key)
    local f = clh.safe.safetensors(path)
    if not f then return nil end
    local v = f:metadata(key)
    f:close()
    return v
end

-- What a --model path is: returns kind ("checkpoint" | "export" | "clip") and a table with
-- the paths involved ({weights=, clip=}).
function M.classify(clh, path)
    if is_dir(path) then
        if is_file(path .. "/head.safetensors") then
            return "export", {clip = path, weights = path .. "/head.safetensors"}
        end
        return "clip", {clip = path}
    end
    if not is_file(path) then error(string.format("--model '%s' does not exist", path), 0) end
    if st_metadata(clh, path, "format") == "clhclip-seghead" then
        return "export", {clip = dirname(path), weights = path}
    end
    if st_metadata(clh, path, "segmodel") then return "checkpoint", {weights = path} end
    return "clip", {clip = path}
end

-- The CLIP a checkpoint names in its "extra" metadata, resolved against the checkpoint's
-- folder when the stored path does not exist as given.
local function checkpoint_clip(clh, path)
    local extra_json = st_metadata(clh, path, "extra")
    local extra = {}
    if extra_json and extra_json ~= "" then
        local ok, v = pcall(M.json_decode, extra_json)
        if ok and type(v) == "table" then extra = v end
    end
    local clip = extra.clip
    if type(clip) ~= "string" or clip == "" then
        error(string.format("checkpoint '%s' does not record its CLIP (metadata extra.clip); " ..
                                "pass --clip DIR", path), 0)
    end
    if clip:sub(1, 1) ~= "/" and not (is_dir(clip) or is_file(clip)) then
        local near = dirname(path) .. "/" .. clip
        if is_dir(near) or is_file(near) then clip = near end
    end
    return clip, extra, extra_json
end

-- Largest power-of-two adapter block (<= 128) dividing both tower widths.
local function block_size_for(cfg)
    local b = 128
    while b > 1 and (cfg.vision.hidden % b ~= 0 or cfg.text.hidden % b ~= 0) do b = b // 2 end
    return b
end

-- Options for a fresh (untrained) head on `clip`.
function M.fresh_options(clip, image_size)
    return {image_size = image_size or 384, seed = 0,
            adapter = {block_size = block_size_for(clip:config()), ortho = "text"}}
end

local function load_tokenizer(clh, vocab, clip)
    local tok, path
    if vocab then
        tok, path = clh.tokenizer(vocab), vocab
    else
        local p, err = clh.default_vocab()
        if not p then error(err .. " (pass --vocab FILE)", 0) end
        tok, path = clh.default_tokenizer(), p
    end
    local model_vocab = clip:config().vocab_size
    if model_vocab and tok:vocab_size() > model_vocab then
        error(string.format("the tokenizer (%s) has %d tokens but the model's vocabulary has " ..
                                "%d; pass a matching --vocab", path, tok:vocab_size(),
                            model_vocab), 0)
    end
    return tok, path
end

-- Load a segmentation model. spec: model (path, required), clip (overrides a checkpoint's
-- CLIP), vocab, template (';'-separated string or array; overrides stored templates),
-- image_size (only for a fresh head), ctx, warn (function(msg); default: stderr).
-- Returns {model=, clip=, tokenizer=, vocab=, kind=, clip_path=, weights=, options=,
--          templates=, extra= (decoded table or nil), extra_json=}.
function M.load(clh, spec)
    local warn = spec.warn or function(msg) io.stderr:write("warning: ", msg, "\n") end
    local kind, where = M.classify(clh, spec.model)
    local r = {kind = kind, weights = where.weights}
    local options, templates_json
    if kind == "checkpoint" then
        options, templates_json = clh.segmodel_options(where.weights)
        local clip_path, extra, extra_json = nil, nil, nil
        if spec.clip then
            clip_path = spec.clip
            extra_json = st_metadata(clh, where.weights, "extra")
        else
            clip_path, extra, extra_json = checkpoint_clip(clh, where.weights)
        end
        r.clip_path, r.extra, r.extra_json = clip_path, extra, extra_json
    elseif kind == "export" then
        if spec.clip then error("--clip does not apply to a folded export (it holds its CLIP)", 0) end
        options, templates_json = clh.segmodel_options(where.weights)
        r.clip_path = where.clip
    else
        r.clip_path = spec.clip or where.clip
    end
    if spec.image_size and kind ~= "clip" then
        error("--image-size only applies to an untrained head (a plain CLIP --model); " ..
                  "a trained model keeps its own", 0)
    end
    r.clip = clh.load_clip(r.clip_path, spec.ctx)
    if kind == "export" then
        -- The adapters are folded into the export's CLIP; the model's own adapters stay at
        -- the identity, so any block size that fits the towers will do.
        local cfg, a = r.clip:config(), options.adapter or {}
        if not a.block_size or a.block_size < 1 or cfg.vision.hidden % a.block_size ~= 0 or
            cfg.text.hidden % a.block_size ~= 0 then
            options.adapter = {block_size = block_size_for(cfg), ortho = a.ortho or "text"}
        end
    end
    if kind == "clip" then
        options = M.fresh_options(r.clip, spec.image_size)
        warn(string.format("'%s' is a plain CLIP: the segmentation head is freshly " ..
                               "initialised and UNTRAINED (predictions are meaningless; " ..
                               "useful for timing)", spec.model))
    end
    r.options = options
    r.model = clh.segmodel(r.clip, options)
    if kind ~= "clip" then
        local info = r.model:load(where.weights)
        if info.extra and info.extra ~= "" then
            r.extra_json = info.extra
            local ok, v = pcall(M.json_decode, info.extra)
            if ok and type(v) == "table" then r.extra = v end
        end
    end
    r.templates = M.apply_templates(r.model, options, templates_json, spec.template)
    r.tokenizer, r.vocab = load_tokenizer(clh, spec.vocab, r.clip)
    return r
end

-- Set the model's templates: `override` (string or array) if given, else the stored JSON
-- list, else the model's default. Returns the list in use.
function M.apply_templates(model, options, templates_json, override)
    local list
    if override then
        list = M.parse_templates(override)
    elseif templates_json and templates_json ~= "" then
        list = M.json_decode(templates_json)
    end
    local n = options.head and options.head.n_prompts
    if not list then
        if n and n > 1 then return nil end -- keep what the model holds
        return {M.DEFAULT_TEMPLATE}
    end
    if n and #list ~= n then
        error(string.format("%d template(s) given but the head takes %d prompt(s) " ..
                                "(n_prompts); give %d ';'-separated --template values", #list,
                            n, n), 0)
    end
    model:set_templates(list)
    return list
end

-- Declare the shared model flags on an argparse parser. what: {required=true|false,
-- image_size=true (add --image-size)}.
function M.add_options(parser, what)
    what = what or {}
    parser:option("--model", {metavar = "M", required = what.required ~= false,
                  help = "a training checkpoint (.safetensors), a folded export folder " ..
                      "(config.json + model.safetensors + head.safetensors), or a plain CLIP " ..
                      "folder/file (untrained head, for timing)"})
    parser:option("--clip", {metavar = "DIR",
                  help = "CLIP the checkpoint was trained on (default: the path stored in " ..
                      "the checkpoint)"})
    parser:option("--vocab", {metavar = "FILE",
                  help = "tokenizer vocabulary (bpe .txt.gz, vocab.json or a directory); " ..
                      "default: $CLHCLIP_VOCAB or ../shared/data/bpe_simple_vocab_16e6.txt.gz"})
    parser:option("--template", {metavar = "TEXT",
                  help = "prompt template with {} for the class name; repeat it or separate " ..
                      "with ';' for several (as many as the head's prompts; default: the " ..
                      "model's own, else \"" .. M.DEFAULT_TEMPLATE .. "\")"})
    if what.image_size then
        parser:option("--image-size", {type = "integer", metavar = "N",
                      help = "model input size for an untrained head on a plain CLIP " ..
                          "(default 384)"})
    end
    parser:option("--platform", {metavar = "P", help = "OpenCL platform index or name substring"})
    parser:option("--device", {metavar = "D", help = "OpenCL device index or name substring"})
end

return M

-- Tokenizer through the binding: the committed tiny vocabulary (tests/fixtures/tokenizer)
-- and, when ../shared/data is present, the real CLIP vocabulary and its golden ids.
local h = require "helpers"
local clh = h.clh
local T = h.suite()

local function ids_of(s)
    local out = {}
    for n in s:gmatch("%d+") do out[#out + 1] = math.tointeger(tonumber(n)) end
    return out
end

-- Lines "JSON-string<TAB>ids" -> {{text, ids}, ...}
local function read_golden(path)
    local cases = {}
    for line in io.lines(path) do
        local text, ids = line:match('^(".*")\t(.*)$')
        if text then cases[#cases + 1] = {h.json_string(text), ids_of(ids)} end
    end
    assert(#cases > 0, "no cases in " .. path)
    return cases
end

local function tiny()
    return clh.tokenizer(h.fixture("tokenizer/tiny_merges.txt.gz"))
end

function T.tiny_vocab_encode_matches_golden()
    local tok <close> = tiny()
    h.eq(tok:vocab_size(), 824, "vocab size")
    h.eq(tok:sot(), 822, "sot")
    h.eq(tok:eot(), 823, "eot")
    h.truthy(tostring(tok):find("824", 1, true), "tostring: " .. tostring(tok))
    local cases = read_golden(h.fixture("tokenizer/tiny_golden.tsv"))
    for i, c in ipairs(cases) do
        h.same(tok:encode(c[1]), c[2], string.format("case %d %q", i, c[1]))
    end
end

function T.tiny_vocab_decode_matches_golden()
    local tok <close> = tiny()
    local n = 0
    for line in io.lines(h.fixture("tokenizer/tiny_decode.tsv")) do
        local ids, text = line:match('^([%d ]*)\t(".*")$')
        if ids then
            n = n + 1
            h.eq(tok:decode(ids_of(ids)), h.json_string(text), "decode line " .. n)
        end
    end
    h.truthy(n > 0, "decode cases found")
end

function T.hf_vocab_json_directory()
    local tok <close> = clh.tokenizer(h.fixture("tokenizer/tiny_hf"))
    for i, c in ipairs(read_golden(h.fixture("tokenizer/tiny_hf_golden.tsv"))) do
        h.same(tok:encode(c[1]), c[2], string.format("case %d %q", i, c[1]))
    end
end

function T.tokenize_pads_and_checks_length()
    local tok <close> = tiny()
    local rows = tok:tokenize({"a photo of a cat", "photographic cathedral"}, {context = 10})
    h.eq(#rows, 2, "rows")
    h.same(rows[1], {822, 320, 534, 532, 320, 542, 823, 0, 0, 0}, "row 1")
    h.same(rows[2], {822, 694, 635, 823, 0, 0, 0, 0, 0, 0}, "row 2")
    local single = tok:tokenize("a photo of a cat")
    h.eq(#single, 1, "a string gives one row")
    h.eq(#single[1], 77, "default context is 77")
    h.raises(nil, tok.tokenize, tok, "a photo of a cat", {context = 6})
    local cut = tok:tokenize("a photo of a cat", {context = 6, truncate = true})[1]
    h.same(cut, {822, 320, 534, 532, 320, 823}, "truncated keeps EOT last")
    h.raises(nil, tok.tokenize, tok, "   ")
    h.raises("texts[2] must be a string (got number)", tok.tokenize, tok, {"a", 5})
    h.raises("option 'truncate' must be a boolean", tok.tokenize, tok, "a", {truncate = 1})
    h.raises("context must be 2..65536", tok.tokenize, tok, "a", {context = 1})
    h.same(tok:encode(""), {}, "empty text encodes to no ids")
    h.raises("ids[2] must be an integer", tok.decode, tok, {320, "x"})
end

function T.free_twice_and_use_after_free()
    local tok = tiny()
    tok:free()
    tok:free()
    h.raises("tokenizer was freed", tok.encode, tok, "a")
    h.eq(tostring(tok), "clhclip.Tokenizer (freed)", "tostring")
end

function T.real_vocab_matches_golden_ids()
    local vocab = h.shared("bpe_simple_vocab_16e6.txt.gz")
    local tok <close> = clh.tokenizer(vocab)
    h.eq(tok:vocab_size(), 49408, "vocab size")
    h.eq(tok:sot(), 49406, "sot")
    h.eq(tok:eot(), 49407, "eot")
    for i, c in ipairs(read_golden(h.shared("clip_tokenizer_golden.txt"))) do
        local row = tok:tokenize(c[1])[1]
        local want = {}
        for j = 1, 77 do want[j] = c[2][j] or 0 end
        h.same(row, want, string.format("golden case %d", i))
    end
    for i, c in ipairs(read_golden(h.shared("clip_tokenizer_golden_nospecial.txt"))) do
        h.same(tok:encode(c[1]), c[2], string.format("nospecial case %d", i))
    end
    h.eq(tok:decode(tok:encode("a photo of a cat")), "a photo of a cat ", "decode(encode)")
    local long = string.rep("word ", 100)
    h.raises(nil, tok.tokenize, tok, long)
    local cut = tok:tokenize(long, {truncate = true})[1]
    h.eq(#cut, 77, "truncated length")
    h.eq(cut[77], 49407, "EOT last")
end

function T.default_tokenizer_and_hf_directory_agree()
    local vocab = h.shared("bpe_simple_vocab_16e6.txt.gz")
    local hf = h.shared("hf_clip-vit-base-patch16")
    h.eq(type(clh.default_vocab()), "string", "default vocab found")
    local rows = clh.tokenize({"a photo of a dog", "Hello World!"})
    local tok <close> = clh.tokenizer(hf)
    h.same(tok:tokenize("a photo of a dog")[1], rows[1], "HF vocab.json dir vs default")
    local gz <close> = clh.tokenizer(vocab)
    h.same(gz:tokenize("Hello World!")[1], rows[2], "explicit .gz vs default")
    h.eq(clh.default_tokenizer():vocab_size(), 49408, "default tokenizer")
end

return T

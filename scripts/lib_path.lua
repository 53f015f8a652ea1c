-- Makes `require "clhclip"` and `require "clhclip.argparse"` work from any working
-- directory. Load it from a script with
--   local paths = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib_path.lua")
-- It finds the repository from this file's own path and prepends
--   package.cpath: <build>/?.so   (<build> = $CLHCLIP_BUILD or <repo>/build)
--   package.path:  <repo>/lua/?.lua;<repo>/lua/?/init.lua
-- and returns {repo = ..., build = ..., shared_data = ..., clhclip = function}: call
-- paths.clhclip() to load the module with a helpful message when it is not built. A relative $CLHCLIP_BUILD
-- is taken relative to the working directory when it holds clhclip.so there, else
-- relative to the repository.

local function dirname(p)
    return p:match("^(.*)/[^/]*$") or "."
end

local function exists(path)
    local f = io.open(path, "rb")
    if f then f:close() end
    return f ~= nil
end

local source = debug.getinfo(1, "S").source
local here = source:sub(1, 1) == "@" and source:sub(2) or "scripts/lib_path.lua"
local scripts_dir = dirname(here)
local repo = scripts_dir:match("^(.*)/scripts$") or
                 (scripts_dir == "scripts" and ".") or (scripts_dir .. "/..")

local build = os.getenv("CLHCLIP_BUILD")
if not build or build == "" then
    build = repo .. "/build"
elseif build:sub(1, 1) ~= "/" and not exists(build .. "/clhclip.so") then
    build = repo .. "/" .. build
end

local shared = os.getenv("CLHCLIP_SHARED_DATA")
if not shared or shared == "" then shared = repo .. "/../shared/data" end

package.cpath = build .. "/?.so;" .. package.cpath
package.path = repo .. "/lua/?.lua;" .. repo .. "/lua/?/init.lua;" .. package.path

local paths = {repo = repo, build = build, shared_data = shared}

-- require "clhclip" with a hint when the module has not been built.
function paths.clhclip()
    local ok, mod = pcall(require, "clhclip")
    if ok then return mod end
    local first = tostring(mod):match("^[^\n]*")
    error(string.format("cannot load the clhclip Lua module from %s (build it with `make`, " ..
                            "or set CLHCLIP_BUILD to the build directory): %s", build, first), 0)
end

return paths

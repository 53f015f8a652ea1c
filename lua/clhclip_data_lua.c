/* Lua binding of datasets, augmentation and segmentation metrics (placeholder until
 * the data layer lands: registers nothing yet). */
#include "binding.h"

void clhl_open_data(lua_State *L) {
    (void)L;
}

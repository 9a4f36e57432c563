// Tile grid: level-0 top-left corners of tiles that lie on tissue.
#pragma once
#include <cstdint>
#include <vector>

namespace hexfast {

struct GridParams {
    int64_t width = 0, height = 0;  // level-0 slide size
    int64_t tile = 0;               // tile side, level-0 px
    int64_t stride = 0;             // step between tiles, level-0 px
    double min_tissue = 0.5;        // keep tiles whose tissue fraction >= this
};

struct Grid {
    std::vector<int64_t> coords;    // N*2: x, y (level 0), row-major order
    std::vector<float> fraction;    // N: tissue fraction of each kept tile
};

// `mask` (mw x mh, nonzero = tissue) covers the slide with mask pixel (i, j)
// spanning level-0 [i*sx, (i+1)*sx) x [j*sy, (j+1)*sy). A tile's tissue
// fraction is the exact area of tissue under it divided by the tile area
// (parts beyond the slide count as background).
Grid tile_grid(const uint8_t* mask, int mw, int mh, double sx, double sy, const GridParams& p);

}  // namespace hexfast

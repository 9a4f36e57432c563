#include "grid.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace hexfast {

namespace {
// Summed-area table with one row/column of zero padding. The integral of a
// piecewise-constant mask is bilinear inside each cell, so bilinear
// interpolation of this table gives exact areas at fractional coordinates.
struct AreaTable {
    int w, h;
    std::vector<uint32_t> sat;  // uint32: masks are capped well below 2^32 px
    AreaTable(const uint8_t* m, int w_, int h_) : w(w_), h(h_), sat(static_cast<size_t>(w_ + 1) * (h_ + 1), 0) {
        for (int y = 0; y < h; ++y) {
            uint32_t row = 0;
            for (int x = 0; x < w; ++x) {
                row += m[static_cast<size_t>(y) * w + x] ? 1 : 0;
                at(x + 1, y + 1) = at(x + 1, y) + row;
            }
        }
    }
    uint32_t& at(int x, int y) { return sat[static_cast<size_t>(y) * (w + 1) + x]; }
    // Tissue area in [0, x] x [0, y], mask-pixel units.
    double integral(double x, double y) {
        x = std::clamp(x, 0.0, static_cast<double>(w));
        y = std::clamp(y, 0.0, static_cast<double>(h));
        const int x0 = std::min(static_cast<int>(x), w - 1), y0 = std::min(static_cast<int>(y), h - 1);
        const double fx = x - x0, fy = y - y0;
        return (1 - fx) * (1 - fy) * double(at(x0, y0)) + fx * (1 - fy) * at(x0 + 1, y0) +
               (1 - fx) * fy * at(x0, y0 + 1) + fx * fy * at(x0 + 1, y0 + 1);
    }
    double area(double x0, double y0, double x1, double y1) {
        return integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0);
    }
};
}  // namespace

Grid tile_grid(const uint8_t* mask, int mw, int mh, double sx, double sy, const GridParams& p) {
    if (mw <= 0 || mh <= 0) throw std::invalid_argument("empty mask");
    if (static_cast<double>(mw) * mh >= 4e9) throw std::invalid_argument("mask too large (>= 2^32 px)");
    if (p.tile <= 0 || p.stride <= 0) throw std::invalid_argument("tile and stride must be positive");
    if (p.width <= 0 || p.height <= 0) throw std::invalid_argument("slide size must be positive");
    if (!(sx > 0) || !(sy > 0)) throw std::invalid_argument("mask scale must be positive");
    AreaTable table(mask, mw, mh);
    const double tile_area = static_cast<double>(p.tile) * p.tile / (sx * sy);  // in mask px
    Grid g;
    for (int64_t y = 0; y < p.height; y += p.stride)
        for (int64_t x = 0; x < p.width; x += p.stride) {
            // Clip to the slide: the mask says nothing beyond it.
            const double x1 = std::min(x + p.tile, p.width), y1 = std::min(y + p.tile, p.height);
            const double frac = table.area(x / sx, y / sy, x1 / sx, y1 / sy) / tile_area;
            if (frac >= p.min_tissue) {
                g.coords.push_back(x);
                g.coords.push_back(y);
                g.fraction.push_back(static_cast<float>(frac));
            }
        }
    return g;
}

}  // namespace hexfast

#include "resize.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace hexfast {

namespace {
constexpr int kPrecision = 22;  // fixed-point bits, as PIL uses for 8-bit images

inline uint8_t clip8(int64_t v) {
    v = (v + (int64_t{1} << (kPrecision - 1))) >> kPrecision;
    return static_cast<uint8_t>(std::clamp<int64_t>(v, 0, 255));
}
}  // namespace

BilinearResizer::Taps BilinearResizer::make_taps(int in_size, int out_size) {
    const double scale = static_cast<double>(in_size) / out_size;
    const double filter_scale = std::max(scale, 1.0);
    const double support = filter_scale;  // triangle filter of radius 1, widened when shrinking
    Taps t;
    t.stride = static_cast<int>(std::ceil(support)) * 2 + 1;
    t.first.resize(out_size);
    t.count.resize(out_size);
    t.coef.assign(static_cast<size_t>(out_size) * t.stride, 0);
    std::vector<double> w(t.stride);
    for (int x = 0; x < out_size; ++x) {
        const double center = (x + 0.5) * scale;
        const int lo = std::max(static_cast<int>(center - support + 0.5), 0);
        const int hi = std::min(static_cast<int>(center + support + 0.5), in_size);
        const int n = std::min(hi - lo, t.stride);
        double total = 0;
        for (int k = 0; k < n; ++k) {
            const double d = std::abs((k + lo - center + 0.5) / filter_scale);
            w[k] = d < 1.0 ? 1.0 - d : 0.0;
            total += w[k];
        }
        for (int k = 0; k < n; ++k) {
            const double v = total != 0 ? w[k] / total : 0.0;
            t.coef[static_cast<size_t>(x) * t.stride + k] =
                static_cast<int32_t>(v < 0 ? -0.5 + v * (1 << kPrecision) : 0.5 + v * (1 << kPrecision));
        }
        t.first[x] = lo;
        t.count[x] = n;
    }
    return t;
}

BilinearResizer::BilinearResizer(int in_size, int out_size)
    : in_(in_size), out_(out_size), taps_(make_taps(in_size, out_size)) {
    if (in_size <= 0 || out_size <= 0) throw std::invalid_argument("resize sizes must be positive");
}

void BilinearResizer::operator()(const uint8_t* src, uint8_t* dst, std::vector<uint8_t>& scratch) const {
    // Horizontal: in x in -> in rows x out columns.
    scratch.resize(static_cast<size_t>(in_) * out_ * 3);
    for (int y = 0; y < in_; ++y) {
        const uint8_t* row = src + static_cast<size_t>(y) * in_ * 3;
        uint8_t* o = scratch.data() + static_cast<size_t>(y) * out_ * 3;
        for (int x = 0; x < out_; ++x) {
            const int32_t* c = &taps_.coef[static_cast<size_t>(x) * taps_.stride];
            const uint8_t* p = row + static_cast<size_t>(taps_.first[x]) * 3;
            int64_t r = 0, g = 0, b = 0;
            for (int k = 0; k < taps_.count[x]; ++k, p += 3) {
                r += int64_t{c[k]} * p[0];
                g += int64_t{c[k]} * p[1];
                b += int64_t{c[k]} * p[2];
            }
            o[3 * x] = clip8(r), o[3 * x + 1] = clip8(g), o[3 * x + 2] = clip8(b);
        }
    }
    // Vertical: -> out x out.
    const size_t row_bytes = static_cast<size_t>(out_) * 3;
    for (int y = 0; y < out_; ++y) {
        const int32_t* c = &taps_.coef[static_cast<size_t>(y) * taps_.stride];
        const uint8_t* base = scratch.data() + static_cast<size_t>(taps_.first[y]) * row_bytes;
        uint8_t* o = dst + static_cast<size_t>(y) * row_bytes;
        for (size_t i = 0; i < row_bytes; ++i) {
            int64_t acc = 0;
            for (int k = 0; k < taps_.count[y]; ++k) acc += int64_t{c[k]} * base[k * row_bytes + i];
            o[i] = clip8(acc);
        }
    }
}

}  // namespace hexfast

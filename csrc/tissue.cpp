#include "tissue.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <stdexcept>

namespace hexfast {

std::vector<uint8_t> hsv_saturation(const uint8_t* rgb, int w, int h) {
    // Same fixed-point rounding as OpenCV's 8-bit RGB→HSV, so thresholds
    // tuned on CLAM (which uses OpenCV) carry over unchanged.
    constexpr int shift = 12;
    std::array<int, 256> sdiv{};
    for (int v = 1; v < 256; ++v)
        sdiv[v] = static_cast<int>(std::lround((255 << shift) / static_cast<double>(v)));
    const size_t n = static_cast<size_t>(w) * h;
    std::vector<uint8_t> s(n);
    for (size_t i = 0; i < n; ++i) {
        const int r = rgb[3 * i], g = rgb[3 * i + 1], b = rgb[3 * i + 2];
        const int vmax = std::max({r, g, b});
        const int diff = vmax - std::min({r, g, b});
        s[i] = static_cast<uint8_t>((diff * sdiv[vmax] + (1 << (shift - 1))) >> shift);
    }
    return s;
}

std::vector<uint8_t> median_blur(const uint8_t* src, int w, int h, int ksize) {
    // Huang's sliding histogram with a running median; borders replicate.
    if (ksize < 1 || ksize % 2 == 0) throw std::invalid_argument("median ksize must be odd and >= 1");
    std::vector<uint8_t> dst(src, src + static_cast<size_t>(w) * h);
    const int r = ksize / 2;
    if (r == 0 || w == 0 || h == 0) return dst;
    const int half = ksize * ksize / 2;  // index of the median in the sorted window
    auto at = [&](int x, int y) {
        x = std::clamp(x, 0, w - 1);
        y = std::clamp(y, 0, h - 1);
        return src[static_cast<size_t>(y) * w + x];
    };
    for (int y = 0; y < h; ++y) {
        std::array<int, 256> hist{};
        for (int dy = -r; dy <= r; ++dy)
            for (int dx = -r; dx <= r; ++dx) ++hist[at(dx, y + dy)];
        int med = 0, below = 0;  // below = number of window values < med
        while (below + hist[med] <= half) below += hist[med++];
        dst[static_cast<size_t>(y) * w] = static_cast<uint8_t>(med);
        for (int x = 1; x < w; ++x) {
            for (int dy = -r; dy <= r; ++dy) {
                const int out = at(x - r - 1, y + dy), in = at(x + r, y + dy);
                --hist[out];
                if (out < med) --below;
                ++hist[in];
                if (in < med) ++below;
            }
            while (below > half) below -= hist[--med];
            while (below + hist[med] <= half) below += hist[med++];
            dst[static_cast<size_t>(y) * w + x] = static_cast<uint8_t>(med);
        }
    }
    return dst;
}

int otsu_threshold(const uint8_t* src, size_t n) {
    // Maximises the between-class variance; class 0 is values <= t.
    std::array<double, 256> hist{};
    for (size_t i = 0; i < n; ++i) hist[src[i]] += 1.0;
    double total_sum = 0;
    for (int i = 0; i < 256; ++i) total_sum += i * hist[i];
    double w0 = 0, sum0 = 0, best = -1;
    int best_t = 0;
    for (int t = 0; t < 256; ++t) {
        w0 += hist[t];
        sum0 += t * hist[t];
        const double w1 = static_cast<double>(n) - w0;
        if (w0 == 0 || w1 == 0) continue;
        const double mu0 = sum0 / w0, mu1 = (total_sum - sum0) / w1;
        const double between = w0 * w1 * (mu0 - mu1) * (mu0 - mu1);
        if (between > best) {
            best = between;
            best_t = t;
        }
    }
    return best_t;
}

namespace {
// Binary square dilate (any tissue in the window) or erode (all tissue in the
// window), separable, with sliding counts so the cost does not grow with the
// window. Pixels outside the image are ignored, as OpenCV does.
std::vector<uint8_t> binary_rank(const uint8_t* src, int w, int h, int ksize, bool dilate) {
    const int r = ksize / 2;
    auto decide = [dilate](int count, int inside) -> uint8_t { return dilate ? count > 0 : count == inside; };
    std::vector<uint8_t> tmp(static_cast<size_t>(w) * h), dst(tmp.size());
    for (int y = 0; y < h; ++y) {  // horizontal: count along the row
        const uint8_t* a = src + static_cast<size_t>(y) * w;
        uint8_t* b = tmp.data() + static_cast<size_t>(y) * w;
        int count = 0;  // nonzero pixels in [x - r, x + r] within the row
        for (int x = 0; x < std::min(r, w); ++x) count += a[x] != 0;
        for (int x = 0; x < w; ++x) {
            if (x + r < w) count += a[x + r] != 0;
            if (x - r - 1 >= 0) count -= a[x - r - 1] != 0;
            b[x] = decide(count, std::min(w - 1, x + r) - std::max(0, x - r) + 1);
        }
    }
    std::vector<int> counts(w, 0);  // vertical: per-column counts, updated a row at a time
    auto add_row = [&](int y, int sign) {
        const uint8_t* a = tmp.data() + static_cast<size_t>(y) * w;
        for (int x = 0; x < w; ++x) counts[x] += sign * a[x];
    };
    for (int y = 0; y < std::min(r, h); ++y) add_row(y, +1);
    for (int y = 0; y < h; ++y) {
        if (y + r < h) add_row(y + r, +1);
        if (y - r - 1 >= 0) add_row(y - r - 1, -1);
        const int inside = std::min(h - 1, y + r) - std::max(0, y - r) + 1;
        uint8_t* b = dst.data() + static_cast<size_t>(y) * w;
        for (int x = 0; x < w; ++x) b[x] = decide(counts[x], inside);
    }
    return dst;
}

// Visits each connected component of pixels equal to `value` with a flood
// fill; calls on_component(pixels, touches_border) for each one.
template <class F>
void for_each_component(uint8_t* mask, int w, int h, uint8_t value, bool eight, F&& on_component) {
    const size_t n = static_cast<size_t>(w) * h;
    std::vector<uint8_t> seen(n, 0);
    std::vector<uint32_t> pixels, stack;
    auto matches = [&](size_t j) { return (mask[j] != 0) == (value != 0); };
    for (size_t start = 0; start < n; ++start) {
        if (seen[start] || !matches(start)) continue;
        pixels.clear();
        stack.assign(1, static_cast<uint32_t>(start));
        seen[start] = 1;
        bool border = false;
        while (!stack.empty()) {
            const uint32_t i = stack.back();
            stack.pop_back();
            pixels.push_back(i);
            const int x = static_cast<int>(i % w), y = static_cast<int>(i / w);
            if (x == 0 || y == 0 || x == w - 1 || y == h - 1) border = true;
            for (int dy = -1; dy <= 1; ++dy)
                for (int dx = -1; dx <= 1; ++dx) {
                    if ((dx == 0 && dy == 0) || (!eight && dx != 0 && dy != 0)) continue;
                    const int nx = x + dx, ny = y + dy;
                    if (nx < 0 || ny < 0 || nx >= w || ny >= h) continue;
                    const size_t j = static_cast<size_t>(ny) * w + nx;
                    if (seen[j] || !matches(j)) continue;
                    seen[j] = 1;
                    stack.push_back(static_cast<uint32_t>(j));
                }
        }
        on_component(pixels, border);
    }
}
}  // namespace

std::vector<uint8_t> morph_close(const uint8_t* mask, int w, int h, int ksize) {
    const auto dilated = binary_rank(mask, w, h, ksize, true);
    return binary_rank(dilated.data(), w, h, ksize, false);
}

void fill_holes(uint8_t* mask, int w, int h, int64_t max_area) {
    for_each_component(mask, w, h, 0, false, [&](const std::vector<uint32_t>& px, bool border) {
        if (!border && static_cast<int64_t>(px.size()) < max_area)
            for (uint32_t i : px) mask[i] = 1;
    });
}

void remove_small_components(uint8_t* mask, int w, int h, int64_t min_area) {
    for_each_component(mask, w, h, 1, true, [&](const std::vector<uint32_t>& px, bool) {
        if (static_cast<int64_t>(px.size()) < min_area)
            for (uint32_t i : px) mask[i] = 0;
    });
}

int odd_kernel(double um, double mpp) {
    const int k = static_cast<int>(std::lround(um / mpp));
    return std::max(1, k | 1);
}

TissueResult segment_tissue(const uint8_t* rgb, int w, int h, const TissueParams& p) {
    if (w <= 0 || h <= 0) throw std::invalid_argument("empty image");
    if (!(p.mpp > 0)) throw std::invalid_argument("mpp must be positive");
    auto sat = hsv_saturation(rgb, w, h);
    for (size_t i = 0; i < sat.size(); ++i) {
        const uint8_t* px = rgb + 3 * i;
        if (std::max({px[0], px[1], px[2]}) < p.min_value) sat[i] = 0;
    }
    const auto blurred = median_blur(sat.data(), w, h, odd_kernel(p.median_um, p.mpp));
    TissueResult res;
    res.threshold_used = p.threshold >= 0 ? p.threshold
                                          : std::clamp(otsu_threshold(blurred.data(), blurred.size()),
                                                       p.min_threshold, std::max(p.min_threshold, p.max_threshold));
    std::vector<uint8_t> bin(blurred.size());
    for (size_t i = 0; i < bin.size(); ++i) bin[i] = blurred[i] > res.threshold_used ? 1 : 0;
    res.mask = morph_close(bin.data(), w, h, odd_kernel(p.close_um, p.mpp));
    const double px_area = p.mpp * p.mpp;
    fill_holes(res.mask.data(), w, h, static_cast<int64_t>(std::ceil(p.max_hole_um2 / px_area)));
    remove_small_components(res.mask.data(), w, h, static_cast<int64_t>(std::ceil(p.min_tissue_um2 / px_area)));
    return res;
}

}  // namespace hexfast

// Self-test of the C++ core against brute-force implementations. Built with
// -DHEXFAST_TESTS=ON; .ci/run runs it under ASan/UBSan.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "grid.hpp"
#include "tissue.hpp"

using namespace hexfast;

static int failures = 0;
#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);      \
            ++failures;                                                      \
        }                                                                    \
    } while (0)

static std::vector<uint8_t> random_image(int w, int h, int channels, std::mt19937& rng, int hi = 255) {
    std::uniform_int_distribution<int> d(0, hi);
    std::vector<uint8_t> v(static_cast<size_t>(w) * h * channels);
    for (auto& x : v) x = static_cast<uint8_t>(d(rng));
    return v;
}

static void test_median(std::mt19937& rng) {
    for (int k : {1, 3, 5, 7}) {
        const int w = 23, h = 17;
        const auto img = random_image(w, h, 1, rng);
        const auto got = median_blur(img.data(), w, h, k);
        const int r = k / 2;
        for (int y = 0; y < h; ++y)
            for (int x = 0; x < w; ++x) {
                std::vector<uint8_t> win;
                for (int dy = -r; dy <= r; ++dy)
                    for (int dx = -r; dx <= r; ++dx)
                        win.push_back(img[std::clamp(y + dy, 0, h - 1) * w + std::clamp(x + dx, 0, w - 1)]);
                std::nth_element(win.begin(), win.begin() + win.size() / 2, win.end());
                CHECK(got[y * w + x] == win[win.size() / 2]);
            }
    }
}

static void test_otsu(std::mt19937& rng) {
    for (int trial = 0; trial < 20; ++trial) {
        auto img = random_image(40, 30, 1, rng, 60);
        for (size_t i = 0; i < img.size() / 3; ++i) img[i] = static_cast<uint8_t>(img[i] + 120);
        double best = -1;
        int best_t = 0;
        for (int t = 0; t < 256; ++t) {
            double n0 = 0, n1 = 0, s0 = 0, s1 = 0;
            for (auto v : img) (v <= t ? (n0 += 1, s0 += v) : (n1 += 1, s1 += v));
            if (n0 == 0 || n1 == 0) continue;
            const double d = s0 / n0 - s1 / n1, b = n0 * n1 * d * d;
            if (b > best) best = b, best_t = t;
        }
        CHECK(otsu_threshold(img.data(), img.size()) == best_t);
    }
}

static void test_close(std::mt19937& rng) {
    const int w = 31, h = 19, k = 5, r = 2;
    auto m = random_image(w, h, 1, rng, 1);
    const auto got = morph_close(m.data(), w, h, k);
    auto rank = [&](const std::vector<uint8_t>& src, bool mx) {
        std::vector<uint8_t> out(src.size());
        for (int y = 0; y < h; ++y)
            for (int x = 0; x < w; ++x) {
                uint8_t v = src[y * w + x];
                for (int yy = std::max(0, y - r); yy <= std::min(h - 1, y + r); ++yy)
                    for (int xx = std::max(0, x - r); xx <= std::min(w - 1, x + r); ++xx)
                        v = mx ? std::max(v, src[yy * w + xx]) : std::min(v, src[yy * w + xx]);
                out[y * w + x] = v;
            }
        return out;
    };
    CHECK(got == rank(rank(m, true), false));
}

static void test_components() {
    // A 10x10 ring (hole of 16 px) and an isolated 2x2 blob.
    const int w = 20, h = 14;
    std::vector<uint8_t> m(w * h, 0);
    for (int y = 1; y <= 10; ++y)
        for (int x = 1; x <= 10; ++x) m[y * w + x] = (x >= 4 && x <= 7 && y >= 4 && y <= 7) ? 0 : 1;
    for (int y = 11; y <= 12; ++y)
        for (int x = 15; x <= 16; ++x) m[y * w + x] = 1;
    auto a = m;
    fill_holes(a.data(), w, h, 16);  // hole is not smaller than 16: kept
    CHECK(a[5 * w + 5] == 0);
    fill_holes(a.data(), w, h, 17);
    CHECK(a[5 * w + 5] == 1);
    remove_small_components(a.data(), w, h, 5);
    CHECK(a[11 * w + 15] == 0 && a[1 * w + 1] == 1);
    remove_small_components(a.data(), w, h, 101);
    CHECK(std::count(a.begin(), a.end(), 1) == 0);
}

static void test_grid(std::mt19937& rng) {
    // Integer scale: brute force over the upsampled mask.
    const int mw = 13, mh = 11, s = 4;
    const auto m = random_image(mw, mh, 1, rng, 1);
    GridParams p{mw * s - 3, mh * s - 2, 6, 5, 0.3};
    const Grid g = tile_grid(m.data(), mw, mh, s, s, p);
    std::vector<int64_t> want;
    for (int64_t y = 0; y < p.height; y += p.stride)
        for (int64_t x = 0; x < p.width; x += p.stride) {
            int cnt = 0;
            for (int64_t yy = y; yy < std::min(y + p.tile, p.height); ++yy)
                for (int64_t xx = x; xx < std::min(x + p.tile, p.width); ++xx) cnt += m[(yy / s) * mw + xx / s];
            if (cnt / double(p.tile * p.tile) >= p.min_tissue - 1e-9) want.insert(want.end(), {x, y});
        }
    CHECK(g.coords == want);
}

static void test_segment() {
    // A pink disk on white: the mask is the disk, the speck is dropped.
    const int w = 120, h = 100;
    std::vector<uint8_t> rgb(w * h * 3, 245);
    for (int y = 0; y < h; ++y)
        for (int x = 0; x < w; ++x) {
            const bool disk = (x - 60) * (x - 60) + (y - 50) * (y - 50) < 30 * 30;
            const bool speck = x >= 5 && x < 7 && y >= 5 && y < 7;
            if (disk || speck) {
                rgb[(y * w + x) * 3 + 0] = 200, rgb[(y * w + x) * 3 + 1] = 80, rgb[(y * w + x) * 3 + 2] = 160;
            }
        }
    TissueParams p;
    p.mpp = 8.0;
    const auto r = segment_tissue(rgb.data(), w, h, p);
    int inside = 0, outside = 0;
    for (int y = 0; y < h; ++y)
        for (int x = 0; x < w; ++x) {
            const int d2 = (x - 60) * (x - 60) + (y - 50) * (y - 50);
            if (d2 < 26 * 26) inside += r.mask[y * w + x] == 0;
            if (d2 > 34 * 34) outside += r.mask[y * w + x] != 0;
        }
    CHECK(inside == 0);
    CHECK(outside == 0);
    // A blank image stays blank (Otsu is floored).
    std::vector<uint8_t> blank(w * h * 3, 240);
    for (size_t i = 0; i < blank.size(); i += 7) blank[i] = 236;
    const auto b = segment_tissue(blank.data(), w, h, p);
    CHECK(std::count(b.mask.begin(), b.mask.end(), 1) == 0);
}

int main() {
    std::mt19937 rng(1234);
    test_median(rng);
    test_otsu(rng);
    test_close(rng);
    test_components();
    test_grid(rng);
    test_segment();
    std::printf("core_selftest: %s (%d failures)\n", failures ? "FAILED" : "ok", failures);
    return failures ? 1 : 0;
}

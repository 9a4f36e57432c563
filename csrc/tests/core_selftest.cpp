// Self-test of the C++ core against brute-force implementations. Built with
// -DHEXFAST_TESTS=ON; .ci/run runs it under ASan/UBSan.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <vector>

#include "grid.hpp"
#include "stain.hpp"
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

// ---- Stain normalisation ----

static void test_eigen(std::mt19937& rng) {
    std::uniform_real_distribution<double> d(-1, 1);
    for (int trial = 0; trial < 200; ++trial) {
        double a[3][3], w[3], v[3][3];
        for (int r = 0; r < 3; ++r)
            for (int c = r; c < 3; ++c) a[r][c] = a[c][r] = d(rng);
        if (trial % 3 == 0) a[0][1] = a[1][0] = a[0][2] = a[2][0] = 0;  // already partly diagonal
        sym_eigen3(a, w, v);
        CHECK(w[0] <= w[1] && w[1] <= w[2]);
        for (int k = 0; k < 3; ++k)
            for (int r = 0; r < 3; ++r) {
                double av = 0;
                for (int c = 0; c < 3; ++c) av += a[r][c] * v[c][k];
                CHECK(std::fabs(av - w[k] * v[r][k]) < 1e-12);
            }
        for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 3; ++j) {
                double dot = 0;
                for (int r = 0; r < 3; ++r) dot += v[r][i] * v[r][j];
                CHECK(std::fabs(dot - (i == j)) < 1e-12);
            }
    }
}

static void test_percentile(std::mt19937& rng) {
    std::uniform_real_distribution<double> d(-5, 5);
    for (size_t n : {1, 2, 3, 10, 101, 1000}) {
        std::vector<double> v(n);
        for (auto& x : v) x = d(rng);
        auto sorted = v;
        std::sort(sorted.begin(), sorted.end());
        for (double q : {0.0, 1.0, 37.5, 50.0, 99.0, 100.0}) {
            auto w = v;
            const double idx = (n - 1) * (q / 100);
            const size_t lo = static_cast<size_t>(idx), hi = std::min(lo + 1, n - 1);
            const double want = sorted[lo] + (sorted[hi] - sorted[lo]) * (idx - lo);
            CHECK(std::fabs(percentile_inplace(w.data(), n, q) - want) < 1e-12);
        }
    }
}

// An image made of two stains (torchstain's reference OD vectors) at random
// concentrations; 10% of pixels carry only one stain so the extreme angles
// Macenko looks for are present (and dense enough to pass the beta cut in
// every channel). Also returns the true vectors.
static std::vector<uint8_t> two_stain_image(size_t n, std::mt19937& rng, double h[3], double e[3]) {
    const double hv[3] = {0.5626, 0.7201, 0.4062}, ev[3] = {0.2159, 0.8012, 0.5581};
    const double hn = std::sqrt(hv[0] * hv[0] + hv[1] * hv[1] + hv[2] * hv[2]);
    const double en = std::sqrt(ev[0] * ev[0] + ev[1] * ev[1] + ev[2] * ev[2]);
    for (int c = 0; c < 3; ++c) h[c] = hv[c] / hn, e[c] = ev[c] / en;
    std::uniform_real_distribution<double> conc(0.8, 1.6);
    std::uniform_int_distribution<int> kind(0, 9);
    std::vector<uint8_t> img(3 * n);
    for (size_t i = 0; i < n; ++i) {
        const int k = kind(rng);
        const double ch = k == 0 ? 0 : conc(rng), ce = k == 1 ? 0 : conc(rng);
        for (int c = 0; c < 3; ++c)
            img[3 * i + c] = static_cast<uint8_t>(std::lround(std::clamp(240 * std::exp(-(ch * h[c] + ce * e[c])) - 1, 0.0, 255.0)));
    }
    return img;
}

static void test_macenko(std::mt19937& rng) {
    const size_t n = 20000;
    double h[3], e[3];
    const auto img = two_stain_image(n, rng, h, e);
    const StainMatrix m = macenko_estimate(img.data(), n);
    // Recovers both vectors (to 8-bit quantisation), hematoxylin first.
    double dh = 0, de = 0;
    for (int c = 0; c < 3; ++c) dh += m.he[c][0] * h[c], de += m.he[c][1] * e[c];
    CHECK(dh > 0.999 && de > 0.999);
    CHECK(m.max_c[0] > 1.5 && m.max_c[0] < 1.65 && m.max_c[1] > 1.5 && m.max_c[1] < 1.65);  // concentrations reach 1.6

    // Source == target: unmix and remix is the identity up to rounding.
    std::vector<uint8_t> out(img.size());
    macenko_apply(img.data(), out.data(), n, m, m);
    int worst = 0;
    for (size_t i = 0; i < img.size(); ++i) worst = std::max(worst, std::abs(out[i] - img[i]));
    CHECK(worst <= 2);

    // The table-product shortcut against the direct formula Io·exp(-M·OD).
    const StainMatrix ref = macenko_reference();
    macenko_apply(img.data(), out.data(), n, m, ref);
    double g00 = 0, g01 = 0, g11 = 0;
    for (int c = 0; c < 3; ++c) g00 += m.he[c][0] * m.he[c][0], g01 += m.he[c][0] * m.he[c][1], g11 += m.he[c][1] * m.he[c][1];
    const double det = g00 * g11 - g01 * g01;
    size_t exact = 0;
    worst = 0;
    for (size_t i = 0; i < n; ++i) {
        double od[3], conc[2];
        for (int c = 0; c < 3; ++c) od[c] = -std::log((img[3 * i + c] + 1.0) / 240);
        double b0 = 0, b1 = 0;
        for (int c = 0; c < 3; ++c) b0 += m.he[c][0] * od[c], b1 += m.he[c][1] * od[c];
        conc[0] = (g11 * b0 - g01 * b1) / det * ref.max_c[0] / m.max_c[0];
        conc[1] = (g00 * b1 - g01 * b0) / det * ref.max_c[1] / m.max_c[1];
        for (int c = 0; c < 3; ++c) {
            const double v = std::min(255.0, 240 * std::exp(-(ref.he[c][0] * conc[0] + ref.he[c][1] * conc[1])));
            const int want = static_cast<int>(v), diff = std::abs(out[3 * i + c] - want);
            exact += diff == 0;
            worst = std::max(worst, diff);
        }
    }
    CHECK(worst <= 1);
    CHECK(exact >= 3 * n - 3 * n / 1000);

    // Background only, one colour, or one stain: no estimate.
    auto throws = [](const std::vector<uint8_t>& im) {
        try {
            macenko_estimate(im.data(), im.size() / 3);
        } catch (const std::invalid_argument&) {
            return true;
        }
        return false;
    };
    std::vector<uint8_t> white(3 * 1000, 245);
    CHECK(throws(white));
    std::vector<uint8_t> flat(3 * 1000);
    for (size_t i = 0; i < flat.size(); i += 3) flat[i] = 150, flat[i + 1] = 80, flat[i + 2] = 140;
    CHECK(throws(flat));
    white[0] = 100, white[1] = 60, white[2] = 100;  // a single tissue pixel
    CHECK(throws(white));
    CHECK(throws(std::vector<uint8_t>()));
    bool bad_param = false;
    try {
        macenko_estimate(img.data(), n, MacenkoParams{0, 1, 0.15});
    } catch (const std::invalid_argument&) {
        bad_param = true;
    }
    CHECK(bad_param);

    // Any matrices, however degenerate, give defined output (UBSan watches the casts).
    std::uniform_real_distribution<double> d(-3, 3);
    const auto noise = random_image(64, 64, 3, rng);
    std::vector<uint8_t> o(noise.size());
    for (int trial = 0; trial < 50; ++trial) {
        StainMatrix a{}, b{};
        for (int r = 0; r < 3; ++r)
            for (int c = 0; c < 2; ++c) a.he[r][c] = d(rng), b.he[r][c] = d(rng);
        a.max_c[0] = d(rng), a.max_c[1] = trial % 2 ? 0 : d(rng), b.max_c[0] = d(rng), b.max_c[1] = d(rng);
        if (trial % 5 == 0)
            for (int r = 0; r < 3; ++r) a.he[r][1] = a.he[r][0];  // parallel columns
        if (trial % 7 == 0) a.he[1][1] = NAN, b.max_c[0] = INFINITY;
        macenko_apply(noise.data(), o.data(), 64 * 64, a, b, trial % 3 ? 240 : 1e6);
    }
    StainMatrix par = macenko_reference();
    for (int r = 0; r < 3; ++r) par.he[r][1] = par.he[r][0];
    CHECK(stain_matrix_usable(macenko_reference()) && !stain_matrix_usable(par));
}

static void test_reinhard(std::mt19937& rng) {
    // Source == target stats: RGB → Lab → RGB is the identity up to truncation.
    const auto img = random_image(200, 200, 3, rng);
    const size_t n = 200 * 200;
    const LabStats s = reinhard_stats(img.data(), n);
    std::vector<uint8_t> out(img.size());
    reinhard_apply(img.data(), out.data(), n, s, s);
    size_t exact = 0;
    int worst = 0;
    for (size_t i = 0; i < img.size(); ++i) {
        worst = std::max(worst, std::abs(out[i] - img[i]));
        exact += out[i] == img[i];
    }
    CHECK(worst <= 1);
    CHECK(exact > img.size() * 2 / 5);  // torchstain itself: 60% (it truncates too)

    // Uniform white: L = 100, a = b = 0, no spread.
    std::vector<uint8_t> white(3 * 100, 255);
    const LabStats w = reinhard_stats(white.data(), 100);
    CHECK(std::fabs(w.mean[0] - 100) < 1e-3 && std::fabs(w.mean[1]) < 1e-2 && std::fabs(w.mean[2]) < 1e-2);
    CHECK(w.std[0] < 1e-6 && w.std[1] < 1e-6 && w.std[2] < 1e-6);
    // Zero std only shifts, to the target mean: a flat image becomes the target's mean colour.
    const LabStats ref = reinhard_reference();
    reinhard_apply(white.data(), out.data(), 100, w, ref);
    CHECK(out[0] == out[3] && out[1] == out[4] && out[0] > out[1]);  // pinkish, all alike
    // Stats of a stack equal those of the pooled pixels (mean of halves).
    const LabStats h1 = reinhard_stats(img.data(), n / 2), h2 = reinhard_stats(img.data() + 3 * (n / 2), n - n / 2);
    for (int c = 0; c < 3; ++c) CHECK(std::fabs((h1.mean[c] + h2.mean[c]) / 2 - s.mean[c]) < 1e-4);
    // Non-finite stats are defined behaviour too.
    LabStats bad = s;
    bad.mean[0] = NAN, bad.std[1] = INFINITY, bad.std[2] = 0;
    reinhard_apply(img.data(), out.data(), n, bad, ref);
    reinhard_apply(img.data(), out.data(), n, ref, bad);
}

int main() {
    std::mt19937 rng(1234);
    test_median(rng);
    test_otsu(rng);
    test_close(rng);
    test_components();
    test_grid(rng);
    test_segment();
    test_eigen(rng);
    test_percentile(rng);
    test_macenko(rng);
    test_reinhard(rng);
    std::printf("core_selftest: %s (%d failures)\n", failures ? "FAILED" : "ok", failures);
    return failures ? 1 : 0;
}

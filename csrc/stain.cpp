#include "stain.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace hexfast {

// ---- Shared helpers ---------------------------------------------------------

void sym_eigen3(const double a_in[3][3], double values[3], double vecs[3][3]) {
    // Cyclic Jacobi: a handful of sweeps reach full double precision on 3x3,
    // and it is accurate for the tiny eigenvalue of rank-2 (two-stain) data.
    double a[3][3], v[3][3] = {{1, 0, 0}, {0, 1, 0}, {0, 0, 1}};
    std::memcpy(a, a_in, sizeof a);
    for (int sweep = 0; sweep < 64; ++sweep) {
        const double off = a[0][1] * a[0][1] + a[0][2] * a[0][2] + a[1][2] * a[1][2];
        const double diag = a[0][0] * a[0][0] + a[1][1] * a[1][1] + a[2][2] * a[2][2];
        if (!(off > 1e-40 * diag) || off == 0) break;  // also stops on NaN
        for (auto [p, q] : {std::pair{0, 1}, std::pair{0, 2}, std::pair{1, 2}}) {
            if (a[p][q] == 0) continue;
            // Rotation by t = tan(angle) that zeroes a[p][q]; the smaller root keeps it stable.
            const double theta = (a[p][p] - a[q][q]) / (2 * a[p][q]);
            const double root = std::sqrt(theta * theta + 1);
            const double t = -1 / (theta + (theta >= 0 ? root : -root));
            const double c = 1 / std::sqrt(t * t + 1), s = t * c;
            for (int k = 0; k < 3; ++k) {  // A·J
                const double akp = a[k][p], akq = a[k][q];
                a[k][p] = c * akp - s * akq;
                a[k][q] = s * akp + c * akq;
            }
            for (int k = 0; k < 3; ++k) {  // Jᵀ·A
                const double apk = a[p][k], aqk = a[q][k];
                a[p][k] = c * apk - s * aqk;
                a[q][k] = s * apk + c * aqk;
            }
            a[p][q] = a[q][p] = 0;
            for (int k = 0; k < 3; ++k) {  // V·J
                const double vkp = v[k][p], vkq = v[k][q];
                v[k][p] = c * vkp - s * vkq;
                v[k][q] = s * vkp + c * vkq;
            }
        }
    }
    int order[3] = {0, 1, 2};
    std::sort(order, order + 3, [&](int i, int j) { return a[i][i] < a[j][j]; });
    for (int c = 0; c < 3; ++c) {
        values[c] = a[order[c]][order[c]];
        // Sign is arbitrary (as in LAPACK); make the largest component positive
        // so results are reproducible. Macenko's output does not depend on it.
        int big = 0;
        for (int r = 1; r < 3; ++r)
            if (std::fabs(v[r][order[c]]) > std::fabs(v[big][order[c]])) big = r;
        const double sign = v[big][order[c]] < 0 ? -1.0 : 1.0;
        for (int r = 0; r < 3; ++r) vecs[r][c] = sign * v[r][order[c]];
    }
}

double percentile_inplace(double* v, size_t n, double q) {
    // numpy's default ('linear'): virtual index (n-1)·q/100, and numpy's
    // two-sided lerp so the result is bit-identical to np.percentile.
    const double idx = static_cast<double>(n - 1) * (q / 100.0);
    if (!(idx < static_cast<double>(n - 1))) return *std::max_element(v, v + n);
    if (idx < 0) return *std::min_element(v, v + n);
    const auto lo = static_cast<size_t>(std::floor(idx));
    std::nth_element(v, v + lo, v + n);
    const double a = v[lo], b = *std::min_element(v + lo + 1, v + n);
    const double gamma = idx - static_cast<double>(lo), diff = b - a;
    return gamma >= 0.5 ? b - diff * (1 - gamma) : a + diff * gamma;
}

// ---- Macenko ----------------------------------------------------------------

namespace {

// Optical density of each 8-bit value, computed as numpy does: -log((I + 1) / Io).
std::array<double, 256> od_table(double io) {
    std::array<double, 256> od{};
    for (int v = 0; v < 256; ++v) od[v] = -std::log((v + 1.0) / io);
    return od;
}

// 2x3 least-squares inverse (HEᵀHE)⁻¹HEᵀ. Returns false when the columns are
// (nearly) parallel; then a small ridge keeps the result finite.
bool stain_pinv(const StainMatrix& m, double p[2][3]) {
    double g00 = 0, g01 = 0, g11 = 0;
    for (int r = 0; r < 3; ++r) {
        g00 += m.he[r][0] * m.he[r][0];
        g01 += m.he[r][0] * m.he[r][1];
        g11 += m.he[r][1] * m.he[r][1];
    }
    double det = g00 * g11 - g01 * g01;
    const bool ok = std::isfinite(det) && det > 1e-10 * g00 * g11;
    if (!ok) {
        const double ridge = 1e-6 * (std::fabs(g00) + std::fabs(g11) + 1);
        g00 += ridge;
        g11 += ridge;
        det = g00 * g11 - g01 * g01;
    }
    for (int r = 0; r < 3; ++r) {
        p[0][r] = (g11 * m.he[r][0] - g01 * m.he[r][1]) / det;
        p[1][r] = (g00 * m.he[r][1] - g01 * m.he[r][0]) / det;
    }
    return ok;
}

}  // namespace

StainMatrix macenko_reference() { return {{{0.5626, 0.2159}, {0.7201, 0.8012}, {0.4062, 0.5581}}, {1.9705, 1.0308}}; }

bool stain_matrix_usable(const StainMatrix& m) {
    for (int r = 0; r < 3; ++r)
        if (!std::isfinite(m.he[r][0]) || !std::isfinite(m.he[r][1])) return false;
    double p[2][3];
    return stain_pinv(m, p);
}

StainMatrix macenko_estimate(const uint8_t* rgb, size_t n, const MacenkoParams& prm) {
    if (!(std::isfinite(prm.io) && prm.io > 0)) throw std::invalid_argument("macenko_estimate: io must be positive");
    if (!(prm.alpha >= 0 && prm.alpha <= 100)) throw std::invalid_argument("macenko_estimate: alpha must be within [0, 100]");
    if (!std::isfinite(prm.beta)) throw std::invalid_argument("macenko_estimate: beta must be finite");
    const auto od = od_table(prm.io);
    std::array<bool, 256> keep{};  // a pixel is tissue when every channel's OD >= beta
    for (int v = 0; v < 256; ++v) keep[v] = !(od[v] < prm.beta);
    auto kept = [&](size_t i) { return keep[rgb[3 * i]] && keep[rgb[3 * i + 1]] && keep[rgb[3 * i + 2]]; };

    // Covariance of the tissue OD (np.cov: centred, ddof 1), two passes for accuracy.
    size_t m = 0;
    double mean[3] = {0, 0, 0};
    for (size_t i = 0; i < n; ++i)
        if (kept(i)) {
            ++m;
            for (int c = 0; c < 3; ++c) mean[c] += od[rgb[3 * i + c]];
        }
    if (m < 2)
        throw std::invalid_argument("macenko_estimate: " + std::to_string(m) + " of " + std::to_string(n) +
                                    " pixels are tissue (optical density >= beta in every channel); need at "
                                    "least 2 - estimate the stains from tissue tiles");
    for (double& x : mean) x /= static_cast<double>(m);
    double cov[3][3] = {};
    std::vector<double> phi;  // reused below for the projection angles
    phi.reserve(m);
    for (size_t i = 0; i < n; ++i)
        if (kept(i)) {
            double d[3];
            for (int c = 0; c < 3; ++c) d[c] = od[rgb[3 * i + c]] - mean[c];
            for (int r = 0; r < 3; ++r)
                for (int c = r; c < 3; ++c) cov[r][c] += d[r] * d[c];
        }
    for (int r = 0; r < 3; ++r)
        for (int c = r; c < 3; ++c) cov[c][r] = cov[r][c] /= static_cast<double>(m - 1);

    double w[3], vec[3][3];
    sym_eigen3(cov, w, vec);
    // The plane of the two largest eigenvectors must be defined: tissue with
    // one colour (or one stain) leaves it arbitrary.
    if (!(w[2] > 0) || !(w[1] > 1e-9 * w[2]))
        throw std::invalid_argument("macenko_estimate: tissue pixels do not span two stain directions "
                                    "(degenerate optical-density covariance)");
    const double e1[3] = {vec[0][1], vec[1][1], vec[2][1]}, e2[3] = {vec[0][2], vec[1][2], vec[2][2]};

    // Angles of the tissue OD projected on that plane; the alpha and
    // 100 - alpha percentiles are the two stain directions.
    for (size_t i = 0; i < n; ++i)
        if (kept(i)) {
            const double r = od[rgb[3 * i]], g = od[rgb[3 * i + 1]], b = od[rgb[3 * i + 2]];
            phi.push_back(std::atan2(r * e2[0] + g * e2[1] + b * e2[2], r * e1[0] + g * e1[1] + b * e1[2]));
        }
    const double min_phi = percentile_inplace(phi.data(), m, prm.alpha);
    const double max_phi = percentile_inplace(phi.data(), m, 100 - prm.alpha);
    double vmin[3], vmax[3];
    for (int c = 0; c < 3; ++c) {
        vmin[c] = e1[c] * std::cos(min_phi) + e2[c] * std::sin(min_phi);
        vmax[c] = e1[c] * std::cos(max_phi) + e2[c] * std::sin(max_phi);
    }
    StainMatrix out{};
    // Hematoxylin first: the vector with the larger red OD (torchstain's rule).
    const bool min_is_h = vmin[0] > vmax[0];
    for (int c = 0; c < 3; ++c) {
        out.he[c][0] = min_is_h ? vmin[c] : vmax[c];
        out.he[c][1] = min_is_h ? vmax[c] : vmin[c];
    }
    double p[2][3];
    if (!stain_pinv(out, p))
        throw std::invalid_argument("macenko_estimate: the two stain vectors coincide (tissue angles span no range)");

    // Concentrations of every pixel (background included, as torchstain), 99th percentile each.
    std::vector<double> conc(n);
    for (int s = 0; s < 2; ++s) {
        for (size_t i = 0; i < n; ++i)
            conc[i] = p[s][0] * od[rgb[3 * i]] + p[s][1] * od[rgb[3 * i + 1]] + p[s][2] * od[rgb[3 * i + 2]];
        out.max_c[s] = percentile_inplace(conc.data(), n, 99);
        // Scaling divides by it: a non-positive value means almost no pixel carries the stain.
        if (!(out.max_c[s] > 0))
            throw std::invalid_argument(std::string("macenko_estimate: 99th-percentile ") + (s ? "eosin" : "hematoxylin") +
                                        " concentration is not positive (too little tissue)");
    }
    return out;
}

MacenkoApplier::MacenkoApplier(const StainMatrix& source, const StainMatrix& target, double io) noexcept {
    // Unmixing, rescaling and remixing are all linear in OD, so output OD is
    // M·input OD with M = HE_target·diag(scale)·pinv(HE_source), and
    // Io·exp(-M·od) = Io·Π_k exp(-M[:,k]·od_k): one table per input channel
    // holds the three output factors, leaving 3 lookups and 2 (vector)
    // multiplies per pixel and no exp. The factors are computed in double and
    // stored as float: the product then differs from float64 by < 1e-4 of a
    // grey level, which flips a truncated value on ~1e-4 of pixels.
    double p[2][3];
    stain_pinv(source, p);
    double scale[2];
    for (int s = 0; s < 2; ++s) {
        scale[s] = target.max_c[s] / source.max_c[s];
        if (!(source.max_c[s] > 1e-12) || !std::isfinite(scale[s])) scale[s] = 1;
    }
    double mm[3][3];
    for (int c = 0; c < 3; ++c)
        for (int k = 0; k < 3; ++k)
            mm[c][k] = target.he[c][0] * scale[0] * p[0][k] + target.he[c][1] * scale[1] * p[1][k];
    const auto od = od_table(io);
    for (int k = 0; k < 3; ++k)
        for (int v = 0; v < 256; ++v) {
            for (int c = 0; c < 3; ++c) {
                double f = std::exp(-mm[c][k] * od[v]) * (k == 0 ? io : 1.0);
                // Bounded so a product of three stays finite in float; NaN (from NaN input) becomes 0.
                f = std::isnan(f) ? 0.0 : std::min(f, 1e12);
                table_[k][v][c] = static_cast<float>(f);
            }
            table_[k][v][3] = 0;
        }
}

void MacenkoApplier::operator()(const uint8_t* src, uint8_t* dst, size_t n) const noexcept {
    // Clip then truncate, as torchstain's Inorm[Inorm > 255] = 255; astype(np.uint8).
    // src may equal dst (the stream normalises in place).
#if defined(__SSE2__) && defined(__x86_64__)
    const __m128 zero = _mm_setzero_ps(), top = _mm_set1_ps(255.0f);
    auto level = [&](size_t i) {  // [r, g, b, 0] as int32
        const __m128 a = _mm_load_ps(table_[0][src[3 * i]]);
        const __m128 b = _mm_load_ps(table_[1][src[3 * i + 1]]);
        const __m128 d = _mm_load_ps(table_[2][src[3 * i + 2]]);
        return _mm_cvttps_epi32(_mm_min_ps(_mm_max_ps(_mm_mul_ps(_mm_mul_ps(a, b), d), zero), top));  // max: NaN -> 0
    };
    size_t i = 0;
    // Four pixels at a time: their levels packed to bytes [r g b 0] x 4, the
    // zero bytes squeezed out in two 64-bit registers, then 12 bytes stored
    // (all four pixels are read before any is written, so in place is safe).
    for (; i + 4 <= n; i += 4) {
        const __m128i bytes = _mm_packus_epi16(_mm_packs_epi32(level(i), level(i + 1)),
                                               _mm_packs_epi32(level(i + 2), level(i + 3)));
        const auto rgb6 = [](uint64_t v) { return (v & 0xFFFFFFu) | ((v >> 8) & 0xFFFFFF000000u); };
        const uint64_t p01 = rgb6(static_cast<uint64_t>(_mm_cvtsi128_si64(bytes)));
        const uint64_t p23 = rgb6(static_cast<uint64_t>(_mm_cvtsi128_si64(_mm_unpackhi_epi64(bytes, bytes))));
        const uint64_t first = p01 | (p23 << 48);
        const uint32_t second = static_cast<uint32_t>(p23 >> 16);
        std::memcpy(dst + 3 * i, &first, 8);
        std::memcpy(dst + 3 * i + 8, &second, 4);
    }
    for (; i < n; ++i) {
        alignas(16) int32_t out[4];
        _mm_store_si128(reinterpret_cast<__m128i*>(out), level(i));
        for (int c = 0; c < 3; ++c) dst[3 * i + c] = static_cast<uint8_t>(out[c]);
    }
#else
    for (size_t i = 0; i < n; ++i) {
        const float* a = table_[0][src[3 * i]];
        const float* b = table_[1][src[3 * i + 1]];
        const float* d = table_[2][src[3 * i + 2]];
        for (int c = 0; c < 3; ++c) {
            const float x = a[c] * b[c] * d[c];
            dst[3 * i + c] = x >= 255 ? 255 : x > 0 ? static_cast<uint8_t>(x) : 0;
        }
    }
#endif
}

void macenko_apply(const uint8_t* src, uint8_t* dst, size_t n, const StainMatrix& source, const StainMatrix& target,
                   double io) noexcept {
    MacenkoApplier(source, target, io)(src, dst, n);
}

// ---- Reinhard ---------------------------------------------------------------

namespace {

// torchstain's sRGB (D65) <-> XYZ matrix and reference white.
constexpr double kRgb2Xyz[3][3] = {
    {0.412453, 0.357580, 0.180423}, {0.212671, 0.715160, 0.072169}, {0.019334, 0.119193, 0.950227}};
constexpr double kWhite[3] = {0.95047, 1.0, 1.08883};

// Lab's f() in float (torchstain's own precision) and branch-free, so the
// block loops below vectorise. The cube root (only needed above 0.008856)
// starts from the exponent/3 bit trick and takes two Halley steps (cubic
// convergence: ~3e-2 → float precision).
inline float lab_f(float t) {
    const float x = t > 0.008856f ? t : 1.0f;  // any positive stand-in; the root is not used
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    bits = bits / 3 + 709921077u;
    float y;
    std::memcpy(&y, &bits, sizeof y);
    for (int it = 0; it < 2; ++it) {
        const float y3 = y * y * y;
        y = y * (y3 + 2 * x) / (2 * y3 + x);
    }
    return t > 0.008856f ? y : 7.787f * t + 16.0f / 116.0f;
}

inline float lab_finv(float t) { return t > 0.2068966f ? t * t * t : (t - 16.0f / 116.0f) * (1 / 7.787f); }

// Pixels are processed in blocks, structure-of-arrays, so the arithmetic
// between the table look-ups vectorises.
constexpr int kBlock = 256;

struct ReinhardTables {
    float lin[256];         // sRGB value → linear (torchstain's rgb2lab branch)
    float rgb2xyz_w[3][3];  // kRgb2Xyz with rows divided by the white point
    float xyz2rgb_w[3][3];  // inverse of kRgb2Xyz, columns multiplied by the white point
    // Output level of a linear value: numpy's floor(255·clip(gamma(lin), 0, 1))
    // changes at 255 thresholds; a coarse bucket index gives the level at the
    // bucket's start and a step finishes it exactly (the curve rises under
    // one level per bucket).
    static constexpr int kBuckets = 4096;  // per unit of linear value; covers [0, 2)
    double threshold[257];                 // threshold[k]: smallest lin with level >= k
    uint8_t bucket[2 * kBuckets];

    ReinhardTables() {
        for (int v = 0; v < 256; ++v) {
            const double x = v / 255.0;
            lin[v] = static_cast<float>(x > 0.04045 ? std::pow((x + 0.055) / 1.055, 2.4) : x / 12.92);
        }
        for (int r = 0; r < 3; ++r)
            for (int c = 0; c < 3; ++c) rgb2xyz_w[r][c] = static_cast<float>(kRgb2Xyz[r][c] / kWhite[r]);
        // Inverse by cofactors (numpy's inv agrees to rounding).
        const auto& m = kRgb2Xyz;
        double inv[3][3];
        for (int r = 0; r < 3; ++r)
            for (int c = 0; c < 3; ++c) {
                const int r1 = (c + 1) % 3, r2 = (c + 2) % 3, c1 = (r + 1) % 3, c2 = (r + 2) % 3;
                inv[r][c] = m[r1][c1] * m[r2][c2] - m[r1][c2] * m[r2][c1];
            }
        const double det = m[0][0] * inv[0][0] + m[0][1] * inv[1][0] + m[0][2] * inv[2][0];
        for (int r = 0; r < 3; ++r)
            for (int c = 0; c < 3; ++c) xyz2rgb_w[r][c] = static_cast<float>(inv[r][c] / det * kWhite[c]);
        // Thresholds by bisection on the bit pattern (ordered like the value for
        // non-negative doubles) of the exact numpy expression, which is monotone.
        threshold[0] = -HUGE_VAL;
        threshold[256] = HUGE_VAL;
        for (int k = 1; k <= 255; ++k) {
            uint64_t lo = 0, hi;  // level(lo) < k <= level(hi)
            const double two = 2.0;
            std::memcpy(&hi, &two, sizeof hi);
            while (hi - lo > 1) {
                const uint64_t mid = lo + (hi - lo) / 2;
                double x;
                std::memcpy(&x, &mid, sizeof x);
                (numpy_level(x) >= k ? hi : lo) = mid;
            }
            std::memcpy(&threshold[k], &hi, sizeof hi);
        }
        int level = 0;
        for (int i = 0; i < 2 * kBuckets; ++i) {
            const double x = static_cast<double>(i) / kBuckets;
            while (level < 255 && x >= threshold[level + 1]) ++level;
            bucket[i] = static_cast<uint8_t>(level);
        }
    }

    // torchstain's lab2rgb gamma, clip and (x * 255).astype(uint8), in float64.
    static int numpy_level(double lin) {
        double g = lin > 0.0031308 ? 1.055 * std::pow(lin, 1 / 2.4) - 0.055 : lin * 12.92;
        g = std::min(std::max(g, 0.0), 1.0);
        return static_cast<int>(g * 255);
    }

    uint8_t level(double lin) const {
        lin = lin > 0 ? lin : 0;  // also maps NaN to 0
        lin = lin < 1.999 ? lin : 1.999;
        int l = bucket[static_cast<int>(lin * kBuckets)];
        // The steepest part of the curve (12.92·255 levels per unit) crosses
        // under one level per bucket, so two branch-free steps always suffice.
        l += lin >= threshold[l + 1];
        l += lin >= threshold[l + 1];
        return static_cast<uint8_t>(l);
    }

    // Lab of m <= kBlock pixels: L in [0, 100], a and b centred on 0
    // (torchstain's rgb2lab then lab_split).
    void lab_block(const uint8_t* px, int m, float* lab_l, float* lab_a, float* lab_b) const {
        float x[kBlock], y[kBlock], z[kBlock];
        for (int j = 0; j < m; ++j) {
            const float r = lin[px[3 * j]], g = lin[px[3 * j + 1]], b = lin[px[3 * j + 2]];
            x[j] = rgb2xyz_w[0][0] * r + rgb2xyz_w[0][1] * g + rgb2xyz_w[0][2] * b;
            y[j] = rgb2xyz_w[1][0] * r + rgb2xyz_w[1][1] * g + rgb2xyz_w[1][2] * b;
            z[j] = rgb2xyz_w[2][0] * r + rgb2xyz_w[2][1] * g + rgb2xyz_w[2][2] * b;
        }
        for (int j = 0; j < m; ++j) {
            const float fx = lab_f(x[j]), fy = lab_f(y[j]), fz = lab_f(z[j]);
            lab_l[j] = 116 * fy - 16;
            lab_a[j] = 500 * (fx - fy);
            lab_b[j] = 200 * (fy - fz);
        }
    }
};

const ReinhardTables& reinhard_tables() {
    static const ReinhardTables t;  // thread-safe one-time init (~1 ms)
    return t;
}

}  // namespace

LabStats reinhard_stats(const uint8_t* rgb, size_t n) {
    const auto& t = reinhard_tables();
    LabStats s{};
    if (n == 0) return s;
    // Double sums shifted by the first pixel's Lab, so the variance keeps its digits.
    double shift[3], sum[3] = {0, 0, 0}, sq[3] = {0, 0, 0};
    {
        float l, a, b;
        t.lab_block(rgb, 1, &l, &a, &b);
        shift[0] = l, shift[1] = a, shift[2] = b;
    }
    float lab[3][kBlock];
    for (size_t i0 = 0; i0 < n; i0 += kBlock) {
        const int m = static_cast<int>(std::min<size_t>(kBlock, n - i0));
        t.lab_block(rgb + 3 * i0, m, lab[0], lab[1], lab[2]);
        for (int c = 0; c < 3; ++c)
            for (int j = 0; j < m; ++j) {
                const double d = lab[c][j] - shift[c];
                sum[c] += d;
                sq[c] += d * d;
            }
    }
    const double nn = static_cast<double>(n);
    for (int c = 0; c < 3; ++c) {
        const double mean_d = sum[c] / nn;
        s.mean[c] = shift[c] + mean_d;
        s.std[c] = std::sqrt(std::max(0.0, sq[c] / nn - mean_d * mean_d));
    }
    return s;
}

LabStats reinhard_reference() {
    // torchstain ReinhardNormalizer(backend='numpy').fit() on CMU-1-Small-Region.svs,
    // level 0, read_region((1120, 896), (224, 224)): dense tissue, 99.6% of pixels
    // saturated. tests/test_stain.py recomputes these from the slide.
    return {{41.281414, 28.569286, -17.410706}, {13.724064, 6.2257676, 6.1158895}};
}

void reinhard_apply(const uint8_t* src, uint8_t* dst, size_t n, const LabStats& source,
                    const LabStats& target) noexcept {
    const auto& t = reinhard_tables();
    float ratio[3], offset[3];  // channel' = channel·ratio + offset
    for (int c = 0; c < 3; ++c) {
        double r = target.std[c] / source.std[c];
        if (!(source.std[c] > 1e-12) || !std::isfinite(r)) r = 1;
        ratio[c] = static_cast<float>(r);
        offset[c] = static_cast<float>(target.mean[c] - source.mean[c] * r);
    }
    const auto& w = t.xyz2rgb_w;
    float lab[3][kBlock], out[3][kBlock];
    for (size_t i0 = 0; i0 < n; i0 += kBlock) {
        const int m = static_cast<int>(std::min<size_t>(kBlock, n - i0));
        t.lab_block(src + 3 * i0, m, lab[0], lab[1], lab[2]);
        for (int j = 0; j < m; ++j) {
            const float l = lab[0][j] * ratio[0] + offset[0], a = lab[1][j] * ratio[1] + offset[1],
                        b = lab[2][j] * ratio[2] + offset[2];
            const float fy = (l + 16) * (1.0f / 116);
            const float x = lab_finv(a * (1.0f / 500) + fy), y = lab_finv(fy), z = lab_finv(fy - b * (1.0f / 200));
            for (int c = 0; c < 3; ++c) out[c][j] = w[c][0] * x + w[c][1] * y + w[c][2] * z;
        }
        uint8_t* d = dst + 3 * i0;
        for (int j = 0; j < m; ++j)
            for (int c = 0; c < 3; ++c) d[3 * j + c] = t.level(out[c][j]);
    }
}

}  // namespace hexfast

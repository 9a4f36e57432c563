// Stain normalisation (Macenko, Reinhard), uint8 RGB in and out.
// Both follow torchstain's numpy normalisers (the de-facto reference in the
// HEX/MICA pipelines) step for step, so outputs agree with it to within a grey
// level; the difference is that estimation and application are separate, so a
// stain estimate taken once from a slide's tissue tiles can be applied to every
// tile, background included, where a per-tile estimate breaks down.
// Images are tightly packed RGB triplets; n counts pixels.
#pragma once
#include <cstddef>
#include <cstdint>

namespace hexfast {

// ---- Macenko ---------------------------------------------------------------

struct StainMatrix {
    double he[3][2];   // optical-density unit vectors, columns: hematoxylin, eosin
    double max_c[2];   // 99th percentile of each stain's concentration
};

// torchstain's default target (HERef, maxCRef).
StainMatrix macenko_reference();

struct MacenkoParams {
    double io = 240;     // transmitted light intensity
    double alpha = 1;    // angle percentile (alpha, 100 - alpha) picking the stain vectors
    double beta = 0.15;  // OD below this in any channel = background, left out of the fit
};

// Stain vectors and concentration scale of an image (torchstain's
// __compute_matrices). Throws std::invalid_argument when fewer than 2 pixels
// are tissue, the tissue does not span two stain directions, or a 99th-percentile
// concentration is not positive (all signs of a background tile).
StainMatrix macenko_estimate(const uint8_t* rgb, size_t n_pixels, const MacenkoParams& p = {});

// Re-renders src with target's stains: concentrations by least squares on
// source's vectors, scaled by target.max_c / source.max_c. Output is clipped
// to [0, 255] and truncated like numpy's astype(uint8). Never throws; any
// input matrices give finite in-range output (a non-positive source max_c
// leaves that stain unscaled; near-singular source vectors are regularised).
void macenko_apply(const uint8_t* src, uint8_t* dst, size_t n_pixels, const StainMatrix& source,
                   const StainMatrix& target, double io = 240) noexcept;

// macenko_apply with its per-slide work (three 256-entry tables) done once,
// for applying one slide's estimate to every tile. src may equal dst.
class MacenkoApplier {
public:
    MacenkoApplier(const StainMatrix& source, const StainMatrix& target, double io = 240) noexcept;
    void operator()(const uint8_t* src, uint8_t* dst, size_t n_pixels) const noexcept;

private:
    alignas(16) float table_[3][256][4];  // [input channel][value][output channel (+pad)]
};

// False when source vectors are not finite or (nearly) parallel, so the
// unmixing is ill-posed.
bool stain_matrix_usable(const StainMatrix& m);

// ---- Reinhard --------------------------------------------------------------

// Per-channel mean and (population) standard deviation in CIE L*a*b*
// (L in [0, 100]; a, b centred on 0), as torchstain's ReinhardNormalizer.fit.
struct LabStats {
    double mean[3], std[3];
};

LabStats reinhard_stats(const uint8_t* rgb, size_t n);

// Stats of a fixed CMU-1-Small-Region tissue tile (see stain.cpp).
LabStats reinhard_reference();

// Standardises each Lab channel with source's stats and rescales it to
// target's. Never throws; a zero (or non-finite) source std only shifts that
// channel.
void reinhard_apply(const uint8_t* src, uint8_t* dst, size_t n, const LabStats& source,
                    const LabStats& target) noexcept;

// ---- Building blocks, exposed for tests ------------------------------------

// Eigen-decomposition of a symmetric 3x3 matrix: values ascending, vectors
// as columns of vecs (vecs[row][col]), like numpy.linalg.eigh.
void sym_eigen3(const double a[3][3], double values[3], double vecs[3][3]);

// numpy.percentile(v, q) with linear interpolation; reorders v. v non-empty.
double percentile_inplace(double* v, size_t n, double q);

}  // namespace hexfast

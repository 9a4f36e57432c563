// Tissue detection on a reduced RGB image (CLAM-style).
// Every size parameter is physical (µm / µm²) and converted to pixels with the
// image's µm-per-pixel, so a 20x and a 40x scan of the same glass give the
// same mask.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace hexfast {

struct TissueParams {
    double mpp = 4.0;                 // µm per pixel of the input image
    int threshold = -1;               // saturation threshold; < 0 → Otsu clamped to [min, max]
    int min_threshold = 8;            // so blank glass stays blank (CLAM's fixed default)
    int max_threshold = 20;           // so pale tissue stays tissue when dense tissue pulls Otsu up
    double median_um = 30.0;          // median-blur window side
    double close_um = 60.0;           // morphological-close square side
    double min_tissue_um2 = 40000.0;  // drop tissue pieces smaller than this
    double max_hole_um2 = 20000.0;    // fill holes smaller than this
    int min_value = 30;               // darker pixels (max of R, G, B) are never tissue: the black glass of a
                                      // fluorescence or dark-field scan, whose noise has a high saturation
};

struct TissueResult {
    std::vector<uint8_t> mask;  // h*w, 1 = tissue
    int threshold_used = 0;
};

// Image helpers, exposed for testing against independent implementations.
// All images are row-major, tightly packed.
std::vector<uint8_t> hsv_saturation(const uint8_t* rgb, int w, int h);
std::vector<uint8_t> median_blur(const uint8_t* src, int w, int h, int ksize);
int otsu_threshold(const uint8_t* src, size_t n);
// Binary close (nonzero = tissue) with a ksize x ksize square; result is 0/1.
std::vector<uint8_t> morph_close(const uint8_t* mask, int w, int h, int ksize);
// Fill background regions (4-connected, not touching the border) smaller than max_area px.
void fill_holes(uint8_t* mask, int w, int h, int64_t max_area);
// Remove tissue components (8-connected) smaller than min_area px.
void remove_small_components(uint8_t* mask, int w, int h, int64_t min_area);

// Odd window size in pixels for a physical length.
int odd_kernel(double um, double mpp);

TissueResult segment_tissue(const uint8_t* rgb, int w, int h, const TissueParams& p);

}  // namespace hexfast

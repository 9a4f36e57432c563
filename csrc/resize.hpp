// Bilinear resize of RGB uint8 images with the same filter as PIL's
// Image.resize(..., BILINEAR): a triangle filter widened by the scale factor
// when shrinking (antialiased), separable, horizontal pass first, 8-bit
// intermediate. HEX's preprocessing resizes tiles with PIL, so this keeps
// tiles identical to the reference's within one grey level.
#pragma once
#include <cstdint>
#include <vector>

namespace hexfast {

class BilinearResizer {
public:
    BilinearResizer(int in_size, int out_size);  // square images
    // src: in x in x 3, dst: out x out x 3; `scratch` is reused between calls.
    void operator()(const uint8_t* src, uint8_t* dst, std::vector<uint8_t>& scratch) const;

private:
    struct Taps {
        std::vector<int> first;     // first input index per output index
        std::vector<int> count;     // taps per output index
        std::vector<int32_t> coef;  // fixed-point weights, `stride` per output index
        int stride = 0;
    };
    static Taps make_taps(int in_size, int out_size);
    int in_, out_;
    Taps taps_;
};

}  // namespace hexfast

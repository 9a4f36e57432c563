// Python face of the C++ core. Heavy work runs with the GIL released; results
// are handed to numpy without copying (the array owns the C++ buffer).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <utility>

#include "grid.hpp"
#include "py_numpy.hpp"
#include "tissue.hpp"

namespace py = pybind11;
using namespace hexfast;

namespace {

using U8Array = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

std::pair<int, int> image_size(const U8Array& a, int channels) {
    const bool ok = channels == 1 ? a.ndim() == 2 : (a.ndim() == 3 && a.shape(2) == channels);
    if (!ok) throw py::value_error(channels == 1 ? "expected a 2-D uint8 array" : "expected an (H, W, 3) uint8 array");
    if (a.shape(0) <= 0 || a.shape(1) <= 0) throw py::value_error("empty image");
    if (static_cast<double>(a.shape(0)) * a.shape(1) >= 4e9) throw py::value_error("image too large (>= 2^32 px)");
    return {static_cast<int>(a.shape(1)), static_cast<int>(a.shape(0))};
}

py::array_t<uint8_t> image_out(std::vector<uint8_t>&& v, int w, int h) { return to_numpy(std::move(v), {h, w}); }

}  // namespace

void bind_stain(py::module_& m);   // stain_bindings.cpp
void bind_stream(py::module_& m);  // stream_bindings.cpp

PYBIND11_MODULE(_core, m) {
    m.doc() = "hexfast C++ core: tissue detection, tile grid, stain normalisation, TileStream";
    m.attr("__version__") = HEXFAST_VERSION;  // pyproject.toml's, through CMake

    m.def(
        "segment_tissue",
        [](const U8Array& rgb, double mpp, int threshold, int min_threshold, int max_threshold, double median_um,
           double close_um, double min_tissue_um2, double max_hole_um2, int min_value) {
            auto [w, h] = image_size(rgb, 3);
            TissueParams p{mpp,      threshold, min_threshold,  max_threshold,
                           median_um, close_um, min_tissue_um2, max_hole_um2, min_value};
            TissueResult r;
            {
                py::gil_scoped_release nogil;
                r = segment_tissue(rgb.data(), w, h, p);
            }
            return py::make_tuple(image_out(std::move(r.mask), w, h), r.threshold_used);
        },
        py::arg("rgb"), py::arg("mpp"), py::arg("threshold") = -1, py::arg("min_threshold") = 8,
        py::arg("max_threshold") = 20, py::arg("median_um") = 30.0, py::arg("close_um") = 60.0, py::arg("min_tissue_um2") = 40000.0,
        py::arg("max_hole_um2") = 20000.0, py::arg("min_value") = 30,
        "Tissue mask (H, W) uint8 of 0/1 from an RGB image at `mpp` µm/px, and the saturation threshold used "
        "(threshold < 0: Otsu clamped to [min_threshold, max_threshold]). Pixels whose brightest channel is "
        "below min_value are never tissue.");

    m.def(
        "tile_grid",
        [](const U8Array& mask, double scale_x, double scale_y, int64_t width, int64_t height, int64_t tile,
           int64_t stride, double min_tissue) {
            auto [mw, mh] = image_size(mask, 1);
            GridParams p{width, height, tile, stride, min_tissue};
            Grid g;
            {
                py::gil_scoped_release nogil;
                g = tile_grid(mask.data(), mw, mh, scale_x, scale_y, p);
            }
            const auto n = static_cast<py::ssize_t>(g.fraction.size());
            return py::make_tuple(to_numpy(std::move(g.coords), {n, 2}), to_numpy(std::move(g.fraction), {n}));
        },
        py::arg("mask"), py::arg("scale_x"), py::arg("scale_y"), py::arg("width"), py::arg("height"),
        py::arg("tile"), py::arg("stride"), py::arg("min_tissue"),
        "Level-0 (x, y) of tiles with tissue fraction >= min_tissue, row-major, and their fractions. "
        "Mask pixel (i, j) spans level-0 [i*scale_x, (i+1)*scale_x) x [j*scale_y, (j+1)*scale_y).");

    // Building blocks, exposed so tests can check each against an independent implementation.
    m.def("hsv_saturation", [](const U8Array& rgb) {
        auto [w, h] = image_size(rgb, 3);
        return image_out(hsv_saturation(rgb.data(), w, h), w, h);
    }, py::arg("rgb"));
    m.def("median_blur", [](const U8Array& img, int ksize) {
        auto [w, h] = image_size(img, 1);
        return image_out(median_blur(img.data(), w, h, ksize), w, h);
    }, py::arg("img"), py::arg("ksize"));
    m.def("otsu_threshold", [](const U8Array& img) { return otsu_threshold(img.data(), img.size()); }, py::arg("img"));
    m.def("morph_close", [](const U8Array& mask, int ksize) {
        auto [w, h] = image_size(mask, 1);
        return image_out(morph_close(mask.data(), w, h, ksize), w, h);
    }, py::arg("mask"), py::arg("ksize"));
    m.def("fill_holes", [](const U8Array& mask, int64_t max_area) {
        auto [w, h] = image_size(mask, 1);
        std::vector<uint8_t> out(mask.data(), mask.data() + mask.size());
        fill_holes(out.data(), w, h, max_area);
        return image_out(std::move(out), w, h);
    }, py::arg("mask"), py::arg("max_area"));
    m.def("remove_small_components", [](const U8Array& mask, int64_t min_area) {
        auto [w, h] = image_size(mask, 1);
        std::vector<uint8_t> out(mask.data(), mask.data() + mask.size());
        remove_small_components(out.data(), w, h, min_area);
        return image_out(std::move(out), w, h);
    }, py::arg("mask"), py::arg("min_area"));
    m.def("odd_kernel", &odd_kernel, py::arg("um"), py::arg("mpp"));
    bind_stain(m);
    bind_stream(m);
}

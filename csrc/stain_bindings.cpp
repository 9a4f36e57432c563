// Python face of stain normalisation. Images are uint8 arrays of shape
// (..., 3) (one tile, or a stack of tiles for a slide-level estimate); the
// loops run with the GIL released and outputs are handed to numpy without a copy.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "stain.hpp"
#include "py_numpy.hpp"
#include "tile_stream.hpp"

namespace py = pybind11;
using namespace hexfast;

namespace {

using RgbArray = py::array_t<uint8_t, py::array::c_style>;
using F64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;

std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

// A C-contiguous view (a copy only if the input is strided) of an (..., 3) uint8 image.
RgbArray rgb_input(const py::handle& obj, const char* name) {
    if (!py::isinstance<py::array>(obj))
        throw py::value_error(std::string(name) + ": expected a numpy uint8 array of shape (..., 3), got " +
                              std::string(py::str(py::type::of(obj).attr("__name__"))));
    auto a = py::reinterpret_borrow<py::array>(obj);
    if (a.dtype().kind() != 'u' || a.dtype().itemsize() != 1)
        throw py::value_error(std::string(name) + ": expected dtype uint8 (RGB 0-255), got " +
                              std::string(py::str(a.dtype())));
    if (a.ndim() < 1 || a.shape(a.ndim() - 1) != 3)
        throw py::value_error(std::string(name) + ": expected shape (..., 3) (RGB last), got " + shape_str(a));
    if (a.size() == 0) throw py::value_error(std::string(name) + ": empty image");
    return RgbArray::ensure(a);
}

std::vector<py::ssize_t> shape_of(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }

// A finite float64 array of exactly `shape`.
F64Array f64_input(const py::handle& obj, const char* name, std::vector<py::ssize_t> shape) {
    auto a = F64Array::ensure(obj);  // null (error cleared) when not convertible
    if (!a) throw py::value_error(std::string(name) + ": expected a float array");
    std::string want = "(";
    for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
    want += shape.size() == 1 ? ",)" : ")";
    bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
    for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(i) == shape[i];
    if (!ok) throw py::value_error(std::string(name) + ": expected shape " + want + ", got " + shape_str(a));
    for (py::ssize_t i = 0; i < a.size(); ++i)
        if (!std::isfinite(a.data()[i])) throw py::value_error(std::string(name) + ": values must be finite");
    return a;
}

StainMatrix stain_input(const py::handle& he_obj, const py::handle& max_c_obj, const char* he_name,
                        const char* max_c_name) {
    const auto he = f64_input(he_obj, he_name, {3, 2});
    const auto max_c = f64_input(max_c_obj, max_c_name, {2});
    StainMatrix m{};
    for (int r = 0; r < 3; ++r)
        for (int c = 0; c < 2; ++c) m.he[r][c] = he.at(r, c);
    for (int s = 0; s < 2; ++s) {
        m.max_c[s] = max_c.at(s);
        if (!(m.max_c[s] > 0)) throw py::value_error(std::string(max_c_name) + ": concentrations must be positive");
    }
    if (!stain_matrix_usable(m))
        throw py::value_error(std::string(he_name) + ": the two stain vectors are (nearly) parallel");
    return m;
}

LabStats stats_input(const py::handle& mean_obj, const py::handle& std_obj, const char* mean_name,
                     const char* std_name) {
    const auto mean = f64_input(mean_obj, mean_name, {3});
    const auto sd = f64_input(std_obj, std_name, {3});
    LabStats s{};
    for (int c = 0; c < 3; ++c) {
        s.mean[c] = mean.at(c);
        s.std[c] = sd.at(c);
        if (s.std[c] < 0) throw py::value_error(std::string(std_name) + ": standard deviations must be >= 0");
    }
    return s;
}

py::tuple stain_out(const StainMatrix& m) {
    std::vector<double> he(6), max_c(m.max_c, m.max_c + 2);
    for (int r = 0; r < 3; ++r)
        for (int c = 0; c < 2; ++c) he[2 * r + c] = m.he[r][c];
    return py::make_tuple(to_numpy(std::move(he), {3, 2}), to_numpy(std::move(max_c), {2}));
}

py::tuple stats_out(const LabStats& s) {
    return py::make_tuple(to_numpy(std::vector<double>(s.mean, s.mean + 3), {3}),
                          to_numpy(std::vector<double>(s.std, s.std + 3), {3}));
}

size_t pixels(const RgbArray& a) { return static_cast<size_t>(a.size() / 3); }

}  // namespace

// The TileStream's per-tile transform for `method` (none, macenko, reinhard),
// from the slide's estimate (source) and the target, each a pair of arrays as
// macenko_estimate / reinhard_stats return them; target None = the reference.
TileTransform make_stain_transform(const std::string& method, const py::object& source, const py::object& target,
                                   double io) {
    if (method == "none") return {};
    if (method != "macenko" && method != "reinhard")
        throw py::value_error("stain_norm must be none, macenko or reinhard, not " + method);
    if (source.is_none()) throw py::value_error("stain_norm=" + method + " needs the slide's stain estimate");
    const auto src = source.cast<py::tuple>();
    if (src.size() != 2) throw py::value_error("stain source must be a pair of arrays");
    if (method == "macenko") {
        const StainMatrix from = stain_input(src[0], src[1], "he_source", "max_c_source");
        StainMatrix to = macenko_reference();
        if (!target.is_none()) {
            const auto tgt = target.cast<py::tuple>();
            to = stain_input(tgt[0], tgt[1], "he_target", "max_c_target");
        }
        auto apply = std::make_shared<const MacenkoApplier>(from, to, io);  // tables built once per slide
        return [apply](const uint8_t* src, uint8_t* dst, size_t n) { (*apply)(src, dst, n); };
    }
    const LabStats from = stats_input(src[0], src[1], "mean_source", "std_source");
    LabStats to = reinhard_reference();
    if (!target.is_none()) {
        const auto tgt = target.cast<py::tuple>();
        to = stats_input(tgt[0], tgt[1], "mean_target", "std_target");
    }
    return [from, to](const uint8_t* src, uint8_t* dst, size_t n) { reinhard_apply(src, dst, n, from, to); };
}

void bind_stain(py::module_& m) {
    m.def(
        "macenko_estimate",
        [](const py::object& rgb_obj, double io, double alpha, double beta) {
            const auto rgb = rgb_input(rgb_obj, "rgb");
            StainMatrix s;
            {
                py::gil_scoped_release nogil;
                s = macenko_estimate(rgb.data(), pixels(rgb), MacenkoParams{io, alpha, beta});
            }  // std::invalid_argument surfaces as ValueError
            return stain_out(s);
        },
        py::arg("rgb"), py::arg("io") = 240.0, py::arg("alpha") = 1.0, py::arg("beta") = 0.15,
        "Macenko stain matrix of an (..., 3) uint8 image (a tile, or a stack of tissue tiles for a "
        "slide-level estimate), as torchstain's numpy MacenkoNormalizer: (he (3, 2) OD unit vectors, "
        "columns hematoxylin and eosin; max_c (2,) 99th-percentile concentrations). ValueError when the "
        "image has too little tissue (fewer than 2 pixels with OD >= beta in every channel).");

    m.def(
        "macenko_apply",
        [](const py::object& rgb_obj, const py::object& he_src, const py::object& max_c_src,
           const py::object& he_tgt, const py::object& max_c_tgt, double io) {
            const auto rgb = rgb_input(rgb_obj, "rgb");
            if (!(std::isfinite(io) && io > 0)) throw py::value_error("io must be positive");
            if (he_tgt.is_none() != max_c_tgt.is_none())
                throw py::value_error("give both he_target and max_c_target, or neither (torchstain's default)");
            const StainMatrix source = stain_input(he_src, max_c_src, "he_source", "max_c_source");
            const StainMatrix target =
                he_tgt.is_none() ? macenko_reference() : stain_input(he_tgt, max_c_tgt, "he_target", "max_c_target");
            std::vector<uint8_t> out(static_cast<size_t>(rgb.size()));
            {
                py::gil_scoped_release nogil;
                macenko_apply(rgb.data(), out.data(), pixels(rgb), source, target, io);
            }
            return to_numpy(std::move(out), shape_of(rgb));
        },
        py::arg("rgb"), py::arg("he_source"), py::arg("max_c_source"), py::arg("he_target") = py::none(),
        py::arg("max_c_target") = py::none(), py::arg("io") = 240.0,
        "Re-render an (..., 3) uint8 image stained as (he_source, max_c_source) with the target stains "
        "(default: torchstain's reference). Same shape, uint8; never NaN.");

    m.def("macenko_reference", [] { return stain_out(macenko_reference()); },
          "torchstain's default Macenko target (HERef (3, 2), maxCRef (2,)).");

    m.def(
        "reinhard_stats",
        [](const py::object& rgb_obj) {
            const auto rgb = rgb_input(rgb_obj, "rgb");
            LabStats s;
            {
                py::gil_scoped_release nogil;
                s = reinhard_stats(rgb.data(), pixels(rgb));
            }
            return stats_out(s);
        },
        py::arg("rgb"),
        "Per-channel Lab mean (3,) and std (3,) of an (..., 3) uint8 image, as torchstain's numpy "
        "ReinhardNormalizer.fit (L in [0, 100], a and b centred on 0).");

    m.def(
        "reinhard_apply",
        [](const py::object& rgb_obj, const py::object& mean_src, const py::object& std_src,
           const py::object& mean_tgt, const py::object& std_tgt) {
            const auto rgb = rgb_input(rgb_obj, "rgb");
            if (mean_tgt.is_none() != std_tgt.is_none())
                throw py::value_error("give both mean_tgt and std_tgt, or neither (the reference tile)");
            const LabStats source = stats_input(mean_src, std_src, "mean_src", "std_src");
            const LabStats target =
                mean_tgt.is_none() ? reinhard_reference() : stats_input(mean_tgt, std_tgt, "mean_tgt", "std_tgt");
            std::vector<uint8_t> out(static_cast<size_t>(rgb.size()));
            {
                py::gil_scoped_release nogil;
                reinhard_apply(rgb.data(), out.data(), pixels(rgb), source, target);
            }
            return to_numpy(std::move(out), shape_of(rgb));
        },
        py::arg("rgb"), py::arg("mean_src"), py::arg("std_src"), py::arg("mean_tgt") = py::none(),
        py::arg("std_tgt") = py::none(),
        "Reinhard: standardise each Lab channel of an (..., 3) uint8 image with the source stats and "
        "rescale to the target's (default: reinhard_reference()). Same shape, uint8.");

    m.def("reinhard_reference", [] { return stats_out(reinhard_reference()); },
          "Lab mean and std of the fixed CMU-1-Small-Region reference tile (level 0, (1120, 896), 224 px).");
}

// Python face of TileStream. Batches are numpy views of the ring buffers; a
// capsule shared by a batch's two arrays hands the buffer back to the stream
// when both arrays are garbage.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "tile_stream.hpp"

namespace py = pybind11;
using namespace hexfast;

TileTransform make_stain_transform(const std::string& method, const py::object& source, const py::object& target,
                                   double io);  // stain_bindings.cpp

namespace {

struct Lease {
    std::shared_ptr<TileStream> stream;
    int slot;
};

py::object next_batch(const std::shared_ptr<TileStream>& stream) {
    Batch b;
    bool interrupted = false;
    {
        py::gil_scoped_release nogil;
        try {
            b = stream->next([&] {
                py::gil_scoped_acquire gil;
                interrupted = PyErr_CheckSignals() != 0;  // leaves KeyboardInterrupt set
                return interrupted;
            });
        } catch (const StreamInterrupted&) {
        }
    }
    if (interrupted) throw py::error_already_set();
    if (b.slot < 0) return py::none();
    auto* lease = new Lease{stream, b.slot};
    py::capsule owner(lease, [](void* p) {
        auto* l = static_cast<Lease*>(p);
        l->stream->release(l->slot);
        delete l;
    });
    const py::ssize_t s = stream->out_size();
    py::array_t<int64_t> coords({static_cast<py::ssize_t>(b.count), py::ssize_t{2}}, b.coords, owner);
    py::array_t<uint8_t> tiles({static_cast<py::ssize_t>(b.count), s, s, py::ssize_t{3}}, b.tiles, owner);
    return py::make_tuple(coords, tiles);
}

}  // namespace

void bind_stream(py::module_& m) {
    m.attr("HAVE_JPEG") = tiled_jpeg_available();
    py::class_<TileStream, std::shared_ptr<TileStream>>(m, "TileStream")
        .def(py::init([](const std::string& slide_path, const std::string& library_path,
                         py::array_t<int64_t, py::array::c_style | py::array::forcecast> coords, int64_t read_size,
                         int out_size, int batch_size, int threads, int prefetch, bool skip_errors,
                         size_t cache_bytes, const std::string& reader, const std::string& stain_norm,
                         const py::object& stain_source, const py::object& stain_target, double stain_io) {
                 if (coords.ndim() != 2 || coords.shape(1) != 2) throw py::value_error("coords must be (N, 2)");
                 StreamParams p;
                 p.slide_path = slide_path;
                 p.library_path = library_path;
                 p.coords.assign(coords.data(), coords.data() + coords.size());
                 p.read_size = read_size;
                 p.out_size = out_size;
                 p.batch_size = batch_size;
                 p.threads = threads;
                 p.prefetch = prefetch;
                 p.skip_errors = skip_errors;
                 p.cache_bytes = cache_bytes;
                 p.reader = reader;
                 p.transform = make_stain_transform(stain_norm, stain_source, stain_target, stain_io);
                 py::gil_scoped_release nogil;
                 return std::make_shared<TileStream>(std::move(p));
             }),
             py::arg("slide_path"), py::arg("library_path"), py::arg("coords"), py::arg("read_size"),
             py::arg("out_size"), py::arg("batch_size"), py::arg("threads"), py::arg("prefetch"),
             py::arg("skip_errors"), py::arg("cache_bytes"), py::arg("reader") = "auto",
             py::arg("stain_norm") = "none", py::arg("stain_source") = py::none(), py::arg("stain_target") = py::none(),
             py::arg("stain_io") = 240.0)
        .def("next", &next_batch, "(coords (B, 2) int64, tiles (B, S, S, 3) uint8) in grid order, or None at the end")
        .def("close", [](TileStream& s) {
            py::gil_scoped_release nogil;
            s.close();
        })
        .def("__len__", &TileStream::size)
        .def_property_readonly("batches", &TileStream::batches)
        .def_property_readonly("reader", &TileStream::reader, "'direct' (hexfast decodes the stored JPEG tiles) or 'openslide'")
        .def_property_readonly("decoded_tiles", &TileStream::decoded_tiles, "stored tiles decoded so far (direct reader)")
        .def_property_readonly("skipped", [](const TileStream& s) {
            py::list out;
            for (const auto& t : s.skipped()) out.append(py::make_tuple(t.index, t.x, t.y, t.message));
            return out;
        });
}
